"""A building cache host end to end (issue 14): a bare lab host becomes a cache host that runs
Debian's Nix with its daemon and a remote builder on a second bare lab host, checked from outside.

This module boots a lab of its own (two hosts): the hosts of the session lab stay plain caches.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import uuid
from pathlib import Path

import pytest
from support import nixbuild

from deploy.conftest import REPO, on_host, pyinfra
from deploy.test_cache_deploy import PORT, nix
from nixcache.keys import SecretKey
from nixcache.lab import Lab
from operations import nixhost
from operations.render import sha256
from operations.settings import from_data

pytestmark = pytest.mark.lab

# Only the builder can build it: it needs a feature that only the builder declares.
REMOTE = """
derivation {
  name = "nixhost-remote-@SALT@";
  system = "x86_64-linux";
  builder = "/bin/sh";
  args = [ "-c" "echo @SALT@ > $out" ];
  requiredSystemFeatures = [ "big-parallel" ];
}
"""
FAILING = """
derivation {
  name = "nixhost-fails-@SALT@"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "exit 3" ];
}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    own = Lab(tmp_path_factory.mktemp("nixhost-lab"))
    try:
        own.up(2)
        yield own
    finally:
        own.down()


@pytest.fixture(scope="module")
def lab_dir(lab) -> Path:
    return Path(lab.state_dir)


def _builder_entry(lab) -> dict:
    """lab2 as a remote builder, its host key as the lab pinned it (the operator's ssh-keyscan)."""
    builder = lab.status()[1]
    keys = [line.split() for line in lab.known_hosts.read_text().splitlines()]
    host_key = next(f"{k[1]} {k[2]}" for k in keys if k[0] == builder.address and k[1] == "ssh-ed25519")
    return {
        "host": builder.address,
        "host_key": host_key,
        "max_jobs": 2,
        "speed_factor": 2,
        "features": ["big-parallel"],
    }


def _runs(lab, lab_dir: Path):
    builder, cache = lab.status()[1].name, lab.status()[0].name
    builders = json.dumps([_builder_entry(lab)])
    return (
        ("-y", "--limit", builder, "--data", "nix_builder=true", "inventories/lab.py", "deploys/builder.py"),
        (
            "-y", "--limit", cache, "--data", "nix_host=true", "--data", f"nix_builders={builders}",
            "inventories/lab.py", "deploys/cache.py",
        ),
    )  # fmt: skip


@pytest.fixture(scope="module")
def converged(lab, lab_dir: Path):
    """lab2 prepared as a remote builder, then lab1 as a building cache host that uses it."""
    outputs = []
    for args in _runs(lab, lab_dir):
        run = pyinfra(lab_dir, *args, "-vv")  # verbose: the secret must not show even then
        assert run.returncode == 0, run.output[-5000:]
        outputs.append(run.output)
    # The remote-build key went from the secret store to the host, never into pyinfra's output.
    key = (lab_dir / "secrets" / "nix-builder-ssh-key").read_text().strip().splitlines()
    assert not [line for line in key[1:-1] if any(line in output for output in outputs)]
    return lab.status()[0], lab.status()[1]


def _nix_build(lab_dir: Path, host: str, expression: str, *options: str, ok: bool = True) -> str:
    """`nix-build` on `host` through its nix-daemon (NIX_REMOTE=daemon), in a directory of its own."""
    work = f"/root/build-{uuid.uuid4().hex[:8]}"
    command = (
        f"mkdir -p {work} && cd {work} && cat > default.nix <<'EOF'\n{expression}\nEOF\n"
        f"NIX_REMOTE=daemon nix-build {' '.join(options)} 2>&1"
    )
    return on_host(lab_dir, host, command, ok=ok)


def test_the_daemon_runs_with_nix_conf_and_machines_as_rendered(converged, lab, lab_dir: Path) -> None:
    cache, builder = converged
    assert on_host(lab_dir, cache.name, "systemctl is-active nix-daemon.service").strip() == "active"
    os.environ["NIXCACHE_LAB_DIR"] = str(lab_dir)
    group = runpy.run_path(str(REPO / "inventories/group_data/lab.py"))
    data = {key: group[key] for key in group["__all__"]}
    data.update(nix_host=True, nix_builders=[_builder_entry(lab)])
    s = from_data(cache.name, data)
    key = str(SecretKey.parse((lab_dir / "secrets" / "signing-key").read_text()).public())
    expected = nixhost.render_nix_conf(s, cache.name, f"http://127.0.0.1:{PORT}", [key])
    assert on_host(lab_dir, cache.name, "sha256sum /etc/nix/nix.conf").split()[0] == sha256(expected)
    # The profile's values, the lab's overrides, the cache itself as the only substituter.
    for line in (
        "max-jobs = 2",
        "cores = 1",
        "min-free = 536870912",
        f"substituters = http://127.0.0.1:{PORT}",
    ):
        assert f"\n{line}\n" in expected
    machines = nixhost.render_machines(nixhost.builders(s, cache.name))
    assert on_host(lab_dir, cache.name, "sha256sum /etc/nix/machines").split()[0] == sha256(machines)
    assert (
        f"ssh://nix-remote@{builder.address} x86_64-linux /etc/nix/builder-ssh-key 2 2 big-parallel"
        in machines
    )
    modes = on_host(lab_dir, cache.name, "stat -c '%a %U' /etc/nix/builder-ssh-key").split()
    assert modes == ["600", "root"]
    # The builder trusts its remote-build login, and authorises only nix-store --serve for it.
    assert "trusted-users = root nix-remote" in on_host(lab_dir, builder.name, "cat /etc/nix/nix.conf")
    authorized = on_host(lab_dir, builder.name, "cat /home/nix-remote/.ssh/authorized_keys")
    assert authorized.startswith('restrict,command="nix-store --serve --write" ssh-ed25519 ')


