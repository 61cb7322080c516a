"""The route table: which route and handler a (method, path) reaches, and what 405 allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from nixcache.keys import SecretKey
from nixcache.server import base32
from nixcache.server.app import App
from nixcache.server.auth import Tokens
from nixcache.server.config import ServerConfig
from nixcache.server.metrics import Metrics
from nixcache.server.routes import NOT_FOUND, Route, Router
from nixcache.server.store import Store

HASH = base32.encode(bytes(20))
NAR = base32.encode(bytes(32)) + ".nar.xz"


def test_router_matches_whole_paths_in_order_and_builds_allow() -> None:
    router = Router(
        [
            Route("one", r"/a/([0-9]+)", {"GET": "get-a", "PUT": "put-a"}),
            Route("two", r"/a/.*", {"GET": "get-any"}),
        ]
    )
    assert router.resolve("GET", "/a/12") == ("one", "get-a", ("12",), "")
    assert router.resolve("GET", "/a/x") == ("two", "get-any", (), "")
    assert router.resolve("GET", "/a/12x") == ("two", "get-any", (), "")  # not /a/<digits>: the next route
    assert router.resolve("GET", "/a/12\n").name != "one"  # a final newline is not matched away
    assert router.resolve("DELETE", "/a/12") == ("one", None, (), "GET, PUT")  # RFC 9110 15.5.6
    assert router.resolve("GET", "/b") == NOT_FOUND
    assert router.resolve("GET", "/a/12/") == ("two", "get-any", (), "")


@pytest.fixture
def app(tmp_path: Path) -> App:
    store = Store(tmp_path / "store")
    store.create()
    return App(ServerConfig(), store, [SecretKey.generate("t-1")], Tokens.load(None, None), Metrics(store))


# method, path, route name, handler name (None: no handler), Allow
APP_CASES = [
    ("GET", f"/{HASH}.narinfo", "narinfo", "get_narinfo", ""),
    ("HEAD", f"/{HASH}.narinfo", "narinfo", "get_narinfo", ""),
    ("PUT", f"/{HASH}.narinfo", "narinfo", "put_narinfo", ""),
    ("DELETE", f"/{HASH}.narinfo", "narinfo", None, "GET, HEAD, PUT"),
    ("GET", f"/{HASH}.narinfo\n", "other", None, ""),  # %0A decoded: no narinfo name
    ("PUT", f"/{HASH}.narinfo\n", "other", None, ""),
    ("GET", f"/{HASH[:31]}e.narinfo", "other", None, ""),  # 'e' is not in Nix base32
    ("GET", f"/nar/{NAR}", "nar", "get_nar", ""),
    ("PUT", f"/nar/{NAR}", "nar", "put_nar", ""),
    ("PUT", f"/nar/{NAR}\n", "other", None, ""),
    ("PUT", f"/nar/{NAR[:-3]}.gz", "other", None, ""),
    ("POST", "/nix-cache-info", "nix-cache-info", None, "GET, HEAD, PUT"),
    ("GET", "/nix-cache-info", "nix-cache-info", "get_cache_info", ""),
    ("PUT", "/healthz", "healthz", None, "GET, HEAD"),
    ("GET", "/metrics", "metrics", "get_metrics", ""),
    ("GET", "/pubkey", "pubkey", "get_pubkey", ""),
    ("PUT", f"/{HASH}.ls", "listing", "put_extra", ""),
    ("HEAD", f"/{HASH}.ls", "listing", "get_extra", ""),
    ("DELETE", f"/{HASH}.ls", "listing", None, "GET, HEAD, PUT"),
    ("PUT", "/log/abc-foo.drv", "log", "put_extra", ""),
    ("PUT", "/build-trace-v2/x/out.doi", "build-trace", "put_extra", ""),
    ("GET", f"/realisations/sha256:{'0' * 64}!out.doi", "realisation", "get_extra", ""),
    ("GET", "/realisations/x.doi", "other", None, ""),
    ("GET", f"/debuginfo/{'ab' * 20}.debug", "debuginfo", "get_extra", ""),
    ("HEAD", "/debuginfo/0123", "other", None, ""),  # not a build ID Nix writes
    ("PUT", f"/nar/{NAR[:-3]}.br", "nar", "put_nar", ""),
    ("PUT", f"/nar/{NAR[:-3]}.lz4", "nar", "put_nar", ""),
    ("PUT", f"/nar/{NAR[:-3]}.lzip", "nar", "put_lzip_nar", ""),
    ("HEAD", f"/nar/{NAR[:-3]}.lzip", "nar", "get_lzip_nar", ""),
    ("PUT", "/log/../../etc/passwd", "other", None, ""),
    ("PUT", "/log/./x", "other", None, ""),
    ("PUT", "/log/x\0y", "other", None, ""),
    ("PUT", "/log/", "other", None, ""),
    ("GET", "/", "other", None, ""),
]


@pytest.mark.parametrize(
    ("method", "path", "name", "handler", "allow"), APP_CASES, ids=[f"{c[0]} {c[1]!r}" for c in APP_CASES]
)
def test_app_route_table(
    app: App, method: str, path: str, name: str, handler: str | None, allow: str
) -> None:
    found = app.router.resolve(method, path)
    assert found.name == name
    assert (found.handler.__name__ if found.handler else None) == handler
    assert found.allow == allow
