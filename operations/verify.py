"""The store checks itself: nixcache-verify.timer runs `nixcache verify` weekly (verify_schedule).

The service is sandboxed as the GC unit (one template, nixcache-batch-sandbox.j2) and runs at
the lowest CPU and I/O priority; see nixcache/server/verify.py for what it checks and moves aside.
"""

from __future__ import annotations

import shlex

from pyinfra.api import operation

from operations.render import render
from operations.service import units
from operations.settings import CONFIG_FILE, NIXCACHE_BIN, Settings

VERIFY_NAME = "nixcache-verify"


def render_units(settings: Settings) -> dict[str, str]:
    """nixcache-verify.service and nixcache-verify.timer for `settings` (file name -> text)."""
    return {
        f"{VERIFY_NAME}.service": render(
            "nixcache-verify.service.j2",
            command=shlex.join([NIXCACHE_BIN, "verify", "--config", CONFIG_FILE]),
            memory_max=settings.cache_memory_max,
            network=False,
            user=settings.service_user,
            data_dir=settings.cache_data_dir,
            mount_unit=settings.cache_volume_device is not None,
        ),
        f"{VERIFY_NAME}.timer": render(
            "nixcache-verify.timer.j2",
            schedule=settings.verify_schedule,
            randomized_delay=settings.verify_randomized_delay,
        ),
    }


@operation()
def timer(settings: Settings, depends_on: str = ""):
    """nixcache-verify.timer installed, enabled and waiting; the service runs only when it fires."""
    yield from units._inner(VERIFY_NAME, render_units(settings), [f"{VERIFY_NAME}.timer"], depends_on)