def test_nix_gc_runs_on_its_timer(converged, lab_dir: Path) -> None:
    cache, _ = converged
    assert on_host(lab_dir, cache.name, "systemctl is-active nix-gc.timer").strip() == "active"
    unit = on_host(lab_dir, cache.name, "systemctl cat nix-gc.service")
    assert "ExecStart=/usr/bin/nix-collect-garbage --delete-older-than 7d" in unit
    on_host(lab_dir, cache.name, "systemctl start nix-gc.service")  # oneshot: fails if GC fails


def test_a_build_that_only_the_builder_can_do_is_built_there(converged, lab_dir: Path) -> None:
    cache, builder = converged
    salt = uuid.uuid4().hex
    output = _nix_build(lab_dir, cache.name, REMOTE.replace("@SALT@", salt), "--max-jobs", "0")
    assert f"on 'ssh://nix-remote@{builder.address}'" in output, output
    path = output.strip().splitlines()[-1]
    assert re.match(rf"^/nix/store/[0-9a-z]{{32}}-nixhost-remote-{salt}$", path), output
    # The builder built it: the path is valid in the builder's own store.
    assert on_host(lab_dir, builder.name, f"nix-store --check-validity {path} && cat {path}").strip() == salt


def test_paths_built_on_the_host_are_substituted_with_only_its_key_trusted(
    converged, lab_dir: Path, tmp_path: Path
) -> None:
    cache, _ = converged
    salt = uuid.uuid4().hex
    output = _nix_build(lab_dir, cache.name, nixbuild.closure("nixhost", salt), "--option", "builders", "''")
    top = output.strip().splitlines()[-1]
    assert top.endswith("-nixhost-top"), output
    key = str(SecretKey.parse((lab_dir / "secrets" / "signing-key").read_text()).public())
    fetched = nix(
        [
            "copy", "--from", f"http://{cache.address}:{PORT}", "--to", str(tmp_path / "fresh"), top,
            "--option", "require-sigs", "true", "--option", "trusted-public-keys", key,
        ],
        tmp_path / "home",
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    copied = (tmp_path / "fresh" / top.lstrip("/")).read_text()
    assert copied.startswith(f"nixhost-top {salt}\n") and "-nixhost-leaf" in copied
    # A path signed by another key is refused: the trust is the cache's key, not any key.
    other = str(SecretKey.generate("other-1").public())
    refused = nix(
        [
            "copy", "--from", f"http://{cache.address}:{PORT}", "--to", str(tmp_path / "refused"), top,
            "--option", "require-sigs", "true", "--option", "trusted-public-keys", other,
        ],
        tmp_path / "home-refused",
    )  # fmt: skip
    assert refused.returncode != 0


def _builds(lab_dir: Path, host: str) -> dict[str, float]:
    on_host(lab_dir, host, "systemctl start nixcache-nix-stats.service")
    text = on_host(lab_dir, host, "cat /var/lib/prometheus/node-exporter/nixcache_nix.prom")
    values = dict(re.findall(r'^nixcache_nix_builds_total\{result="(\w+)"\} (\S+)$', text, re.M))
    assert re.search(r"^nixcache_nix_store_bytes [1-9]", text, re.M), text
    return {result: float(value) for result, value in values.items()}


def test_build_results_are_counted_for_node_exporter(converged, lab_dir: Path) -> None:
    cache, _ = converged
    before = _builds(lab_dir, cache.name)
    _nix_build(lab_dir, cache.name, FAILING.replace("@SALT@", uuid.uuid4().hex), ok=False)
    _nix_build(lab_dir, cache.name, REMOTE.replace("@SALT@", uuid.uuid4().hex), "--max-jobs", "0")
    after = _builds(lab_dir, cache.name)
    assert after == {"success": before["success"] + 1, "failure": before["failure"] + 1}
    # Counted once: a second run over the same logs adds nothing.
    assert _builds(lab_dir, cache.name) == after
    # The disk alert watches the Nix store's filesystem too (path label /nix/store).
    on_host(lab_dir, cache.name, "systemctl start nixcache-disk-alert-nix.service")
    disk = on_host(lab_dir, cache.name, "cat /var/lib/prometheus/node-exporter/nix-store.nixcache_disk.prom")
    assert 'nixcache_disk_usage_ratio{path="/nix/store"}' in disk


def test_the_service_cannot_write_the_nix_store_or_reach_the_daemon(converged, lab_dir: Path) -> None:
    """In nixcache.service's own mount namespace: /nix/store read-only, no daemon socket (through
    it a client could add paths and build)."""
    cache, _ = converged
    probe = (
        "nsenter -t $(systemctl show -p MainPID --value nixcache.service) -m sh -c "
        "'test -e /nix/var/nix/daemon-socket/socket || echo no-daemon-socket; "
        "touch /nix/store/probe 2>/dev/null || echo store-read-only; "
        "test -r /nix/var/nix/db/db.sqlite && echo database-readable'"
    )
    assert on_host(lab_dir, cache.name, probe).split() == [
        "no-daemon-socket",
        "store-read-only",
        "database-readable",
    ]
    # On the host itself the daemon's socket is there: the sandbox hides it, not its absence.
    on_host(lab_dir, cache.name, "test -S /nix/var/nix/daemon-socket/socket")


def test_second_runs_report_no_changes(converged, lab, lab_dir: Path) -> None:
    for args in _runs(lab, lab_dir):
        again = pyinfra(lab_dir, *args)
        assert again.returncode == 0, again.output[-3000:]
        assert again.totals()["changed"] == 0, again.changed_operations()
