"""Facts about the host's kernel tunables and login hardening."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


class SysctlState(FactBase):
    """Current value of each kernel parameter and whether this host may change it.

    Returns ``{key: {"value": "4096 131072 6291456" | None, "writable": bool}}``. A key is
    not writable when its /proc/sys file is absent (a network namespace hides the
    parameters that only the initial namespace owns, e.g. ``net.core.rmem_max``) or
    read-only (systemd-nspawn mounts /proc/sys read-only apart from the container's own
    network namespace). Multi-value parameters are normalised to single spaces.
    """

    def command(self, keys: str) -> str:
        """``keys``: space-separated parameter names (a string keeps the fact key readable)."""
        quoted = " ".join(shlex.quote(key) for key in keys.split())
        return (
            f'for k in {quoted}; do p=/proc/sys/$(printf %s "$k" | tr . /); '
            'if [ ! -e "$p" ]; then echo "$k -"; '
            'elif [ -w "$p" ]; then echo "$k w $(cat "$p")"; '
            'else echo "$k r $(cat "$p" 2>/dev/null)"; fi; done'
        )

    def process(self, output: list[str]) -> dict[str, dict[str, object]]:
        state: dict[str, dict[str, object]] = {}
        for line in output:
            parts = line.split()
            if len(parts) < 2:
                continue
            key, access, value = parts[0], parts[1], " ".join(parts[2:])
            state[key] = {
                "value": None if access == "-" else value,
                "writable": access == "w",
            }
        return state
