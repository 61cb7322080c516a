"""The one way nixcache runs Nix for itself (tests, the drill, bench, lab helpers).

Every such call gets its settings from here, never from the machine: not from /etc/nix/nix.conf,
not from groups or users that earlier work may have left behind, not from a user's ~/.cache/nix.

- `NIX_CONFIG` carries the settings below, and `NIX_CONF_DIR` points at an empty directory, so the
  machine's nix.conf is never read (Debian's `nix-bin` defaults to `build-users-group = nixbld`, a
  group it does not create: every build fails with "the group 'nixbld' … does not exist").
- `HOME` and the XDG directories are the caller's own: Nix caches narinfo lookups per cache URL
  under ~/.cache/nix, so a pull after a push from the same HOME would reuse the unsigned narinfo
  it uploaded, and a re-push would copy nothing.

Deployed clients are another matter: their nix.conf is written by operations/client.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

# setting -> (value, why)
SETTINGS: dict[str, tuple[str, str]] = {
    "build-users-group": ("", "build as the calling user: Debian's nix-bin creates no nixbld group"),
    "substituters": ("", "look nothing up outside this machine; callers name the caches they use"),
    "sandbox": ("false", "the throwaway closures run /bin/sh from the host"),
    "experimental-features": ("nix-command", "`nix copy` and `nix store` are part of nix-command"),
}


def nix_config(extra: Mapping[str, str] | None = None) -> str:
    """The NIX_CONFIG text: SETTINGS, then `extra` (which may override them)."""
    values = {name: value for name, (value, _why) in SETTINGS.items()}
    values.update(extra or {})
    return "".join(f"{name} = {value}\n" for name, value in values.items())


def environ(
    home: Path, extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment for a Nix call with its own `home` (created if absent) and settings."""
    home.mkdir(parents=True, exist_ok=True)
    conf_dir = home / ".nix-conf-dir"  # stays empty: the machine's nix.conf is not read
    conf_dir.mkdir(exist_ok=True)
    env = dict(os.environ if base is None else base)
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        NIX_CONF_DIR=str(conf_dir),
        NIX_USER_CONF_FILES="",
        NIX_CONFIG=nix_config(extra),
    )
    return env


def run(
    argv: Sequence[str],
    home: Path,
    extra: Mapping[str, str] | None = None,
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a Nix command (`nix …`, `nix-build …`, `nix-store …`) with its own home and settings;
    `env` adds variables that are not settings (NIX_SSL_CERT_FILE: Nix 2.8 has no ssl-cert-file
    setting). Output captured as text, the exit status left to the caller."""
    return subprocess.run(
        list(argv),
        env={**environ(home, extra), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class BuildError(Exception):
    """nix-build failed; the message carries Nix's own last lines."""


def build(expression: str, work: Path, timeout: float = 300) -> str:
    """Build the Nix `expression` (salt it so its paths are new) into /nix/store and return the top
    store path. Runs as the caller, without a sandbox: the lab controller and CI run as root."""
    work.mkdir(parents=True, exist_ok=True)
    expr = work / "closure.nix"
    expr.write_text(expression)
    built = run(["nix-build", "--no-out-link", str(expr)], home=work / "home-build", timeout=timeout)
    if built.returncode != 0:
        tail = " | ".join(built.stderr.strip().splitlines()[-3:])
        raise BuildError(f"nix-build {expr} failed (exit {built.returncode}): {tail}")
    return built.stdout.strip().splitlines()[-1]
