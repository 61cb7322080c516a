"""deploys/cache.py run as a non-root admin with `pyinfra --user alice --sudo` on a lab host.

Under sudo pyinfra uploads by SFTP as the SSH user to a temporary file and copies it with sudo
(operations/upload.py): the secrets must still arrive intact, private, with no temporary file
left behind and without ever showing in pyinfra's output. The host is converged back with a
plain root deploy (no admin_users) before the test ends.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from deploy.conftest import Run, deploy, pyinfra

from deploy_parts.test_lab_parts import admin_key, converged, hosts, on_host
from nixcache.lab import Lab
from operations.upload import TEMP_PREFIX

pytestmark = pytest.mark.lab

SECRETS = {"push-token": "/etc/nixcache/push-token", "signing-key": "/etc/nixcache/signing-key"}


def test_cache_deploy_as_admin_with_sudo_keeps_secrets_private(
    deployed: Run, lab_dir: Path, tmp_path: Path
) -> None:
    host = hosts(lab_dir)[-1]
    private, public = admin_key(tmp_path)
    extra = tmp_path / "group_data"
    extra.mkdir()
    users = [{"name": "alice", "ssh_keys": [public], "sudo": True}]
    (extra / "lab.py").write_text(f"admin_users = {users!r}\n")

    def as_alice(*args: str) -> Run:
        # Command-line --user/--key override the lab inventory's ssh_user/ssh_key (root's).
        return pyinfra(
            lab_dir, "-y", *args, "--user", "alice", "--key", str(private), "--sudo",
            "--limit", host.name, "--group-data", str(extra), "inventories/lab.py", "deploys/cache.py",
        )  # fmt: skip

    try:
        converged(deploy(lab_dir, "--limit", host.name, "--group-data", str(extra)))
        on_host(lab_dir, host.name, "rm " + " ".join(SECRETS.values()))

        run = as_alice("-vvv")
        converged(run)
        # It really went through alice's sudo: pyinfra wraps every command in it.
        assert "sudo -H -n sh -c" in run.output
        for path in SECRETS.values():
            assert f"file uploaded: {path}.nixcache-new" in run.output
        stat = on_host(lab_dir, host.name, "stat -c '%a %U %G' " + " ".join(SECRETS.values()))
        assert stat.split("\n")[:2] == ["600 nixcache nixcache"] * 2
        for name, path in SECRETS.items():
            installed = on_host(lab_dir, host.name, f"sha256sum {path} | cut -c1-64").strip()
            assert installed == hashlib.sha256((lab_dir / "secrets" / name).read_bytes()).hexdigest(), name
        left = on_host(
            lab_dir, host.name, f"find /tmp -maxdepth 1 -name 'pyinfra-{TEMP_PREFIX}*'; ls /etc/nixcache"
        )
        assert TEMP_PREFIX not in left
        assert ".nixcache-new" not in left
        token = (lab_dir / "secrets" / "push-token").read_text().strip()
        key = (lab_dir / "secrets" / "signing-key").read_text().strip()
        assert token not in run.output
        assert key.partition(":")[2][:16] not in run.output

        again = as_alice()
        converged(again)
        assert again.totals()["changed"] == 0, f"changed on the sudo rerun: {again.changed_operations()}"
    finally:
        converged(deploy(lab_dir, "--limit", host.name))
    code, _ = Lab(lab_dir).run(host.name, ["test", "-e", "/etc/sudoers.d/60-nixcache-admins"])
    assert code != 0
