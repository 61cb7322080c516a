"""How deploys/client.py finds the caches: URLs, public keys and read tokens from the inventory."""

from __future__ import annotations

import pytest
from pyinfra.api import Inventory

from nixcache.keys import SecretKey
from nixcache.secrets import resolve
from operations.client import cache_url, caches_for, render_netrc, render_nix_conf
from operations.settings import SettingsError, from_data


def _inventory(tmp_path, front: bool = False, token: bool = False):
    refs = {}
    for name in ("cache-a", "cache-b"):
        key = SecretKey.generate(f"{name}-1")
        (tmp_path / name).write_text(key.serialize() + "\n")
        refs[name] = (f"file://{tmp_path / name}", str(key.public()))
    (tmp_path / "read-token").write_text("s3cr3t-read\n")
    hosts = [
        ("cache-a", {"ssh_hostname": "10.0.0.1", "signing_key_ref": refs["cache-a"][0]}),
        ("cache-b", {"signing_key_ref": refs["cache-b"][0], "cache_port": 5001}),
        ("client-1", {}),
    ]
    group_data = {"cache_nginx_front": front}
    if token:
        group_data["read_token_ref"] = f"file://{tmp_path / 'read-token'}"
    inventory = Inventory((hosts, {}), caches=(["cache-a", "cache-b"], group_data))
    return inventory, refs


def test_group_caches_in_inventory_order_with_derived_public_keys(tmp_path):
    inventory, refs = _inventory(tmp_path)
    s = from_data("client-1", {"client_cache_group": "caches"})
    caches = caches_for("client-1", s, inventory, resolve)
    assert [c.url for c in caches] == ["http://10.0.0.1:5000", "http://cache-b:5001"]
    assert [c.public_key for c in caches] == [refs["cache-a"][1], refs["cache-b"][1]]
    assert render_netrc(caches) == ""


def test_front_gives_https_urls_and_tokens_give_netrc(tmp_path):
    inventory, _ = _inventory(tmp_path, front=True, token=True)
    s = from_data("client-1", {"client_cache_group": "caches"})
    caches = caches_for("client-1", s, inventory, resolve)
    assert [c.url for c in caches] == ["https://10.0.0.1", "https://cache-b"]
    assert render_netrc(caches) == (
        "machine 10.0.0.1 login nixcache password s3cr3t-read\n"
        "machine cache-b login nixcache password s3cr3t-read\n"
    )
    assert "s3cr3t" not in repr(caches[0].read_token) and "s3cr3t" not in str(caches[0].read_token)


def test_explicit_urls_win_and_use_the_clients_token(tmp_path):
    inventory, _ = _inventory(tmp_path)
    (tmp_path / "tok").write_text("client-token")
    s = from_data(
        "client-1",
        {"client_caches": ["http://a:5000/", "https://b"], "read_token_ref": f"file://{tmp_path / 'tok'}"},
    )
    caches = caches_for("client-1", s, inventory, resolve)
    assert [c.url for c in caches] == ["http://a:5000", "https://b"]
    assert render_netrc(caches).splitlines()[1] == "machine b login nixcache password client-token"


def test_errors_name_the_host_and_the_fix(tmp_path):
    inventory, _ = _inventory(tmp_path)
    with pytest.raises(SettingsError, match=r"^client-1: neither 'client_caches' nor 'client_cache_group'"):
        caches_for("client-1", from_data("client-1", {}), inventory, resolve)
    with pytest.raises(SettingsError, match=r"group 'nope' .* has no hosts"):
        caches_for("client-1", from_data("client-1", {"client_cache_group": "nope"}), inventory, resolve)
    (tmp_path / "cache-a").write_text("not a key")
    with pytest.raises(
        SettingsError, match=r"^cache-a: the signing key at file://.* is not a Nix secret key"
    ):
        caches_for("client-1", from_data("client-1", {"client_cache_group": "caches"}), inventory, resolve)


def test_cache_url_port_and_conf_order():
    assert cache_url("h", {"cache_nginx_front": True, "nginx_https_port": 8443}) == "https://h:8443"
    conf = render_nix_conf(["http://mine:5000", "https://upstream"], ["k:1", "k:2"], netrc=True)
    assert "substituters = http://mine:5000 https://upstream\n" in conf
    assert "trusted-public-keys = k:1 k:2\n" in conf
    assert conf.endswith("netrc-file = /etc/nix/nixcache-netrc\n")
    assert "netrc-file" not in render_nix_conf(["http://mine:5000"], [], netrc=False)


def test_a_host_that_names_caches_is_their_client_and_no_cache():
    from operations.client import is_cache, is_client

    cache, client = from_data("cache-a", {}), from_data("client-1", {"client_cache_group": "caches"})
    assert (is_cache(cache), is_client(cache)) == (True, False)
    assert (is_cache(client), is_client(client)) == (False, True)
    by_url = from_data("ci-1", {"client_caches": ["http://cache-a:5000"]})
    assert (is_cache(by_url), is_client(by_url)) == (False, True)
