"""Helpers of the tier tests: a config naming the origin and upstreams, metrics, a loopback upstream."""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
from prometheus_client.parser import text_string_to_metric_families
from support.seaweed import Seaweed

from nixcache.keys import SecretKey
from nixcache.server import base32, narinfo
from server.helpers import Entry


def write_config(
    path: Path,
    *,
    seaweed: Seaweed | None = None,
    bucket: str | None = None,
    upstreams: list[tuple[str, list[str]]] = (),  # type: ignore[assignment]
    **origin: object,
) -> Path:
    """A server config with an [origin] (when `seaweed` is given) and [[upstreams]] tables."""
    lines = ["negative_ttl = 30", ""]
    if seaweed is not None:
        access, secret = seaweed.write_credentials(path.parent / "s3")
        lines += [
            "[origin]",
            f'endpoint = "{seaweed.endpoint}"',
            f'bucket = "{bucket}"',
            f'access_key_file = "{access}"',
            f'secret_key_file = "{secret}"',
            *(f"{k} = {v!r}".replace("'", '"') for k, v in origin.items()),
            "",
        ]
    for url, keys in upstreams:
        quoted = ", ".join(f'"{k}"' for k in keys)
        lines += ["[[upstreams]]", f'url = "{url}"', 'name = "up"', f"public_keys = [{quoted}]", ""]
    path.write_text("\n".join(lines))
    return path


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when absent)."""
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def signed_narinfo(entry: Entry, key: SecretKey) -> str:
    """The entry's narinfo with a Sig by `key`, as an upstream cache serves it."""
    info = narinfo.parse(entry.narinfo())
    return info.signed([key], "/nix/store")


def file_hash(data: bytes) -> str:
    return base32.encode(hashlib.sha256(data).digest())


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _GatedHandler(_QuietHandler):
    """Sends the first half of a gated file, then waits for the test to open the gate."""

    gates: ClassVar[dict[str, threading.Event]] = {}

    def copyfile(self, source, outputfile) -> None:  # type: ignore[no-untyped-def]
        gate = self.gates.get(self.path)
        if gate is None:
            return super().copyfile(source, outputfile)
        data = source.read()
        outputfile.write(data[: len(data) // 2])
        outputfile.flush()
        gate.wait(30)
        outputfile.write(data[len(data) // 2 :])
        return None


@contextmanager
def binary_cache_server(root: Path, gates: dict[str, threading.Event] | None = None) -> Iterator[str]:
    """Serve `root` (a file:// binary cache layout) over HTTP on loopback; yields its URL.

    `gates`: URL path -> Event; such a file stops halfway until its Event is set."""
    handler_class = type("Handler", (_GatedHandler,), {"gates": gates or {}})
    handler = functools.partial(handler_class, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def publish_upstream(root: Path, entry: Entry, key: SecretKey, nar_bytes: bytes | None = None) -> None:
    """Write `entry` into the upstream's directory, signed by `key` (NAR bytes overridable)."""
    (root / "nar").mkdir(parents=True, exist_ok=True)
    (root / "nix-cache-info").write_text("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
    (root / f"{entry.hash_part}.narinfo").write_text(signed_narinfo(entry, key))
    (root / "nar" / entry.nar_file).write_bytes(entry.file_bytes if nar_bytes is None else nar_bytes)
