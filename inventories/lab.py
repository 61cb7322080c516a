"""pyinfra inventory of the local lab (`nixcache lab up`): every lab host, group `lab`.

Reads the lab state from $NIXCACHE_LAB_DIR (default ./.lab), so this works with no flag:

    pyinfra -y inventories/lab.py exec -- systemctl is-system-running

Host names are the lab's (lab1, lab2, …); each host carries its SSH data and:
  lab_network             the lab's CIDR (e.g. 10.231.3.0/24): hosts and controller live in it
  lab_controller_address  the controller's address on that network (where pyinfra connects from)
  lab_address             the host's own address
  lab_state_dir           the lab's state directory (NIXCACHE_LAB_DIR resolved)
Groups: `lab` (every host: caches of one environment), `monitoring` (the first host, which
also runs the fleet's Prometheus) and `origin` (the host that runs the environment's S3 origin,
SeaweedFS, beside its cache: the first host, or the one $NIXCACHE_LAB_ORIGIN names; empty for
none). Group data for the deploys lives in inventories/group_data/lab.py; it points every cache
at that origin.
"""

from __future__ import annotations

import sys

from nixcache.lab import Lab, LabError
from nixcache.lab.state import LabState, origin_host


def _hosts(lab: Lab, state: LabState) -> list[tuple[str, dict]]:
    running = [host for host in state.hosts if host.state == "running"]
    if not running:
        raise SystemExit(
            f"inventories/lab.py: no lab host runs in {lab.state_dir}; start them with `nixcache lab up`"
        )
    # A stopped host stays in the inventory: pyinfra then fails to reach it and the run fails,
    # instead of succeeding on the others as if the host did not exist.
    for host in state.hosts:
        if host.state != "running":
            print(
                f"inventories/lab.py: {host.name} is {host.state}; start it with `nixcache lab up`, "
                f"or leave it out with --limit",
                file=sys.stderr,
            )
    return [
        (
            host.name,
            {
                "ssh_hostname": host.address,
                "ssh_port": host.ssh_port,
                "ssh_user": host.ssh_user,
                "ssh_key": host.ssh_key,
                # Lab host keys are regenerated on every `reset`: the lab pins the current ones in
                # its own known_hosts and pyinfra does not prompt or fail for lab hosts. Lab only.
                "ssh_known_hosts_file": str(lab.known_hosts),
                "ssh_strict_host_key_checking": "no",
                "lab_address": host.address,
                "lab_network": state.subnet,
                "lab_controller_address": state.gateway,
                "lab_state_dir": str(lab.state_dir),
            },
        )
        for host in state.hosts
    ]


def _state(lab: Lab) -> LabState:
    try:
        return lab.state()
    except LabError as error:
        raise SystemExit(f"inventories/lab.py: {error}") from None


_lab = Lab()
_lab_state = _state(_lab)
lab = _hosts(_lab, _lab_state)
# The first host also runs the fleet's Prometheus and Alertmanager (deploys/cache.py does it).
monitoring = [lab[0][0]]
# The environment's S3 origin runs beside this host's cache (deploys/cache.py, group `origin`).
try:
    _origin = origin_host(_lab_state)
except LabError as error:
    raise SystemExit(f"inventories/lab.py: {error}") from None
origin = [_origin.name] if _origin else []
