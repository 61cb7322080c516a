"""The lab's state file: what one lab instance created, so that any later command can find it.

One JSON document per state directory (`state.json`), written atomically. Everything the
instance owns on the machine carries its instance id in its name, so `down` can also sweep
leftovers of a run that died before it could record them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nixcache.lab.errors import LabError

STATE_FILE = "state.json"
FORMAT_VERSION = 1
# Which lab host runs the lab environment's S3 origin (a host name; empty: no origin).
ORIGIN_ENV = "NIXCACHE_LAB_ORIGIN"


@dataclass
class Host:
    """One lab host: how to reach it and what runs it.

    `state` is "running" when its container process is alive, else "stopped"; the lab
    refreshes it whenever it reads the state.
    """

    name: str
    address: str
    ssh_key: str
    ssh_port: int = 22
    ssh_user: str = "root"
    state: str = "stopped"
    netns: str = ""
    veth: str = ""
    root: str = ""
    pid: int | None = None
    log: str = ""
    storage: str = ""  # "overlay" of the base image, or "copy" of it
    cgroup: str = ""  # relative to the nixcache-lab cgroup of each hierarchy

    def public(self) -> dict[str, Any]:
        """The record `lab status --json` prints and inventories read."""
        return {
            "name": self.name,
            "address": self.address,
            "ssh_port": self.ssh_port,
            "ssh_user": self.ssh_user,
            "ssh_key": self.ssh_key,
            "state": self.state,
            "pid": self.pid,
            "root": self.root,
            "log": self.log,
        }


@dataclass
class LabState:
    """One lab instance: its id, its network and its hosts."""

    instance: str
    subnet: str = ""  # e.g. "10.231.7.0/24"; empty until allocated
    gateway: str = ""  # the controller's address on the lab network
    bridge: str = ""
    image: str = ""  # base image root the hosts were copied from
    hosts: list[Host] = field(default_factory=list)
    version: int = FORMAT_VERSION

    def host(self, name: str) -> Host | None:
        """The host called `name`, or None."""
        return next((host for host in self.hosts if host.name == name), None)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LabState:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported lab state format (expected version {FORMAT_VERSION})")
        hosts = [Host(**host) for host in data.pop("hosts", [])]
        return cls(hosts=hosts, **data)


def origin_host(state: LabState) -> Host | None:
    """The host that runs the lab environment's S3 origin (SeaweedFS): the first host, unless
    $NIXCACHE_LAB_ORIGIN names another (or is empty: no origin, as the host-loss drill wants).
    inventories/lab.py (group `origin`) and inventories/group_data/lab.py (the caches'
    origin_endpoint) both ask here, so they always agree."""
    name = os.environ.get(ORIGIN_ENV)
    if name is None:
        return state.hosts[0] if state.hosts else None
    if not name:
        return None
    found = state.host(name)
    if found is None:
        names = ", ".join(host.name for host in state.hosts) or "none"
        raise LabError(f"{ORIGIN_ENV}={name} is not a host of this lab (hosts: {names}); name one of them")
    return found


def new_instance_id() -> str:
    """A short random id; link names (15 chars max) carry it, so it stays 6 hex digits."""
    return secrets.token_hex(3)


def load(state_dir: Path) -> LabState | None:
    """The state in `state_dir`, or None when there is none."""
    path = state_dir / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return LabState.from_json(text)
    except (ValueError, TypeError, KeyError) as error:
        raise LabError(
            f"lab state file {path} is unreadable ({error}); remove {state_dir} after checking "
            "that no lab host of it still runs (ip netns list, ps -ef | grep systemd-nspawn)"
        ) from None


def save(state_dir: Path, state: LabState) -> None:
    """Write the state atomically (temp file, then rename)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)


def remove(state_dir: Path) -> None:
    """Forget the state (after everything it names is gone)."""
    (state_dir / STATE_FILE).unlink(missing_ok=True)
