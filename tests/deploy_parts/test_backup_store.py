"""The backup repository host's pieces as rendered: htpasswd, units, firewall, the cache's env URL."""

from __future__ import annotations

import base64
import hashlib
import secrets

import pytest
from pyinfra.context import ctx_host, ctx_state
from pyinfra_testing.util import FakeState, create_host

from deploys.parts.backup import backup_config, per_host
from operations import backup, firewall
from operations.settings import SettingsError, from_data


def _in_host(name: str, data: dict | None = None):
    state = FakeState()
    host = create_host(state, facts={}, data=data or {})
    host.name = name
    return ctx_state.use(state), ctx_host.use(host)


def test_htpasswd_holds_one_sha_line_per_host_and_never_the_credential() -> None:
    one, two = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    text = backup.render_htpasswd({"lab2": two, "lab1": one})
    digest = base64.b64encode(hashlib.sha1(one.encode()).digest()).decode()  # noqa: S324 - {SHA} format
    assert text.splitlines()[0] == f"lab1:{{SHA}}{digest}"
    assert [line.split(":")[0] for line in text.splitlines()] == ["lab1", "lab2"]
    assert one not in text and two not in text
    assert backup.render_htpasswd({"lab2": two, "lab1": one}) == text  # a rerun changes nothing


def test_a_short_credential_or_a_bad_user_is_refused_in_one_line() -> None:
    with pytest.raises(SettingsError, match=r"the backup credential of lab1 is 8 characters; .* at least 32"):
        backup.htpasswd_line("lab1", "password")
    with pytest.raises(SettingsError, match=r"'a:b' cannot be a backup repository user"):
        backup.htpasswd_line("a:b", "x" * 40)


def test_the_credential_goes_into_the_url_and_a_url_with_one_is_refused() -> None:
    url = backup.rest_url_with_credential("rest:http://10.0.0.5:8000/lab1/", "lab1", "abc_-XYZ")
    assert url == "rest:http://lab1:abc_-XYZ@10.0.0.5:8000/lab1/"
    with pytest.raises(SettingsError, match=r"carries a user or password; remove it"):
        backup.rest_url_with_credential("rest:http://u:p@10.0.0.5:8000/lab1/", "lab1", "x")


def test_a_rest_repository_leaves_retention_to_the_repository_host() -> None:
    s = from_data("cache-1", {"backup_repository": "rest:http://10.0.0.5:8000/{host}/"})
    config = backup_config(s, "cache-1", "/etc/nixcache/backup.env")
    assert config.repository == "rest:http://10.0.0.5:8000/cache-1/"
    assert config.env_file == "/etc/nixcache/backup.env" and config.apply_retention is False
    local = backup_config(from_data("cache-1", {"backup_repository": "/srv/restic"}), "cache-1")
    assert local.apply_retention is True and local.env_file == ""
    assert per_host("file:///s/backup-credential-{host}", "cache-1") == "file:///s/backup-credential-cache-1"


def test_store_units_bind_one_address_append_only_and_prune_offline() -> None:
    s = from_data("lab2", {"backup_store": True})
    state, host = _in_host("lab2", {"ssh_hostname": "10.231.2.12"})
    with state, host:
        units = backup.render_store_units(s, "/opt/nixcache/venv/bin/nixcache", ["/e/b.toml", "/e/a.toml"])
    server = units[backup.STORE_SERVICE]
    assert "--addr 10.231.2.12:8000 --append-only --private-repos" in server
    assert (
        "--htpasswd /etc/nixcache-backup-store/htpasswd --cache-objects=false /srv/nixcache-backup" in server
    )
    assert "User=nixcache-backup" in server and "ReadWritePaths=/srv/nixcache-backup" in server
    prune = units[backup.PRUNE_SERVICE]
    assert "backup forget \\\n    --config /e/a.toml \\\n    --config /e/b.toml\n" in prune
    assert "PrivateNetwork=true" in prune and "User=nixcache-backup" in prune
    assert "OnCalendar=*-*-* 03:30:00" in units[backup.PRUNE_TIMER]
    state, host = _in_host("lab2", {"ssh_hostname": "0.0.0.0"})  # noqa: S104 - the refused value
    with state, host, pytest.raises(SettingsError, match=r"never a wildcard"):
        backup.render_store_units(s, "/nixcache", ["/e/a.toml"])


def test_the_backup_port_is_open_to_the_cache_hosts_only_on_the_repository_host() -> None:
    data = {"cache_allowed_sources": "10.231.2.0/24", "backup_store_allowed_sources": "10.231.2.11/32"}
    state, host = _in_host("lab2")
    with state, host:
        ruleset = firewall.render_ruleset(
            from_data("lab2", {**data, "backup_store": True}), runs_origin=False
        )
        assert "ip saddr { 10.231.2.11/32 } tcp dport { 8000 } accept" in ruleset
        assert "8000" not in firewall.render_ruleset(from_data("lab2", data), runs_origin=False)
