"""systemd units: nixcache.service and the generic "install units, restart on change" operation.

A restart is decided on the controller: the operation is given a digest of everything the
running units depend on (unit files, config, key, installed build) and compares it with the
digest the host recorded after the last (re)start. Same digest: nothing happens, so a rerun
reports no changes. Different: reload, enable, restart, record. A unit that should run but
does not is started.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import QuoteString, StringCommand, operation
from pyinfra.facts.files import Sha256File

from facts.nixcache import FileLine, UnitState
from operations.config import file_changes
from operations.render import render, sha256
from operations.settings import CONFIG_FILE, NIXCACHE_BIN, SERVICE_NAME, Settings

UNIT_DIR = "/etc/systemd/system"
STAMP_DIR = "/var/lib/nixcache-deploy"


def render_unit(settings: Settings, nix_store: bool = False) -> str:
    """The text of nixcache.service for `settings`; `nix_store`: it serves this host's Nix store."""
    return render(
        "nixcache.service.j2",
        nixcache_bin=NIXCACHE_BIN,
        config_file=CONFIG_FILE,
        user=settings.service_user,
        data_dir=settings.cache_data_dir,
        mount_unit=settings.cache_volume_device is not None,
        memory_max=settings.cache_memory_max,
        tasks_max=settings.cache_tasks_max,
        limit_nofile=settings.cache_limit_nofile,
        nginx_front=settings.cache_nginx_front,
        nix_store=nix_store,
    )


@operation()
def units(name: str, files: dict[str, str], active: list[str], depends_on: str = ""):
    """Unit `files` (file name -> text) are installed in /etc/systemd/system; `active` units run.

    `active` units are enabled and (re)started whenever the files or `depends_on` (a digest of
    what they read: config, keys, installed build) changed since their last start.
    """
    changed = False
    for filename, text in sorted(files.items()):
        path = f"{UNIT_DIR}/{filename}"
        # Only new content needs a daemon-reload; an owner or mode fix does not.
        changed |= host.get_fact(Sha256File, path=path) != sha256(text)
        yield from file_changes(path, text, "root", "root", "0644")
    if changed:
        yield StringCommand("systemctl daemon-reload")
    digest = sha256("\0".join([*(f"{k}\0{v}" for k, v in sorted(files.items())), depends_on]))
    stamp = f"{STAMP_DIR}/{name}"
    states = {unit: host.get_fact(UnitState, unit=unit) for unit in active}
    quoted = [QuoteString(unit) for unit in active]
    if host.get_fact(FileLine, path=stamp) != digest:
        yield StringCommand("systemctl enable", *quoted)
        yield StringCommand("systemctl restart", *quoted)
        yield StringCommand(
            "install -d -m 0700", STAMP_DIR, "&& echo", QuoteString(digest), ">", QuoteString(stamp)
        )
        return
    stopped = [QuoteString(u) for u, s in states.items() if s["active"] not in ("active", "activating")]
    disabled = [QuoteString(u) for u, s in states.items() if s["enabled"] != "enabled"]
    if disabled:
        yield StringCommand("systemctl enable", *disabled)
    if stopped:
        yield StringCommand("systemctl start", *stopped)
    if not (changed or disabled or stopped):
        host.noop(f"{', '.join(active) or name} up to date and running")


@operation()
def nixcache(settings: Settings, depends_on: str, nix_store: bool = False):
    """nixcache.service installed, enabled and running; restarted when it or `depends_on` changed.

    + nix_store: it serves this host's Nix store (read-only access to it, no daemon socket)
    """
    unit = f"{SERVICE_NAME}.service"
    yield from units._inner(SERVICE_NAME, {unit: render_unit(settings, nix_store)}, [unit], depends_on)
