"""The lab's SSH key pair and the controller's SSH probes of lab hosts."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from nixcache.lab.command import run

KEY_NAME = "id_ed25519"


def ensure_keypair(state_dir: Path) -> Path:
    """The lab's private key (ed25519, mode 0600), generated on first use; returns its path."""
    key = state_dir / KEY_NAME
    if not key.exists() or not key.with_suffix(".pub").exists():
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        state_dir.mkdir(parents=True, exist_ok=True)
        run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"nixcache-lab@{state_dir}", "-f", str(key)]
        )
    os.chmod(key, 0o600)
    return key


def public_key(key: Path) -> str:
    return key.with_suffix(".pub").read_text().strip()


def known_hosts_file(state_dir: Path) -> Path:
    """Host keys change on every reset, so the lab keeps its own throw-away known_hosts."""
    return state_dir / "known_hosts"


def ssh_argv(key: Path, address: str, port: int, known_hosts: Path, user: str = "root") -> list[str]:
    """`ssh` to a lab host with the lab key, accepting whatever host key it has now."""
    return [
        "ssh",
        "-i",
        str(key),
        "-p",
        str(port),
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "ConnectTimeout=3",
        "-o",
        "LogLevel=ERROR",
        f"{user}@{address}",
    ]


def probe(argv: list[str], command: list[str], timeout: float) -> tuple[int, str]:
    """Run `command` (an argv, quoted for the remote shell) over SSH: (exit code, stripped output).

    (255, reason) on timeout. The output is stdout, or stderr when stdout is empty.
    """
    try:
        result = subprocess.run(
            # ssh joins its arguments with spaces for the remote shell: quote them, or
            # ["sh", "-c", "cat f"] would run `sh -c cat f`.
            [*argv, "--", shlex.join(command)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return 255, "timed out"
    return result.returncode, (result.stdout or result.stderr).strip()
