"""nixcache-gc.service runs `nixcache gc --config /etc/nixcache/config.toml`: its store and limits are
the gc_* keys the deploy renders into config.toml from host data, not flags of its own."""

from __future__ import annotations

import os
import shlex
import subprocess
import time

from server.conftest import Cache, cache, start_cache  # noqa: F401 - pytest fixtures
from server.helpers import make_entry, nixcache_cmd, push

from operations.config import render_config
from operations.gc import render_units
from operations.settings import CONFIG_FILE, NIXCACHE_BIN, from_data

DAY = 86400


def exec_start(unit: str) -> list[str]:
    line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def test_the_unit_names_the_config_file_and_no_limit():
    s = from_data("cache-a", {"gc_max_size": "50G", "gc_older_than": "7d"})
    assert exec_start(render_units(s)["nixcache-gc.service"]) == [NIXCACHE_BIN, "gc", "--config", CONFIG_FILE]


def test_the_unit_command_collects_by_the_limits_of_the_rendered_config(cache: Cache, tmp_path):  # noqa: F811
    entries = []
    for _ in range(10):
        entry = make_entry(os.urandom(10_000), compression="none")
        push(cache.client, entry, cache.token)
        entries.append(entry)
    for i, entry in enumerate(entries):  # entry i last served 10 - i days ago
        t = time.time() - (10 - i) * DAY
        os.utime(cache.store / "narinfo" / f"{entry.hash_part}.narinfo", (t, t))
        os.utime(cache.store / "nar" / entry.nar_file, (t, t))
    # Host data as group data gives it; the free-space thresholds are set far below what any
    # disk has, so only the age limit decides.
    s = from_data(
        "cache-a",
        {
            "cache_data_dir": str(cache.store.parent),
            "gc_older_than": "4d12h",
            "gc_min_free": "1K",
            "gc_max_free": "1K",
        },
    )
    config = tmp_path / "config.toml"
    config.write_text(render_config(s))
    argv = exec_start(render_units(s)["nixcache-gc.service"])
    assert argv[:2] == [NIXCACHE_BIN, "gc"]
    # The unit's own arguments, with the host's paths replaced by this test's.
    command = nixcache_cmd(*[str(config) if arg == CONFIG_FILE else arg for arg in argv[1:]])
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "deleted 6 narinfos and 6 NAR files" in done.stdout
    kept = [(cache.store / "narinfo" / f"{e.hash_part}.narinfo").exists() for e in entries]
    assert kept == [False] * 6 + [True] * 4
