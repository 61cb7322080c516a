"""The base part's checks of admin data: what an operator sees when the data is wrong."""

from __future__ import annotations

import pytest

from deploys.parts.base import admin_users, check_root_login
from operations.settings import SettingsError

# Only the header line, which is what the check looks for: no key material in the repository.
PRIVATE_KEY_HEADER = "-----BEGIN OPENSSH " + "PRIVATE KEY-----"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBcZ8tQ0sYqo7QnA4yG3J5s2b7yF1n8mP3i0p2a1o9Xk alice@laptop"


def test_normalises_a_valid_entry():
    users = admin_users(
        "cache-eu-central", [{"name": "alice", "ssh_keys": KEY, "sudo": True}, {"name": "bob"}]
    )
    assert users == [
        {"name": "alice", "ssh_keys": [KEY], "sudo": True},
        {"name": "bob", "ssh_keys": [], "sudo": False},
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("alice", "'admin_users' is str; give a list"),
        ([{"name": "Alice"}], "'admin_users[0]' name 'Alice' is not a valid login"),
        ([{"name": "root"}], "(not root)"),
        ([{"name": "alice", "keys": []}], "unknown keys ['keys']"),
        ([{"name": "alice", "sudo": "yes"}], "sudo is 'yes'; give True or False"),
        ([{"name": "alice", "ssh_keys": [PRIVATE_KEY_HEADER]}], "holds a private key"),
        ([{"name": "alice"}, {"name": "alice"}], "names a user twice"),
    ],
)
def test_rejects_bad_entries_naming_host_and_entry(value, message):
    with pytest.raises(SettingsError) as error:
        admin_users("cache-eu-central", value)
    assert str(error.value).startswith("cache-eu-central: host data 'admin_users")
    assert message in str(error.value)


def test_root_login_no_needs_an_admin_with_sudo_and_key():
    with pytest.raises(SettingsError, match="nobody could administer the host"):
        check_root_login("cache-us-east", "no", [{"name": "bob", "ssh_keys": [KEY], "sudo": False}])
    check_root_login("cache-us-east", "no", [{"name": "alice", "ssh_keys": [KEY], "sudo": True}])
    check_root_login("lab-1", "prohibit-password", [])
