"""A host that runs Nix: Debian's Nix daemon configured from data, Nix's own GC, remote builders,
the builder side of a remote build, and (where nixcache is installed) build statistics and a
disk alert on /nix/store.

deploys/cache.py runs it on cache hosts that build (nix_host, or group `builders`), which then
also serve their own /nix/store; deploys/builder.py on remote builders (nix_builder) that are
no caches.
"""

from __future__ import annotations

import functools

from pyinfra import host
from pyinfra.api import HiddenValue, deploy

from deploys.parts.backup import public_key
from deploys.parts.base import apt_packages
from nixcache.packages import NIX_HOST_PACKAGES
from nixcache.secrets import ensure_ssh_key
from operations import nixhost
from operations.settings import Settings, host_secret, settings

# Inventory group of cache hosts that run Nix (the same as host data nix_host = True).
BUILDING_GROUP = "builders"


def is_nix_host(s: Settings) -> bool:
    """This cache host runs Nix and serves its own store."""
    return s.nix_host or BUILDING_GROUP in host.groups


def builder_ssh_key(s: Settings) -> HiddenValue:
    """The key the daemon logs in to builders with, which builders authorise (one ref)."""
    return host_secret(
        "remote build ssh key",
        "nix_builder_ssh_key_ref",
        s.nix_builder_ssh_key_ref,
        functools.partial(ensure_ssh_key, generate=s.nix_builder_ssh_key_generate),
    )


@deploy("Nix host: daemon, nix.conf, GC, remote builders")
def nix_host(
    config: Settings | None = None,
    own_cache: str | None = None,
    own_keys: tuple[str, ...] | list[str] = (),
    build: str | None = None,
) -> None:
    """Debian's Nix with its daemon, nix.conf from the profile and data, /etc/nix/machines,
    Nix's GC timer; the remote-build login when nix_builder; with `build` (nixcache installed)
    the statistics timer and the disk alert on /nix/store.

    `own_cache` (URL) and `own_keys`: this host's cache, the first substituter and its keys.
    """
    s = config or settings()
    entries = nixhost.builders(s, host.name)
    ssh_key = builder_ssh_key(s) if entries or s.nix_builder else None
    nix_conf = nixhost.render_nix_conf(s, host.name, own_cache, list(own_keys))
    machines = nixhost.render_machines(entries)

    apt_packages("Install Debian's Nix with its daemon", NIX_HOST_PACKAGES, s)
    nixhost.nix_conf(name=f"{nixhost.NIX_CONF} (profile {s.nix_profile})", content=nix_conf)
    nixhost.machines(
        name=f"{nixhost.MACHINES_FILE}: {len(entries)} remote builder(s)",
        content=machines,
        ssh_key=ssh_key if entries else None,
    )
    if s.nix_builder:
        nixhost.builder_user(
            name=f"Remote build login {s.nix_builder_user}",
            user=s.nix_builder_user,
            public_key=public_key(ssh_key.unmask()),
        )
    nixhost.daemon(name="nix-daemon", depends_on=nixhost.digest(nix_conf, machines))
    nixhost.store_database(name="Nix's database")
    nixhost.gc_timer(name=f"{nixhost.NIX_GC_NAME}.timer", settings=s)
    if build is not None:
        nixhost.stats_timer(name=f"{nixhost.NIX_STATS_NAME}.timer", settings=s, depends_on=build)
        nixhost.disk_alert(name="Disk-usage alert timer for /nix/store", settings=s, depends_on=build)
