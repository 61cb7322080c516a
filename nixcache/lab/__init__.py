"""Local lab hosts: Debian bookworm under systemd-nspawn, one network namespace each.

Public API: `Lab` (up, status, reset, down, host, run), `Host` records and `LabError`.
"""

from nixcache.lab.errors import LabError, LabNotUpError, PrerequisiteError, UnknownHostError
from nixcache.lab.lab import Lab, default_state_dir
from nixcache.lab.state import Host, LabState

__all__ = [
    "Host",
    "Lab",
    "LabError",
    "LabNotUpError",
    "LabState",
    "PrerequisiteError",
    "UnknownHostError",
    "default_state_dir",
]
