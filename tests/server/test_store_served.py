"""Store's batch of served narinfos (gc's last-served times): bounded between periodic flushes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from nixcache.server.store import SERVED_LIMIT, Store
from server.helpers import random_hash


def test_a_flood_of_distinct_hits_is_recorded_before_the_periodic_flush(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.create()
    stored = random_hash()
    path = store.narinfo_path(stored)
    path.write_text("stored\n")
    os.utime(path, ns=(1, 1))
    store.mark_served(stored, 1)
    for _ in range(SERVED_LIMIT):  # distinct hashes, none stored (each a stat that finds nothing)
        store.mark_served(random_hash(), None)
    st = os.stat(path)
    assert st.st_atime > time.time() - 60 and st.st_mtime_ns == 1  # served now, upload time kept
    assert store.flush_served() == 1  # what came after the early flush, not the whole flood
