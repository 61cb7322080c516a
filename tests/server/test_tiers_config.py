"""The [origin] and [[upstreams]] tables: validation names the key and the fix; the negative cache."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from nixcache.server import config as configmod
from nixcache.server.tiers.negative import NegativeCache

KEY = "cache.example.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
ORIGIN = {
    "endpoint": "http://127.0.0.1:8333",
    "bucket": "fleet-prod",
    "access_key_file": "/etc/nixcache/s3-access-key",
    "secret_key_file": "/etc/nixcache/s3-secret-key",
}


def test_tables_round_trip_through_dump() -> None:
    config = configmod.from_mapping(
        {
            "origin": {**ORIGIN, "addressing": "virtual", "narinfo_deadline": 1.5},
            "upstreams": [{"url": "https://cache.example.org/", "public_keys": [KEY]}],
            "negative_ttl": "2m",
        }
    )
    assert config.origin is not None and config.origin.narinfo_deadline == 1.5
    assert config.upstreams[0].name == "cache.example.org"
    assert config.upstreams[0].url == "https://cache.example.org"
    assert config.negative_ttl == 120
    assert configmod.from_mapping(tomllib.loads(configmod.dump(config))) == config


@pytest.mark.parametrize(
    ("origin", "message"),
    [
        ({k: v for k, v in ORIGIN.items() if k != "bucket"}, "'origin.bucket' is required; give a bucket"),
        ({**ORIGIN, "addressing": "dns"}, "'origin.addressing' is 'dns'; give path or virtual"),
        (
            {**ORIGIN, "endpoint": "127.0.0.1:8333"},
            "'origin.endpoint' is '127.0.0.1:8333'; give an http:// or https:// URL",
        ),
        ({**ORIGIN, "endpoint": "http://ak:sk@127.0.0.1"}, "URL without credentials in it"),
        (
            {**ORIGIN, "secret_key": "inline"},
            "unknown key 'origin.secret_key'; did you mean 'secret_key_file'",
        ),
        ({**ORIGIN, "narinfo_deadline": 0}, "'origin.narinfo_deadline' is 0; give a duration above zero"),
        ({**ORIGIN, "bucket": "a/b"}, "'origin.bucket' is 'a/b'; give a bucket name without slashes"),
    ],
)
def test_bad_origin_names_the_key(origin: dict, message: str) -> None:
    with pytest.raises(configmod.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        configmod.from_mapping({"origin": origin})


def test_bad_upstream_key_is_named() -> None:
    message = r"'upstreams\[0\]\.public_keys' is 'nonsense'; give public keys as name:base64"
    with pytest.raises(configmod.ConfigError, match=message):
        configmod.from_mapping({"upstreams": [{"url": "http://127.0.0.1:1", "public_keys": ["nonsense"]}]})


def test_unreadable_credentials_fail_in_one_line(tmp_path: Path) -> None:
    from nixcache.server.tiers.origin import Origin

    config = configmod.from_mapping({"origin": {**ORIGIN, "access_key_file": str(tmp_path / "missing")}})
    with pytest.raises(configmod.ConfigError, match=r"cannot read origin\.access_key_file .*missing"):
        Origin(config.origin)


def test_negative_cache_forgets_after_its_ttl() -> None:
    now = [100.0]
    cache = NegativeCache(ttl=30, max_entries=4, clock=lambda: now[0])
    cache.add("a")
    assert "a" in cache
    now[0] += 31
    assert "a" not in cache
    for name in "bcdef":
        cache.add(name)
    assert "f" in cache and "b" not in cache  # bounded: the oldest went first
    NegativeCache(ttl=0).add("x")  # ttl 0 disables it
    assert "x" not in NegativeCache(ttl=0)
