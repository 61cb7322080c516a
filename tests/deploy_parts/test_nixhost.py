"""What a Nix host gets from its data (operations/nixhost.py): nix.conf from a profile and
overrides, /etc/nix/machines, and the one-line errors for data that does not fit."""

from __future__ import annotations

import base64

import pytest

from operations import nixhost
from operations.settings import SettingsError, from_data

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBgvBaVg0NscNhtnIiH6tYRxWwZ7yk/NiQLsi6NI4UTw"
BUILDER = {"host": "builder.example.org", "host_key": HOST_KEY + " root@builder"}


def conf(data: dict, own_cache: str | None = "http://127.0.0.1:5000", keys=("cache-1:AAAA",)) -> dict:
    """nix.conf of `data` as {option: value}, checking that it is one option a line."""
    text = nixhost.render_nix_conf(from_data("cache1", data), "cache1", own_cache, list(keys))
    options = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        assert key not in options, f"{key} twice in\n{text}"
        options[key] = value
    return options


def test_office_is_the_default_profile_with_the_documents_values():
    options = conf({})
    assert {k: options[k] for k in ("max-jobs", "cores", "http-connections", "keep-outputs")} == {
        "max-jobs": "2",
        "cores": "1",
        "http-connections": "25",
        "keep-outputs": "false",
    }
    # Sizes go in bytes: 10G and 25G, the reference's min-free and max-free.
    assert options["min-free"] == str(10 * 2**30) and options["max-free"] == str(25 * 2**30)
    assert options["build-users-group"] == "nixbld" and options["sandbox"] == "false"


def test_a_profile_is_picked_by_name_and_overridden_key_by_key():
    options = conf(
        {"nix_profile": "ci", "nix_settings": {"max-jobs": 6, "min-free": "5G", "keep-going": True}}
    )
    assert options["max-jobs"] == "6"  # overridden
    assert options["cores"] == "4" and options["keep-outputs"] == "true"  # the ci profile's
    assert options["min-free"] == str(5 * 2**30)
    assert options["keep-going"] == "true"  # any nix.conf option
    assert conf({"nix_profile": "workstation"})["http-connections"] == "50"


def test_substituters_are_the_cache_itself_then_the_tiers_from_data_each_with_its_key():
    options = conf(
        {
            "nix_substituters": ["http://cache-eu-2:5000", "https://upstream.example.org"],
            "nix_trusted_public_keys": ["cache-eu-2-1:BBBB", "upstream-1:CCCC"],
        }
    )
    assert (
        options["substituters"] == "http://127.0.0.1:5000 http://cache-eu-2:5000 https://upstream.example.org"
    )
    assert options["trusted-public-keys"] == "cache-1:AAAA cache-eu-2-1:BBBB upstream-1:CCCC"
    # A builder that is no cache: only the tiers from data; nothing, when data names none (never
    # Debian's default of the official cache).
    assert conf({}, own_cache=None, keys=())["substituters"] == ""


def test_a_builder_trusts_its_login_and_a_host_with_builders_reads_machines():
    assert conf({})["trusted-users"] == "root" and conf({})["builders"] == ""
    assert conf({"nix_builder": True, "nix_builder_user": "builds"})["trusted-users"] == "root builds"
    with_builders = {"nix_builders": [BUILDER], "nix_builder_ssh_key_ref": "file:///k"}
    assert conf(with_builders)["builders"] == "@/etc/nix/machines"


def test_machines_pin_each_builders_host_key():
    s = from_data(
        "cache1",
        {
            "nix_builders": [
                BUILDER,
                {**BUILDER, "host": "10.0.0.9", "max_jobs": 8, "features": ["kvm", "big-parallel"]},
            ],
            "nix_builder_ssh_key_ref": "file:///k",
        },
    )
    lines = nixhost.render_machines(nixhost.builders(s, "cache1")).splitlines()[1:]
    pinned = base64.b64encode(HOST_KEY.encode()).decode()
    assert lines == [
        f"ssh://nix-remote@builder.example.org x86_64-linux /etc/nix/builder-ssh-key 1 1 - - {pinned}",
        f"ssh://nix-remote@10.0.0.9 x86_64-linux /etc/nix/builder-ssh-key 8 1 kvm,big-parallel - {pinned}",
    ]
    # What Nix does with the eighth column: base64-decode it into a known_hosts line of its own.
    assert base64.b64decode(lines[0].split()[7]).decode() == HOST_KEY


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"nix_profile": "laptop"},
            "cache1: host data 'nix_profile' is 'laptop'; give one of workstation, office, ci",
        ),
        (
            {"nix_settings": {"substituters": "https://x"}},
            "cache1: host data 'nix_settings' key 'substituters' is set by the deploy; "
            "use nix_substituters instead",
        ),
        (
            {"nix_settings": {"max-free": "lots"}},
            "cache1: host data 'nix_settings' max-free: 'lots' is not a size; "
            "use e.g. 8G, 512M or a number of bytes",
        ),
        (
            {"nix_settings": {"Max_Jobs": 3}},
            "cache1: host data 'nix_settings' key 'Max_Jobs' is not a nix.conf option name; "
            "use e.g. 'max-jobs'",
        ),
        (
            {"nix_builders": [BUILDER]},
            "cache1: host data 'nix_builders' is set but 'nix_builder_ssh_key_ref' is not; give the secret "
            "reference of the SSH key the daemon logs in to builders with",
        ),
        (
            {"nix_builders": [{"host": "b1"}], "nix_builder_ssh_key_ref": "file:///k"},
            "cache1: host data 'nix_builders[0]' host_key is missing or not a public host key; give the "
            "builder's 'ssh-ed25519 AAAA…' (ssh-keyscan b1, checked out of band)",
        ),
        (
            {"nix_builders": [{**BUILDER, "speed": 2}], "nix_builder_ssh_key_ref": "file:///k"},
            "cache1: host data 'nix_builders[0]' has unknown keys ['speed']; use ['features', 'host', "
            "'host_key', 'mandatory_features', 'max_jobs', 'speed_factor', 'system', 'user']",
        ),
    ],
)
def test_data_that_does_not_fit_is_one_line_naming_host_key_and_fix(data, message):
    with pytest.raises(SettingsError) as error:
        s = from_data("cache1", data)
        nixhost.render_nix_conf(s, "cache1")
        nixhost.builders(s, "cache1")
    assert str(error.value) == message


def test_a_misspelt_nix_key_is_caught():
    with pytest.raises(
        SettingsError, match="'nix_profiles' is not a nixcache setting; did you mean 'nix_profile'"
    ):
        from_data("cache1", {"nix_profiles": "ci"})
