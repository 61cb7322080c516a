"""The deploy's nginx front (operations/nginx.py's site, unchanged but for paths) on loopback.

Runs Debian's real nginx with the site and the main-context file the deploy renders, wrapped in
bench/reference_nginx.py's main config under a temp prefix, in front of a `nixcache serve` on
127.0.0.1. Used by tests/server/test_front.py and bench/serve.py --front.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench import reference_nginx
from operations import nginx
from support import process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s") from None
            time.sleep(0.05)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made as operations/nginx.py's tls() makes them."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class Front:
    proc: subprocess.Popen
    port: int
    cert: Path
    prefix: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        process.stop(self.proc)


def hits_log_for(directory: Path) -> Path:
    """The hits log as the deploy makes it: there before nginx opens it, writable by the server."""
    path = directory / nginx.HITS_LOG_NAME
    path.touch(mode=0o660)
    return path


def start_front(
    work: Path,
    cache_port: int,
    store: Path,
    hits_log: Path,
    read_token: str | None = None,
    narinfo_from_disk: bool = True,
    workers: int = 2,
    nice: list[str] | None = None,
) -> Front:
    """nginx with the deploy's site for a server on `cache_port` and `store`, on a free port."""
    prefix = work / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    cert, key = self_signed(prefix)
    readers = prefix / "readers.conf"
    readers.write_text(nginx.render_readers(read_token))
    port = free_port()
    site = nginx.render_site(
        cache_port,
        port,
        str(store),
        str(hits_log),
        prefix="/_nixcache_store/",
        ipv6=False,
        narinfo_from_disk=narinfo_from_disk,
        readers_file=str(readers),
    )
    site = site.replace(nginx.CERT_FILE, str(cert)).replace(nginx.KEY_FILE, str(key))
    site = site.replace(f"listen {port} ssl", f"listen 127.0.0.1:{port} ssl")  # loopback only
    (prefix / "nixcache.conf").write_text(site)
    # The deploy's main-context file, included where Debian's nginx.conf includes modules-enabled/.
    (prefix / "nixcache-main.conf").write_text(nginx.render_main())
    text = reference_nginx.main(
        prefix,
        f"    include {prefix}/nixcache.conf;",
        workers=workers,
        top=f"include {prefix}/nixcache-main.conf;",
    )
    with open(prefix / "stderr.log", "wb") as stderr:  # nginx keeps its own copy of the descriptor
        proc = reference_nginx.start(prefix, text, nice or [], stderr=stderr)
    front = Front(proc, port, cert, prefix)
    try:
        wait_port(port)
    except RuntimeError:
        front.stop()
        raise RuntimeError((prefix / "stderr.log").read_text()) from None
    return front
