"""Key rotation as docs/runbook.md runs it, on an inventory that holds the caches and a Nix client.

The inventory is what "Adding a client" describes: the lab's hosts in group `caches` but the
last one, which is in group `clients` with `client_cache_group = "caches"`, the lab's group data for all
of them (in group_data/all.py beside the inventory) and the caches' rotation data in
group_data/caches.py, edited between the phases as an operator edits group data. Every command
is the runbook's (`pyinfra -y $INV deploys/rotate_key.py …`), run by the real pyinfra CLI with
no --limit. The caches sign with a key of this test's own (not the lab's), and are converged
back to the lab's data at the end.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import httpx
import pytest
from support import nixbuild

from deploy.conftest import Run, deploy, hosts, lab_group_data, on_host, pyinfra
from nixcache import nixenv
from nixcache.keys import SecretKey

pytestmark = pytest.mark.lab

PORT = 5000
CONF = "/etc/nix/nixcache.conf"
NEXT_KEY_FILE = "/etc/nixcache/signing-key.next"

INVENTORY = """\
# The lab's hosts (inventories/lab.py), split as the runbook's "Adding a client" does.
from inventories.lab import lab as _lab

caches = _lab[:-1]
clients = _lab[-1:]
"""


# The lab's group data for every host, but this test's signing key for the caches.
def ok(run: Run) -> Run:
    assert run.returncode == 0, run.output[-5000:]
    assert run.totals()["error"] == 0, run.output[-5000:]
    return run


def public_key(path: Path) -> str:
    return str(SecretKey.parse(path.read_text()).public())


def served_keys(address: str) -> list[str]:
    response = httpx.get(f"http://{address}:{PORT}/pubkey", timeout=10)
    assert response.status_code == 200, response.text
    return response.text.split()


def trusted_on(lab_dir: Path, client: str) -> list[str]:
    """What the client's Nix itself says it trusts (the runbook's "Adding a client" check)."""
    shown = on_host(lab_dir, client, "nix --extra-experimental-features nix-command show-config")
    line = next(line for line in shown.splitlines() if line.startswith("trusted-public-keys = "))
    return line.split(" = ", 1)[1].split()


def substitutes(lab_dir: Path, tmp_path: Path, cache, client: str) -> str:
    """Push a fresh path to `cache`, then have the client's Nix substitute it; its output."""
    salt = uuid.uuid4().hex
    path = nixbuild.build(
        f'derivation {{ name = "rot-{salt[:8]}"; system = builtins.currentSystem; builder = "/bin/sh";'
        f' args = [ "-c" "echo {salt} > $out" ]; }}',
        tmp_path / f"build-{salt[:8]}",
    )
    token = (lab_dir / "secrets" / "push-token").read_text().strip()
    netrc = tmp_path / "push-netrc"
    netrc.write_text(f"machine {cache.address}\nlogin ci\npassword {token}\n")
    netrc.chmod(0o600)
    url = f"http://{cache.address}:{PORT}"
    pushed = nixenv.run(
        ["nix", "copy", "--to", url, path, "--option", "netrc-file", str(netrc)], tmp_path / "h"
    )
    assert pushed.returncode == 0, pushed.stderr
    return on_host(lab_dir, client, f"nix-store --realise {path} 2>&1 && cat {path}")


