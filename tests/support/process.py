"""Stopping a child process that the tests started (a `nixcache serve`, an nginx)."""

from __future__ import annotations

import signal
import subprocess


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, so it shuts down as under systemd; SIGKILL if it is still there after `grace` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
