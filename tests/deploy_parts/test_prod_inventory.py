"""inventories/prod.py as pyinfra's own loader sees it: hosts, groups, addresses, group data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pyinfra.api import State
from pyinfra.context import ctx_state
from pyinfra_cli.inventory import make_inventory

from operations.settings import from_data

ROOT = Path(__file__).resolve().parents[2]
REGIONS = ("eu-central", "us-east", "us-west", "ap-southeast")


def load(inventory_dir: Path):
    with ctx_state.use(State()):
        return make_inventory(str(inventory_dir / "prod.py"), cwd=str(inventory_dir.parent))


@pytest.fixture
def fleet_dir(tmp_path):
    """A copy of inventories/ whose all.py names a fleet domain."""
    target = tmp_path / "inventories"
    shutil.copytree(ROOT / "inventories", target, ignore=shutil.ignore_patterns("__pycache__", "lab.py"))
    all_py = target / "group_data" / "all.py"
    all_py.write_text(all_py.read_text() + '\nfleet_domain = "caches.example.org"\n')
    return target


def caches(inventory):
    return [h for h in inventory if "backups" not in h.groups]


def test_hosts_groups_and_addresses(fleet_dir):
    inventory = load(fleet_dir)
    names = {
        env: sorted(h.name for h in inventory.get_group(env)) for env in ("production", "staging", "canary")
    }
    assert names == {
        "production": sorted(f"cache-{r}.caches.example.org" for r in REGIONS),
        "staging": [
            "cache-eu-central-staging.caches.example.org",
            "cache-us-east-staging.caches.example.org",
        ],
        "canary": ["cache-eu-central-canary.caches.example.org"],
    }
    assert sorted(h.name for h in inventory.get_group("eu_central")) == [
        "cache-eu-central-canary.caches.example.org",
        "cache-eu-central-staging.caches.example.org",
        "cache-eu-central.caches.example.org",
    ]
    assert [h.name for h in inventory.get_group("ap_southeast")] == ["cache-ap-southeast.caches.example.org"]
    assert [h.name for h in inventory.get_group("backups")] == ["backup.caches.example.org"]
    assert len(list(inventory)) == 8


def test_environment_data_and_settings_are_valid(fleet_dir):
    inventory = load(fleet_dir)
    for host in caches(inventory):
        environment = next(g for g in ("production", "staging", "canary") if g in host.groups)
        s = from_data(host.name, host.data)  # raises on a misspelt or ill-typed key
        assert s.signing_key_ref == f"op://nixcache-{environment}/signing-key/secret-key"
        assert s.push_token_ref.startswith(f"op://nixcache-{environment}/")
        assert s.key_name(host.name) == f"nixcache-{environment}-1"
        assert s.apt_update is True and s.cache_nginx_front is True
        assert not s.signing_key_generate  # production keys are never created by a deploy
    eu = inventory.get_host("cache-eu-central.caches.example.org")
    assert from_data(eu.name, eu.data).cache_volume_device == "/dev/sdb"
    staging = inventory.get_host("cache-us-east-staging.caches.example.org")
    assert from_data(staging.name, staging.data).cache_volume_device is None


def test_without_a_fleet_domain_names_never_resolve(fleet_dir):
    all_py = fleet_dir / "group_data" / "all.py"
    all_py.write_text('ssh_user = "root"\n')
    names = sorted(h.name for h in load(fleet_dir))
    assert names[0] == "backup.fleet.example"  # RFC 2606 reserved name
    assert all(name.endswith(".fleet.example") for name in names) and len(names) == 8


def test_each_environment_names_its_origin_and_one_gc_host(fleet_dir):
    """Every cache of an environment shares its bucket (endpoint, bucket, credential refs in
    its vault), and exactly one host of it, by its inventory name, runs the origin's GC."""
    inventory = load(fleet_dir)
    for environment in ("production", "staging", "canary"):
        group = list(inventory.get_group(environment))
        settings = [from_data(h.name, h.data) for h in group]
        assert {s.origin_endpoint for s in settings} == {"https://s3.eu-central-1.amazonaws.com"}
        assert {s.origin_bucket for s in settings} == {f"nixcache-{environment}"}
        for s in settings:
            assert s.origin_access_key_ref == f"op://nixcache-{environment}/origin-s3/access-key-id"
            assert s.origin_secret_key_ref == f"op://nixcache-{environment}/origin-s3/secret-access-key"
            assert not s.origin_credentials_generate  # production credentials come from the operator
        collectors = [h.name for h, s in zip(group, settings, strict=True) if s.origin_gc_host == h.name]
        assert collectors == [
            f"cache-eu-central{'' if environment == 'production' else '-' + environment}.caches.example.org"
        ]


def test_every_cache_backs_up_to_the_repository_host_which_serves_them_all(fleet_dir):
    """One append-only repository host (group `backups`); each cache's repository is its own
    path there (plain http until the repository host serves TLS), with its own credential and
    password in its environment's vault."""
    inventory = load(fleet_dir)
    [store] = inventory.get_group("backups")
    s = from_data(store.name, store.data)
    assert s.backup_store and not s.signing_key_ref and s.backup_store_allowed_sources
    for host in caches(inventory):
        environment = next(g for g in ("production", "staging", "canary") if g in host.groups)
        theirs = from_data(host.name, host.data)
        assert theirs.backup_repository == "rest:http://backup.caches.example.org:8000/{host}/"
        assert theirs.backup_credential_ref == f"op://nixcache-{environment}/backup-{{host}}/rest-credential"
        assert theirs.backup_password_ref == f"op://nixcache-{environment}/backup-{{host}}/restic-password"
        assert not theirs.backup_credential_generate and not theirs.backup_password_generate


def test_the_builder_groups_are_empty_and_their_example_matches_the_schema(fleet_dir):
    """builders and builders_remote exist, empty; the nix_builders example in prod.py's comment
    is a value the schema accepts (uncommented, it would deploy)."""
    inventory = load(fleet_dir)
    assert [h.name for h in inventory.get_group("builders", [])] == []
    text = (fleet_dir / "prod.py").read_text()
    example = text[text.index("#   nix_builders = ") : text.index("#   nix_builder_ssh_key_ref")]
    value = eval("\n".join(line.removeprefix("#") for line in example.splitlines()).split("=", 1)[1])  # noqa: S307
    s = from_data("cache-a", {"nix_builders": value, "nix_builder_ssh_key_ref": "op://v/i/f"})
    assert s.nix_builders[0]["host"] == "build-1.<domain>"
