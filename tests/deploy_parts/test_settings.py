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
