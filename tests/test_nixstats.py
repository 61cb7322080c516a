"""`nixcache nix-stats`: builds counted once each, when their log ends, by whether their outputs
are valid; what node exporter reads."""

from __future__ import annotations

import bz2
import os
from pathlib import Path

from click.testing import CliRunner

from nixcache.nixstats import SETTLE_SECONDS, State, count_builds, finished, nix_stats

STORE = "/nix/store"


def write_log(
    log_dir: Path, drv: str, text: bytes = b"building\n", complete: bool = True, mtime=None
) -> Path:
    """A build log as Nix writes it: drvs/<first 2 chars>/<rest>.bz2, a bzip2 stream that ends
    when the build does."""
    path = log_dir / "drvs" / drv[:2] / f"{drv[2:]}.bz2"
    path.parent.mkdir(parents=True, exist_ok=True)
    compressor = bz2.BZ2Compressor()
    data = compressor.compress(os.urandom(1 << 20))  # over one block: a partial stream has bytes
    path.write_bytes(data + compressor.flush() if complete else data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_a_log_is_finished_once_its_bzip2_stream_ends(tmp_path: Path) -> None:
    assert finished(write_log(tmp_path, "a" * 32 + "-x.drv"))
    assert not finished(write_log(tmp_path, "b" * 32 + "-x.drv", complete=False))
    empty = tmp_path / "empty.bz2"
    empty.write_bytes(b"")
    assert not finished(empty)  # a build that has written nothing yet


def test_each_build_is_counted_once_when_it_ends(tmp_path: Path) -> None:
    ok, failed, running = ("a" * 32 + "-ok.drv", "b" * 32 + "-failed.drv", "c" * 32 + "-running.drv")
    valid = {f"{STORE}/{ok}": True, f"{STORE}/{failed}": False, f"{STORE}/{running}": True}
    for drv in (ok, failed):
        write_log(tmp_path, drv)
    write_log(tmp_path, running, complete=False)
    now = 1_000_000_000.0
    state = count_builds(tmp_path, STORE, State(), valid.get, now)
    assert (state.success, state.failure) == (1, 1)
    # The unfinished log keeps the watermark at its own time: it is looked at again.
    assert state.since <= (tmp_path / "drvs" / "cc").iterdir().__next__().stat().st_mtime
    state = count_builds(tmp_path, STORE, state, valid.get, now + 60)
    assert (state.success, state.failure) == (1, 1)  # nothing counted twice
    write_log(tmp_path, running)  # the build ended
    state = count_builds(tmp_path, STORE, state, valid.get, now + 120)
    assert (state.success, state.failure) == (2, 1)


def test_a_collected_derivation_is_not_counted_and_old_logs_are_not_read_again(tmp_path: Path) -> None:
    now = 2_000_000_000.0
    gone = "d" * 32 + "-gone.drv"
    old = "e" * 32 + "-old.drv"
    write_log(tmp_path, gone)
    write_log(tmp_path, old, mtime=now - 2 * SETTLE_SECONDS)
    valid = {f"{STORE}/{old}": True}
    state = count_builds(tmp_path, STORE, State(), valid.get, now)
    assert (state.success, state.failure) == (1, 0)  # `gone` names a derivation no longer valid
    # Behind the watermark: forgotten from the state, and not counted again.
    assert state.since == now - SETTLE_SECONDS and old[2:] not in "".join(state.seen)
    state = count_builds(tmp_path, STORE, state, valid.get, now + 10)
    assert (state.success, state.failure) == (1, 0)


def test_the_command_names_what_it_could_not_read(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        nix_stats,
        [
            "--textfile",
            str(tmp_path / "nix.prom"),
            "--state-dir",
            str(tmp_path),
            "--state",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 3
    assert result.output.startswith(f"nix-stats: Nix database in {tmp_path}: ")
    assert not (tmp_path / "nix.prom").exists()
