"""systemd units: the one "install these units, restart them when they changed" operation, and
nixcache.service built on it.

Every unit text is rendered by `operations.render.render` from a template in
operations/templates/ (one directory) and written by the one file primitive, `hostfile.put`.
systemd re-reads unit files only on `daemon-reload`, which runs only when a unit's content
changed (an owner or mode fix needs none).

A restart is decided on the controller: the operation is given a digest of everything the
running units depend on (unit files, config, key, installed build) and compares it with the
digest the host recorded after the last (re)start. Same digest: nothing happens, so a rerun
reports no changes. Different: restart (or start), record. Whether a unit runs and is enabled
is pyinfra's own `systemd.service` (facts `SystemdStatus`, `SystemdEnabled`).
"""

from __future__ import annotations

import dataclasses
import re

from pyinfra import host
from pyinfra.api import QuoteString, StringCommand, operation
from pyinfra.operations import systemd

from facts.nixcache import CalendarRejected, FileLine
from nixcache.schema import CALENDAR, kind_of
from operations import hostfile
from operations.render import render, sha256
from operations.settings import CONFIG_FILE, NIXCACHE_BIN, SERVICE_NAME, Settings, SettingsError

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


_ON_CALENDAR = re.compile(r"^OnCalendar=(.*)$", re.MULTILINE)
_CALENDAR_KEYS = tuple(f.name for f in dataclasses.fields(Settings) if kind_of(f) is CALENDAR)


def check_calendars(timers: dict[str, str]) -> None:
    """Refuse, while the deploy is still being planned (nothing changed yet), a timer (path ->
    text) whose OnCalendar= the host's systemd cannot parse: systemd would load it and never
    run it. The error names the host data key that holds the value (a CALENDAR setting).
    """
    events = {event.strip(): path for path, text in timers.items() for event in _ON_CALENDAR.findall(text)}
    if not events:
        return
    for event in host.get_fact(CalendarRejected, events=sorted(events)) or []:
        keys = [key for key in _CALENDAR_KEYS if host.data.get(key) == event]
        where = f"host data '{keys[0]}'" if keys else f"{events[event]}'s OnCalendar="
        raise SettingsError(
            f"{host.name}: {where} is {event!r}, which `systemd-analyze calendar` on the host "
            f"rejects; {CALENDAR.fix} (systemd.time(7))"
        )


@operation()
def units(stamp: str, files: dict[str, str], active: list[str] | tuple[str, ...] = (), depends_on: str = ""):
    """Unit `files` are installed in /etc/systemd/system; `active` units are enabled and running,
    and (re)started whenever the files or `depends_on` changed since their last start.

    + stamp: the name the host records the digest under (/var/lib/nixcache-deploy/<stamp>)
    + files: unit file name (or drop-in, ``x.service.d/60-y.conf``) -> text rendered from
      operations/templates/
    + active: units to enable and keep running (a timer, not its service; may be units that a
      package installed, with no files here)
    + depends_on: a digest of what the units read besides their files (config, keys, the build)

    **Example:**

    .. code:: python

        service.units(
            name="nixcache-gc.timer",
            stamp="nixcache-gc",
            files=gc.render_units(settings),
            active=["nixcache-gc.timer"],
            depends_on=build,
        )
    """
    paths = {f"{UNIT_DIR}/{filename}": text for filename, text in sorted(files.items())}
    # Only new content needs a daemon-reload; an owner or mode fix does not.
    changed = [path for path, text in paths.items() if hostfile.differs(path, text)]
    check_calendars({path: paths[path] for path in changed if path.endswith(".timer")})
    for path, text in paths.items():
        yield from hostfile.put._inner(path, text)
    if changed:
        yield from systemd.daemon_reload._inner()
    digest = sha256("\0".join([*(f"{k}\0{v}" for k, v in sorted(files.items())), depends_on]))
    record = f"{STAMP_DIR}/{stamp}"
    restart = host.get_fact(FileLine, path=record) != digest
    for unit in active:
        yield from systemd.service._inner(unit, running=True, enabled=True, restarted=restart)
    if restart:
        yield StringCommand(
            "install -d -m 0700", STAMP_DIR, "&& echo", QuoteString(digest), ">", QuoteString(record)
        )


@operation()
def nixcache(settings: Settings, depends_on: str, nix_store: bool = False):
    """nixcache.service installed, enabled and running; restarted when it or `depends_on` changed.

    + nix_store: it serves this host's Nix store (read-only access to it, no daemon socket)
    """
    unit = f"{SERVICE_NAME}.service"
    yield from units._inner(SERVICE_NAME, {unit: render_unit(settings, nix_store)}, [unit], depends_on)
