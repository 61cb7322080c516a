"""A remote builder for the building cache hosts: a bare Debian host becomes a Nix host whose
daemon accepts builds from them.

    pyinfra -y inventories/prod.py --limit builders_remote deploys/builder.py

Base (packages, admins, sshd, kernel, limits), then Debian's Nix with its daemon, nix.conf from
the profile and data (nix_profile, nix_settings), Nix's GC timer, and the login
nix_builder_user that only runs `nix-store --serve --write` with nix_builder_ssh_key_ref's key
and that the daemon trusts. Host data must say nix_builder = True (a guard against running it on
the wrong hosts). The building hosts name this host in their nix_builders, with its host key.
"""

from __future__ import annotations

from pyinfra import host

from deploys.parts.base import base
from deploys.parts.nixhost import nix_host
from operations.settings import SettingsError, settings

s = settings()
if not s.nix_builder:
    raise SettingsError(
        f"{host.name}: host data 'nix_builder' is not True; set it for the remote builders "
        "(group data) or leave this host out with --limit"
    )
base(config=s)
nix_host(config=s)
