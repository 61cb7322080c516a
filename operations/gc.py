"""Automatic garbage collection from day one: nixcache-gc.timer runs `nixcache gc --config`, whose
store and limits are the gc_* keys of /etc/nixcache/config.toml (rendered from host data)."""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import operation

from operations.render import render
from operations.service import units
from operations.settings import CONFIG_FILE, NIXCACHE_BIN, Settings

GC_NAME = "nixcache-gc"
ORIGIN_GC_NAME = "nixcache-gc-origin"


def gc_command() -> str:
    """The ExecStart line of nixcache-gc.service: the store and every limit come from config.toml
    (the gc_* keys the deploy renders there), so the file is the one source of truth."""
    return shlex.join([NIXCACHE_BIN, "gc", "--config", CONFIG_FILE])


def render_units(settings: Settings) -> dict[str, str]:
    """nixcache-gc.service and nixcache-gc.timer for `settings` (file name -> text)."""
    common = {
        "user": settings.service_user,
        "data_dir": settings.cache_data_dir,
        "mount_unit": settings.cache_volume_device is not None,
    }
    return {
        f"{GC_NAME}.service": render(
            "nixcache-gc.service.j2",
            command=gc_command(),
            memory_max=settings.cache_memory_max,
            network=False,
            what="the cache store",
            **common,
        ),
        f"{GC_NAME}.timer": render(
            "nixcache-gc.timer.j2",
            schedule=settings.gc_schedule,
            randomized_delay=settings.gc_randomized_delay,
        ),
    }


@operation()
def timer(settings: Settings, depends_on: str = ""):
    """nixcache-gc.timer installed, enabled and waiting; the service runs only when the timer fires."""
    yield from units._inner(GC_NAME, render_units(settings), [f"{GC_NAME}.timer"], depends_on)


def render_origin_units(settings: Settings) -> dict[str, str]:
    """nixcache-gc-origin.service and .timer: `nixcache gc --origin` with the [origin] table's
    gc_older_than / gc_max_size (from origin_gc_older_than / origin_gc_max_size)."""
    return {
        f"{ORIGIN_GC_NAME}.service": render(
            "nixcache-gc.service.j2",
            command=shlex.join([NIXCACHE_BIN, "gc", "--origin", "--config", CONFIG_FILE]),
            memory_max=settings.cache_memory_max,
            network=True,
            what="the origin bucket",
            user=settings.service_user,
            data_dir=settings.cache_data_dir,
            mount_unit=False,
        ),
        f"{ORIGIN_GC_NAME}.timer": render(
            "nixcache-gc.timer.j2",
            schedule=settings.gc_schedule,
            randomized_delay=settings.gc_randomized_delay,
            what="the origin bucket",
        ),
    }


@operation()
def origin_timer(settings: Settings, host_name: str, depends_on: str = ""):
    """On `origin_gc_host` only: nixcache-gc-origin.timer installed, enabled and waiting."""
    if host_name != settings.origin_gc_host or not settings.origin_endpoint:
        host.noop(f"{host_name} does not collect the origin (origin_gc_host: {settings.origin_gc_host})")
        return
    yield from units._inner(
        ORIGIN_GC_NAME, render_origin_units(settings), [f"{ORIGIN_GC_NAME}.timer"], depends_on
    )
