"""Host data of the tiers: the cache's [origin] and [[upstreams]] tables, the origin gc units,
the S3 port in the firewall, SeaweedFS's unit."""

from __future__ import annotations

import tomllib

import pytest
from pyinfra.context import ctx_host, ctx_state
from pyinfra_testing.util import FakeState, create_host

from nixcache.server import config as configmod
from operations import firewall, gc, origin
from operations.config import render_config
from operations.settings import SettingsError, from_data

UPSTREAM_KEY = "cache.example.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="


def _in_host(name: str, data: dict | None = None):
    state = FakeState()
    host = create_host(state, facts={}, data=data or {})
    host.name = name
    return ctx_state.use(state), ctx_host.use(host)


def test_origin_endpoint_renders_the_origin_table_the_server_reads() -> None:
    s = from_data(
        "cache-eu-central",
        {
            "origin_endpoint": "http://10.0.0.5:8333/",
            "origin_bucket": "fleet-prod",
            "origin_gc_max_size": "2T",
            "origin_upstreams": [{"url": "https://cache.example.org", "public_keys": [UPSTREAM_KEY]}],
        },
    )
    state, host = _in_host("cache-eu-central")
    with state, host:
        text = render_config(s)
    config = configmod.from_mapping(tomllib.loads(text))
    assert config.origin is not None
    assert (config.origin.endpoint, config.origin.bucket) == ("http://10.0.0.5:8333", "fleet-prod")
    assert str(config.origin.secret_key_file) == "/etc/nixcache/s3-secret-key"
    assert config.origin.gc_max_size == 2 * 1024**4 and config.origin.gc_older_than == 180 * 86400
    assert config.upstreams[0].name == "cache.example.org"
    assert 'secret_key_file = "/etc/nixcache/s3-secret-key"' in text  # a path, never the key


def test_no_origin_endpoint_leaves_the_cache_an_island() -> None:
    state, host = _in_host("cache-eu-central")
    with state, host:
        config = configmod.from_mapping(tomllib.loads(render_config(from_data("cache-eu-central", {}))))
    assert config.origin is None and config.upstreams == []


def test_a_bad_upstream_names_the_host_data_key() -> None:
    s = from_data(
        "cache-eu-central", {"origin_upstreams": [{"url": "ftp://x", "public_keys": [UPSTREAM_KEY]}]}
    )
    state, host = _in_host("cache-eu-central")
    with state, host, pytest.raises(SettingsError, match=r"cache-eu-central: host data 'origin_upstreams'"):
        render_config(s)


def test_only_the_origin_gc_host_gets_the_origin_gc_units_with_network() -> None:
    s = from_data("lab1", {"origin_endpoint": "http://10.0.0.5:8333", "origin_gc_host": "lab1"})
    units = gc.render_origin_units(s)
    service = units["nixcache-gc-origin.service"]
    assert "gc --origin --config /etc/nixcache/config.toml" in service
    assert "PrivateNetwork" not in service and "AF_INET" in service
    local = gc.render_units(s)["nixcache-gc.service"]
    assert "PrivateNetwork=true" in local and "RestrictAddressFamilies=AF_UNIX" in local


def test_the_s3_port_is_open_to_origin_allowed_sources_only() -> None:
    lab = "10.231.2.0/24"
    s = from_data("lab1", {"origin_allowed_sources": lab, "cache_allowed_sources": lab})
    state, host = _in_host("lab1")
    with state, host:
        ruleset = firewall.render_ruleset(s, runs_origin=True)
    assert "ip saddr { 10.231.2.0/24 } tcp dport { 8333 } accept" in ruleset
    state, host = _in_host("lab2")
    with state, host:
        lab2 = from_data("lab2", {"cache_allowed_sources": lab})
        assert "8333" not in firewall.render_ruleset(lab2, runs_origin=True)


def test_seaweedfs_unit_binds_one_address_and_refuses_a_wildcard() -> None:
    s = from_data("lab1", {"origin_bind_address": "10.231.2.11"})
    state, host = _in_host("lab1")
    with state, host:
        unit = origin.render_unit(s)
    assert "-ip.bind=10.231.2.11" in unit and "-master.telemetry=false" in unit
    assert "-s3.port=8333" in unit and "-s3.config=/etc/seaweedfs/s3.json" in unit
    wildcard = from_data("lab1", {"origin_bind_address": "0.0.0.0"})  # noqa: S104 - refused
    state, host = _in_host("lab1")
    with state, host, pytest.raises(Exception, match="never a wildcard"):
        origin.render_unit(wildcard)


def test_a_hung_seaweedfs_stop_is_killed_after_ten_seconds() -> None:
    """SeaweedFS's own shutdown can hang, and systemd's default would wait 90 s: SIGTERM to
    weed, then SIGKILL to the whole unit 10 s later."""
    state, host = _in_host("lab1")
    with state, host:
        unit = origin.render_unit(from_data("lab1", {"origin_bind_address": "10.231.2.11"}))
    service = unit.split("[Service]", 1)[1].split("\n[", 1)[0]
    assert "\nTimeoutStopSec=10s\n" in service and "\nKillMode=mixed\n" in service
