"""Host data checks and secret reads of operations/settings.py: what an operator sees when they fail."""

from __future__ import annotations

import tomllib

import pytest
from pyinfra.api import StringCommand
from pyinfra.context import ctx_host, ctx_state
from pyinfra_testing.util import FakeState, create_host

from operations.settings import SettingsError, from_data, host_secret


def test_an_unknown_rotate_phase_names_the_host_the_key_and_the_choices():
    with pytest.raises(SettingsError) as error:
        from_data("cache-eu-central", {"rotate_phase": "finish"})
    assert str(error.value) == (
        "cache-eu-central: host data 'rotate_phase' is 'finish'; give introduce or retire"
    )
    assert from_data("cache-eu-central", {"rotate_phase": "retire"}).rotate_phase == "retire"


def _in_host(name: str):
    state = FakeState()
    host = create_host(state, facts={})
    host.name = name
    return ctx_state.use(state), ctx_host.use(host)


def test_a_read_only_secret_is_masked_and_a_missing_one_names_host_and_key(tmp_path):
    (tmp_path / "webhook").write_text("https://hooks.example/T0K3N\n")
    state_ctx, host_ctx = _in_host("cache-us-east")
    with state_ctx, host_ctx:
        ref = f"file://{tmp_path / 'webhook'}"
        url = host_secret("alert webhook URL", "alert_webhook_ref", ref)
        assert url.unmask().strip() == "https://hooks.example/T0K3N"
        masked = StringCommand("echo", url).get_masked_value()
        assert "T0K3N" not in masked and f"<alert webhook URL {ref}>" in masked
        with pytest.raises(SettingsError) as error:
            host_secret("TLS key", "tls_key_ref", f"file://{tmp_path / 'absent'}")
    assert str(error.value).startswith("cache-us-east: TLS key (tls_key_ref): ")


def _host_in_inventory(layer: str, data: dict):
    """A real pyinfra 3.10 host whose `layer` (host, group, all or --data override) holds `data`."""
    from pyinfra.api import Config, Inventory, State

    layers = {"host": {}, "group": {}, "all": {}, "override": {}}
    layers[layer] = data
    inventory = Inventory(
        (["cache-a"], layers["host"]),
        override_data=layers["override"],
        production=(["cache-a"], layers["group"]),
        all=(["cache-a"], layers["all"]),
    )
    State(inventory, Config())
    return inventory.get_host("cache-a")


@pytest.mark.parametrize("layer", ["host", "group", "all", "override"])
@pytest.mark.parametrize(
    ("key", "meant"),
    [
        ("gc_max_sizee", "gc_max_size"),  # a declared prefix
        ("cahce_memory_max", "cache_memory_max"),  # a misspelt prefix: no declared key starts so
        ("nix_gc_schedul", "nix_gc_schedule"),
        ("backup_repositry", "backup_repository"),
        ("memory_max", None),  # no prefix at all, and too far from any key: left alone
    ],
)
def test_a_misspelt_key_in_any_data_layer_is_an_error_suggesting_the_right_one(layer, key, meant):
    host = _host_in_inventory(layer, {key: "1G"})
    if meant is None:
        from_data(host.name, host.data)
        return
    with pytest.raises(SettingsError) as error:
        from_data(host.name, host.data)
    assert str(error.value) == (
        f"cache-a: host data '{key}' is not a nixcache setting; did you mean '{meant}'?"
    )


def test_keys_nixcache_does_not_own_are_never_mistaken_for_misspellings():
    """pyinfra's connector keys and operation arguments, and the inventories' own keys: each is
    further from every declared key than the cut-off, so a deploy reading them never fails."""
    from pyinfra.connectors.docker import connector_data_meta as docker_keys
    from pyinfra.connectors.ssh import connector_data_meta as ssh_keys

    foreign = {key: "x" for key in [*ssh_keys, *docker_keys]}
    foreign |= {"_sudo": True, "_su_user": "x", "_use_sudo_password": "x"}
    foreign |= {"lab_address": "x", "lab_network": "x", "lab_controller_address": "x"}
    foreign |= {"lab_state_dir": "x", "fleet_domain": "x"}
    assert from_data("cache-a", foreign).cache_port == 5000


def test_correct_keys_from_every_layer_are_read():
    host = _host_in_inventory("override", {"cache_port": "5001"})
    assert from_data(host.name, host.data).cache_port == 5001


