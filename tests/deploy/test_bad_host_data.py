"""Bad host data stops a real `pyinfra` run in one line, before anything happens (no lab needed).

The main deploy is run with `--dry` against `@local`: it reads its settings first, so a bad value
or a misspelt key fails there, with pyinfra's one-line error and a non-zero exit, never a
traceback. Group data files get the same check, `__all__` included (operations/group_data.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def pyinfra(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyinfra", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """pyinfra's error line; asserts a failed run that printed exactly one, and no traceback."""
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "pyinfra error" in line]
    assert len(errors) == 1, output
    return errors[0]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            "cache_memory_max=lots",
            "@local: host data 'cache_memory_max' is 'lots'; give a systemd memory limit: bytes with "
            "K, M, G or T (512M, 2G), a percentage (50%) or infinity",
        ),
        (
            "gc_max_size=banana",
            "@local: host data 'gc_max_size' is 'banana'; give a size such as 10G, 512M or a number "
            "of bytes (K/M/G/T/P are powers of 1024)",
        ),
        (
            "cache_allowed_sources=10.0.0.0/8,10.1.0.0/33",
            "@local: host data 'cache_allowed_sources' is '10.0.0.0/8,10.1.0.0/33'; give networks "
            "such as 10.0.0.0/24 (a list, or comma-separated with --data)",
        ),
        ("cache_port=99999", "@local: host data 'cache_port' is 99999; give a TCP port from 1 to 65535"),
        (
            "gc_older_than=forever",
            "@local: host data 'gc_older_than' is 'forever'; give a duration such as 30d, 12h, 90m, "
            "1w2d or a number of seconds",
        ),
        (
            "gc_max_sizee=1G",
            "@local: host data 'gc_max_sizee' is not a nixcache setting; did you mean 'gc_max_size'?",
        ),
        (
            "backup_store=true",
            "@local: is a backup repository host only (backup_store, no signing_key_ref), not a cache; "
            "deploy it with deploys/backup.py, and this file with --limit <the caches' group>",
        ),
        (
            "cahce_memory_max=1G",
            "@local: host data 'cahce_memory_max' is not a nixcache setting; did you mean "
            "'cache_memory_max'?",
        ),
    ],
)
def test_the_main_deploy_refuses_bad_data_in_one_line(data: str, expected: str) -> None:
    line = error_line(pyinfra("--dry", "--data", data, "@local", "deploys/cache.py"))
    assert line.endswith(expected), line


DEPLOY = "from operations.settings import settings\nprint('gc_min_free =', settings().gc_min_free)\n"


def fleet(tmp_path: Path, group_data: dict[str, str]) -> Path:
    """An inventory of one host (@local) in groups `first` and `second`, with `group_data` files."""
    (tmp_path / "inventory.py").write_text('first = ["@local"]\nsecond = ["@local"]\n')
    (tmp_path / "group_data").mkdir()
    for name, text in group_data.items():
        (tmp_path / "group_data" / f"{name}.py").write_text(text)
    (tmp_path / "deploy.py").write_text(DEPLOY)
    return tmp_path


def test_a_name_that_all_would_drop_stops_the_run_naming_file_and_name(tmp_path: Path) -> None:
    root = fleet(tmp_path, {"first": '__all__ = ["gc_min_free"]\ngc_min_free = "5G"\ngc_max_free = "9G"\n'})
    line = error_line(pyinfra("-y", str(root / "inventory.py"), str(root / "deploy.py")))
    assert line.endswith(
        f"{root}/group_data/first.py: 'gc_max_free' is not in __all__, so pyinfra drops it silently; "
        "add it to __all__ (or name it _gc_max_free if it is a helper)"
    ), line


def test_a_misspelt_key_in_group_data_stops_the_run(tmp_path: Path) -> None:
    root = fleet(tmp_path, {"first": 'gc_min_fre = "5G"\n'})
    line = error_line(pyinfra("-y", str(root / "inventory.py"), str(root / "deploy.py")))
    assert line.endswith(
        "@local: host data 'gc_min_fre' is not a nixcache setting; did you mean 'gc_min_free'?"
    )


def test_a_misspelt_prefix_in_group_data_stops_the_run(tmp_path: Path) -> None:
    root = fleet(tmp_path, {"first": 'cahce_memory_max = "1G"\n'})
    line = error_line(pyinfra("-y", str(root / "inventory.py"), str(root / "deploy.py")))
    assert line.endswith(
        "@local: host data 'cahce_memory_max' is not a nixcache setting; did you mean 'cache_memory_max'?"
    )


def test_a_misspelt_key_in_the_inventorys_host_data_stops_the_run(tmp_path: Path) -> None:
    root = fleet(tmp_path, {})
    (root / "inventory.py").write_text('first = [("@local", {"bakup_repository": "/srv/backup"})]\n')
    line = error_line(pyinfra("-y", str(root / "inventory.py"), str(root / "deploy.py")))
    assert line.endswith(
        "@local: host data 'bakup_repository' is not a nixcache setting; did you mean 'backup_repository'?"
    )


def test_of_two_groups_the_one_defined_later_in_the_inventory_wins(tmp_path: Path) -> None:
    """What docs/settings.md says about a host in two groups, seen in a real run."""
    root = fleet(tmp_path, {"first": 'gc_min_free = "1G"\n', "second": 'gc_min_free = "2G"\n'})
    done = pyinfra("-y", str(root / "inventory.py"), str(root / "deploy.py"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"gc_min_free = {2 * 1024**3}" in done.stdout
    (root / "inventory.py").write_text('second = ["@local"]\nfirst = ["@local"]\n')
    done = pyinfra("-y", str(root / "inventory.py"), str(root / "deploy.py"))
    assert f"gc_min_free = {1024**3}" in done.stdout, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="@local has no systemd-analyze")
def test_a_calendar_event_systemd_cannot_parse_stops_the_run_before_anything_changes(tmp_path: Path) -> None:
    """systemd-analyze on the host (here @local, the controller) is the judge of OnCalendar=; the
    run stops while it is being planned, naming the key. --dry: nothing is created anywhere."""
    (tmp_path / "push-token").write_text("t0ken\n")
    data = {
        "gc_schedule": "dayly",
        "signing_key_ref": f"file://{tmp_path / 'signing-key'}",
        "signing_key_generate": "true",
        "push_token_ref": f"file://{tmp_path / 'push-token'}",
        "cache_allowed_sources": "127.0.0.0/8",
    }
    args = [arg for key, value in data.items() for arg in ("--data", f"{key}={value}")]
    line = error_line(pyinfra("--dry", *args, "@local", "deploys/cache.py"))
    assert line.endswith(
        "@local: host data 'gc_schedule' is 'dayly', which `systemd-analyze calendar` on the host "
        "rejects; give a systemd calendar event such as daily or *:0/15 (systemd.time(7))"
    ), line
