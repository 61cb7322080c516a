"""Host data checks and secret reads of operations/settings.py: what an operator sees when they fail."""

from __future__ import annotations

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
def test_a_misspelt_key_in_any_data_layer_is_an_error_suggesting_the_right_one(layer):
    host = _host_in_inventory(layer, {"gc_max_sizee": "1G"})
    with pytest.raises(SettingsError) as error:
        from_data(host.name, host.data)
    assert str(error.value) == (
        "cache-a: host data 'gc_max_sizee' is not a nixcache setting; did you mean 'gc_max_size'?"
    )


def test_correct_keys_from_every_layer_are_read():
    host = _host_in_inventory("override", {"cache_port": "5001"})
    assert from_data(host.name, host.data).cache_port == 5001


def test_pyinfra_connector_keys_are_not_mistaken_for_nixcache_settings():
    host = _host_in_inventory(
        "host", {"ssh_user": "admin", "ssh_port": 2222, "ssh_allowed_sources": ["10.0.0.0/8"]}
    )
    assert from_data(host.name, host.data).ssh_allowed_sources == ("10.0.0.0/8",)