def test_pyinfra_connector_keys_are_not_mistaken_for_nixcache_settings():
    host = _host_in_inventory(
        "host", {"ssh_user": "admin", "ssh_port": 2222, "ssh_allowed_sources": ["10.0.0.0/8"]}
    )
    assert from_data(host.name, host.data).ssh_allowed_sources == ("10.0.0.0/8",)


@pytest.mark.parametrize(
    ("key", "value", "fix"),
    [
        ("gc_max_size", "banana", "give a size such as 10G, 512M or a number of bytes"),
        ("gc_older_than", "a month", "give a duration such as 30d, 12h, 90m, 1w2d or a number of seconds"),
        (
            "cache_memory_max",
            "lots",
            "give a systemd memory limit: bytes with K, M, G or T (512M, 2G), a percentage (50%) or infinity",
        ),
        ("cache_allowed_sources", ["10.0.0.0/8", "10.0.0.300/24"], "give networks such as 10.0.0.0/24"),
        ("cache_port", 70000, "give a TCP port from 1 to 65535"),
        ("cache_port", "http", "give a TCP port from 1 to 65535"),
        ("gc_randomized_delay", "soon", "give a systemd time span such as 30m, 2week or 1h 30min"),
        ("monitoring_retention", "30 days", "give a Prometheus duration such as 30s, 5m or 30d"),
        ("cache_nginx_front", "maybe", "give true or false"),
        ("signing_key_ref", "secrets/key", "give a secret reference: op://vault/item/field"),
        ("cache_download_compression", "gzip", "give none or zstd"),
        ("cache_download_compression_level", 22, "give a whole number from 1 to 19"),
        # The checks operations/monitoring.py and hardening.sshd no longer repeat:
        ("journald_max_retention", "two weeks", "give a systemd time span such as 30m, 2week or 1h 30min"),
        ("journald_system_max_use", "1 gig", "give bytes with K, M, G or T, e.g. 500M or 1G"),
        ("disk_alert_threshold_percent", 101, "give a whole number from 1 to 100"),
        ("disk_alert_threshold_percent", 0, "give a whole number from 1 to 100"),
        ("node_exporter_listen", "9100", "give [address]:port, e.g. 127.0.0.1:9090 or :9100"),
        ("ssh_permit_root_login", "maybe", "give one of yes, no, prohibit-password, forced-commands-only"),
    ],
)
def test_each_kind_of_bad_value_is_one_line_naming_host_key_value_and_fix(key, value, fix):
    with pytest.raises(SettingsError) as error:
        from_data("cache-eu-central", {key: value})
    message = str(error.value)
    assert message.startswith(f"cache-eu-central: host data '{key}' is {value!r}; {fix}")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        # What `pyinfra --data key=value` hands over (strings, or ints/JSON it parsed itself).
        ("gc_max_size", "1G", 1024**3),
        ("gc_older_than", "12h", 12 * 3600.0),
        ("cache_memory_max", "50%", "50%"),
        ("cache_memory_max", 2147483648, "2147483648"),
        ("cache_allowed_sources", "10.0.0.0/8, 192.0.2.0/24", ("10.0.0.0/8", "192.0.2.0/24")),
        ("cache_port", 5001, 5001),
        ("cache_nginx_front", "yes", True),
        ("gc_max_size", "", None),  # an optional key set empty on the command line: unset
        ("origin_seaweedfs_version", 4.48, "4.48"),
    ],
)
def test_values_as_the_command_line_gives_them_are_converted(key, text, expected):
    assert getattr(from_data("cache-eu-central", {key: text}), key) == expected


def test_the_server_config_gets_the_converted_limits():
    from nixcache.server import config as configmod
    from operations.config import render_config

    s = from_data("cache-a", {"gc_max_size": "50G", "gc_older_than": "90d", "gc_min_free": "5G"})
    config = configmod.from_mapping(tomllib.loads(render_config(s)))
    assert (config.gc_max_size, config.gc_older_than, config.gc_min_free, config.gc_max_free) == (
        50 * 1024**3,
        90 * 86400.0,
        5 * 1024**3,
        25 * 1024**3,
    )


def test_the_server_config_gets_the_download_compression():
    from nixcache.server import config as configmod
    from operations.config import render_config

    default = configmod.from_mapping(tomllib.loads(render_config(from_data("cache-a", {}))))
    assert (default.download_compression, default.download_compression_level) == ("zstd", 1)
    s = from_data("cache-a", {"cache_download_compression": "none", "cache_download_compression_level": "3"})
    config = configmod.from_mapping(tomllib.loads(render_config(s)))
    assert (config.download_compression, config.download_compression_level) == ("none", 3)
