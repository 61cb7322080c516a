"""What the deploy renders for the nginx front: the readers map, the site's modes, the server's config.

nginx itself runs these files in tests/server/test_front.py (loopback) and on lab hosts
(tests/deploy_parts/test_lab_parts.py).
"""

from __future__ import annotations

import base64
import shutil
import tomllib
from pathlib import Path

from conftest import require
from support.front import hits_log_for, start_front

from nixcache.server import config as configmod
from operations.client import NETRC_LOGIN
from operations.config import render_config
from operations.nginx import render_readers, render_site
from operations.settings import from_data


def test_a_public_cache_lets_every_reader_read_from_disk() -> None:
    readers = render_readers(None)
    assert "default ok;" in readers and "Basic" not in readers


def test_the_readers_map_holds_the_netrc_login_and_bearer_forms_of_the_read_token() -> None:
    readers = render_readers("s3cr3t-T0ken")
    basic = base64.b64encode(f"{NETRC_LOGIN}:s3cr3t-T0ken".encode()).decode()
    assert f'"Basic {basic}" ok;' in readers
    assert '"Bearer s3cr3t-T0ken" ok;' in readers
    assert "default unknown;" in readers and '"" anonymous;' in readers


def test_a_token_nginx_cannot_quote_is_left_to_the_server_as_a_bearer() -> None:
    readers = render_readers('to"ken; x')
    assert "Bearer" not in readers and readers.count(" ok;") == 1  # Basic only: base64 is always safe


def test_a_long_read_token_still_loads_in_nginx(tmp_path: Path) -> None:
    require(shutil.which("nginx") or Path("/usr/sbin/nginx").exists(), "nginx missing")
    require(shutil.which("openssl") is not None, "openssl missing")
    (tmp_path / "store").mkdir()
    front = start_front(tmp_path, 1, tmp_path / "store", hits_log_for(tmp_path), read_token="x" * 400)
    front.stop()  # started: nginx built the map (its default bucket holds 64-byte keys only)


def test_a_host_serving_its_nix_store_leaves_narinfos_to_the_server() -> None:
    def narinfo_map(text: str) -> str:
        return text.split("map ")[1]  # the first map after the include: $nixcache_narinfo_from

    on = render_site(5000, 443, "/var/lib/nixcache/store", "/var/lib/nixcache/front-hits.log")
    off = render_site(
        5000, 443, "/var/lib/nixcache/store", "/var/lib/nixcache/front-hits.log", narinfo_from_disk=False
    )
    assert '"GET:ok" disk;' in narinfo_map(on)
    assert "disk" not in narinfo_map(off)
    assert off.count('"GET:ok" disk;') == 1  # NARs still from disk: the server asks the push store first


def test_the_server_reads_the_hits_log_only_behind_the_front() -> None:
    front = from_data("cache-a", {"cache_nginx_front": True})
    config = configmod.from_mapping(tomllib.loads(render_config(front)))
    assert config.front_hits_log == Path("/var/lib/nixcache/front-hits.log")
    bare = configmod.from_mapping(tomllib.loads(render_config(from_data("cache-a", {}))))
    assert bare.front_hits_log is None
