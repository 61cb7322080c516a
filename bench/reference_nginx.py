"""The reference of every bench/ script: nginx serving the same files from disk.

One configuration for all of them (sendfile, its access log on, keep-alive without a request
limit, the Nix content types), so each number in docs/benchmarks.md is against the same nginx;
what differs is what it serves (`locations`), how many workers it runs and whether it speaks TLS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import IO

# The main configuration of every nginx run here (this reference, and tests/support/front.py's
# deploy front): in the foreground, everything it writes (pid, logs, temp files) under `prefix`.
_MAIN = """
daemon off;
worker_processes {workers};
{top}
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http}
}}
"""

_HTTP = """
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    types {{ text/x-nix-narinfo narinfo; application/x-nix-nar nar xz zst bz2; }}
{extra}
    server {{
        listen 127.0.0.1:{port}{listen_options};
{tls}
{locations}
    }}"""

# A narinfo location serving `<dir>/<hash>.narinfo`, and the NAR files of a store.
NARINFO = '        location ~ "^/([0-9a-z]{{32}})\\.narinfo$" {{ alias {dir}/$1.narinfo; }}'
NARS = "        location /nar/ {{ alias {store}/nar/; }}"


def conf(
    prefix: Path,
    port: int,
    locations: list[str],
    *,
    workers: int = 2,
    tls: tuple[Path, Path] | None = None,
    extra: str = "",
) -> str:
    """nginx.conf for a server on 127.0.0.1:`port` with `locations` (NARINFO, NARS, formatted);
    `tls`: (certificate, key) for HTTPS with HTTP/2, as the deploy's front speaks."""
    tls_lines = ""
    if tls is not None:
        tls_lines = (
            f"        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};\n"
            "        ssl_session_cache shared:reference:10m;"
        )
    http = _HTTP.format(
        port=port,
        listen_options=" ssl http2" if tls is not None else "",
        tls=tls_lines,
        extra=f"    {extra}" if extra else "",
        locations="\n".join(locations),
    )
    return main(prefix, http, workers=workers)


def main(prefix: Path, http: str, *, workers: int = 2, top: str = "") -> str:
    """nginx.conf with everything under `prefix` and `http` (directives, servers) in its http block;
    `top`: main-context directives (the front's: what Debian's nginx.conf includes from
    modules-enabled/)."""
    return _MAIN.format(
        workers=workers,
        top=top,
        user="user root;" if os.geteuid() == 0 else "",
        prefix=prefix,
        http=http.strip("\n"),
    )


def start(
    prefix: Path, text: str, nice: list[str], stderr: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """Write `text` as `prefix`/nginx.conf and run nginx on it in the foreground (`nice` first;
    its own messages to `stderr`, ours if None)."""
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(text)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return subprocess.Popen(
        [*nice, nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"], stderr=stderr
    )
