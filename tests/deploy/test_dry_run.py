"""`pyinfra --dry` creates no missing secret: the deploys ask pyinfra's command line (no lab needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

DEPLOY = """
import functools
from nixcache.secrets import ensure_token
from operations.settings import dry_run, host_secret

print("dry run:", dry_run())
token = host_secret("push token", "push_token_ref", {ref!r}, functools.partial(ensure_token, generate=True))
print("masked as", token)
"""


def run_pyinfra(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    deploy = tmp_path / "deploy.py"
    deploy.write_text(DEPLOY.format(ref=f"file://{tmp_path}/secrets/push-token"))
    return subprocess.run(
        [sys.executable, "-m", "pyinfra", *flags, "@local", str(deploy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dry_run_stores_no_new_secret_and_says_so(tmp_path: Path) -> None:
    done = run_pyinfra(tmp_path, "--dry")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dry run: True" in done.stdout
    assert f"dry run: file://{tmp_path}/secrets/push-token does not exist yet" in done.stdout + done.stderr
    assert f"masked as <push token file://{tmp_path}/secrets/push-token>" in done.stdout
    assert not (tmp_path / "secrets").exists()


def test_a_real_run_stores_it(tmp_path: Path) -> None:
    done = run_pyinfra(tmp_path, "-y")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dry run: False" in done.stdout
    assert len((tmp_path / "secrets" / "push-token").read_text()) >= 43
