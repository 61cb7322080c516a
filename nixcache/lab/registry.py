"""Which lab instances exist on this machine, and where their state directories are.

One small file per instance under /run/nixcache-lab/instances/ (gone at reboot, like
everything a lab creates except host roots). It lets `nixcache lab prune` find and remove
labs whose state directory vanished: a test run killed before its teardown, whose temporary
directory was then deleted.
"""

from __future__ import annotations

import os
from pathlib import Path

from nixcache.lab import state as statefile

REGISTRY = Path("/run/nixcache-lab/instances")


def register(instance: str, state_dir: Path) -> None:
    REGISTRY.mkdir(parents=True, exist_ok=True)
    entry = REGISTRY / instance
    tmp = entry.with_name(f".{instance}.tmp")
    tmp.write_text(f"{state_dir}\n")
    os.replace(tmp, entry)


def unregister(instance: str) -> None:
    (REGISTRY / instance).unlink(missing_ok=True)


def entries() -> dict[str, Path]:
    """instance id -> state directory, for every registered lab."""
    if not REGISTRY.is_dir():
        return {}
    return {
        entry.name: Path(entry.read_text().strip())
        for entry in REGISTRY.iterdir()
        if entry.is_file() and not entry.name.startswith(".")
    }


def orphans() -> dict[str, Path]:
    """Registered labs whose state directory no longer describes them."""
    found = {}
    for instance, state_dir in entries().items():
        try:
            current = statefile.load(state_dir)
        except Exception:  # an unreadable state file still names no live lab we could manage
            current = None
        if current is None or current.instance != instance:
            found[instance] = state_dir
    return found
