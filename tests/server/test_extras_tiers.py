"""Extra files across a fleet (SeaweedFS origin): written through on a push, read by another
region on a miss, a 503 with Retry-After when the origin is down, listings collected with their
narinfo by `nixcache gc --origin`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from support.seaweed import Seaweed, seaweed  # noqa: F401 - the session fixture

from server.conftest import StartCache
from server.helpers import make_entry, push, random_hash
from server.test_tiers import _objects, _origin, bucket, fleet  # noqa: F401 - bucket: a fixture


def test_extra_files_are_written_through_and_read_by_another_region(
    start_cache: StartCache,
    tmp_path: Path,
    seaweed: Seaweed,  # noqa: F811
    bucket: str,  # noqa: F811
) -> None:
    from nixcache.server.tiers import origin_gc

    eu, us = fleet(start_cache, tmp_path, seaweed, bucket, "eu", "us", write_timeout=3)
    entry = make_entry()
    push(eu.client, entry, eu.token)
    drv = f"{random_hash()}-hello.drv"
    out_path = entry.store_path.rsplit("/", 1)[1]
    files = {
        f"{entry.hash_part}.ls": b'{"version":1,"root":{"type":"regular","size":64}}',
        f"log/{drv}": b"hello\n",
        f"build-trace-v2/{drv}/out.doi": json.dumps({"outPath": out_path, "signatures": []}).encode(),
    }
    for key, body in files.items():
        assert eu.client.put(f"/{key}", content=body, auth=eu.auth).status_code == 201
    assert set(files) <= _objects(seaweed, bucket)  # at the URL path: a binary cache layout
    assert us.client.get(f"/{entry.hash_part}.ls").content == files[f"{entry.hash_part}.ls"]
    assert us.client.get(f"/log/{drv}").content == b"hello\n"
    trace = us.client.get(f"/build-trace-v2/{drv}/out.doi").json()
    assert [s["keyName"] for s in trace["signatures"]] == [us.key.name]  # signed by the serving cache

    seaweed.stop()
    try:
        refused = eu.client.put(f"/log/{random_hash()}-other.drv", content=b"x", auth=eu.auth)
        assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
        assert [p.name for p in (eu.store / "log").iterdir()] == [drv]  # nothing new stored here
        assert us.client.get(f"/{random_hash()}.ls").status_code == 404  # a read is never a 5xx
    finally:
        seaweed.start()

    origin = _origin(seaweed, bucket, tmp_path)
    result = origin_gc.run(origin, older_than=1, clock=lambda: time.time() + 7200, echo=lambda _: None)
    assert result.deleted == [entry.hash_part]
    assert f"{entry.hash_part}.ls" not in _objects(seaweed, bucket)