def test_rotation_with_a_client_in_the_inventory(deployed: Run, lab_dir: Path, tmp_path: Path) -> None:
    lab_hosts = hosts(lab_dir)
    assert len(lab_hosts) >= 2, "a rotation with a client needs two lab hosts"
    caches, client = lab_hosts[:-1], lab_hosts[-1].name
    inventory_dir = tmp_path / "inventory"
    (inventory_dir / "group_data").mkdir(parents=True)
    inventory = inventory_dir / "fleet.py"
    inventory.write_text(INVENTORY)
    # The lab's own group data but its signing key, which caches.py below sets per phase.
    (inventory_dir / "group_data" / "all.py").write_text(lab_group_data(lab_dir, leave_out=("signing_key_",)))
    (inventory_dir / "group_data" / "clients.py").write_text('client_cache_group = "caches"\n')
    caches_data = inventory_dir / "group_data" / "caches.py"
    secrets = tmp_path / "secrets"
    old_file, new_file = secrets / "signing-key-1", secrets / "signing-key-2"

    def key_data(path: Path, name: str) -> str:
        lines = [
            f'signing_key_ref = "file://{path}"',
            f'signing_key_name = "{name}"',
            "signing_key_generate = True",
        ]
        return "\n".join(lines) + "\n"

    current = key_data(old_file, "rot-lab-1")
    caches_data.write_text(current)
    INV = str(inventory)  # the runbook's $INV

    def rotate(*extra: str) -> Run:
        return pyinfra(lab_dir, "-y", *extra, INV, "deploys/rotate_key.py")

    try:
        # The caches with this test's key, the client pointed at them (the runbook's first steps).
        ok(pyinfra(lab_dir, "-y", "--limit", "caches", INV, "deploys/cache.py"))
        ok(pyinfra(lab_dir, "-y", "--limit", client, INV, "deploys/client.py"))
        old = public_key(old_file)
        assert trusted_on(lab_dir, client) == [old]
        # The main job does not turn the client into a cache: one line naming it and the fix.
        refused = pyinfra(lab_dir, "-y", INV, "deploys/cache.py")
        assert refused.returncode != 0
        assert f"{client}: is a Nix client of the caches" in refused.output
        assert "--limit <the caches' group>" in refused.output

        # 1. Introduce: the next key in the caches' group data, then the runbook's command.
        caches_data.write_text(current + f'signing_key_next_ref = "file://{new_file}"\n')
        ok(rotate())
        new = public_key(new_file)
        assert SecretKey.parse(new_file.read_text()).name == "rot-lab-2"
        for cache in caches:
            assert served_keys(cache.address) == [old, new]
        assert trusted_on(lab_dir, client) == [old, new]
        assert f"from 'http://{caches[0].address}:{PORT}'" in substitutes(
            lab_dir, tmp_path, caches[0], client
        )
        again = ok(rotate())
        assert again.totals()["changed"] == 0, again.changed_operations()

        # 3. Retire.
        ok(rotate("--data", "rotate_phase=retire"))
        for cache in caches:
            assert served_keys(cache.address) == [new]
        assert trusted_on(lab_dir, client) == [new]

        # 4. Make it permanent: the next key becomes the key, the same command once more.
        caches_data.write_text(key_data(new_file, "rot-lab-2"))
        ok(rotate())
        for cache in caches:
            assert served_keys(cache.address) == [new]
            assert (
                on_host(lab_dir, cache.name, f"ls {NEXT_KEY_FILE} 2>&1 || true")
                .strip()
                .endswith("No such file or directory")
            )
            installed = on_host(lab_dir, cache.name, "cat /etc/nixcache/signing-key").strip()
            assert installed == new_file.read_text().strip()
        assert on_host(lab_dir, client, f"test ! -e {NEXT_KEY_FILE} && echo none").strip() == "none"
        assert trusted_on(lab_dir, client) == [new]
        assert re.search(
            rf"trusted-public-keys = {re.escape(new)}\n", on_host(lab_dir, client, f"cat {CONF}")
        )
        realised = substitutes(lab_dir, tmp_path, caches[-1], client)
        assert f"from 'http://{caches[-1].address}:{PORT}'" in realised
        final = ok(rotate())
        assert final.totals()["changed"] == 0, final.changed_operations()
    finally:
        # Back to the lab's own data: its key on the caches, no client configuration on the client.
        names = ",".join(cache.name for cache in caches)
        restored = deploy(lab_dir, "--limit", names)
        on_host(
            lab_dir,
            client,
            f"rm -f {CONF} /etc/nix/nixcache-netrc && sed -i '\\|^!include {CONF}$|d' /etc/nix/nix.conf",
            ok=False,
        )
    ok(restored)
