"""`Lab`: one lab instance, the typed API behind `nixcache lab` and the test fixtures.

    lab = Lab()                 # state in $NIXCACHE_LAB_DIR, default ./.lab
    hosts = lab.up(3)           # boots lab1..lab3, returns when each answers SSH and is running
    lab.reset("lab2")           # fresh root from the base image, same name, address and SSH key
    lab.down()                  # nothing of this instance remains

Everything an instance creates on the machine carries its 6-hex-digit id (state.json): the
bridge `nxb<id>`, veths `nxv<id><i>`, namespaces `nixcache-lab-<id>-<host>`, and host roots
under the state directory; so instances with different state directories coexist, and
`down` can sweep what a killed run left behind even if it never recorded it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nixcache.lab import image, machine, network, prereqs, registry, rootfs, ssh
from nixcache.lab import state as statefile
from nixcache.lab.errors import LabError, LabNotUpError, UnknownHostError
from nixcache.lab.lock import locked
from nixcache.lab.state import Host, LabState

DEFAULT_STATE_DIR = ".lab"
READY_TIMEOUT = 120.0  # seconds for every host to answer SSH and finish booting
HOST_PREFIX = "lab"


def default_state_dir() -> Path:
    """$NIXCACHE_LAB_DIR, or ./.lab in the current directory."""
    return Path(os.environ.get("NIXCACHE_LAB_DIR") or DEFAULT_STATE_DIR).absolute()


def host_name(index: int) -> str:
    return f"{HOST_PREFIX}{index}"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def teardown(instance: str, state_dir: Path, netns: list[str], progress: Callable[[str], None]) -> None:
    """Remove everything of lab `instance` (state in `state_dir`): processes, network, mounts, roots.

    Finds things by name and place (the instance id, nspawn roots under `state_dir`) rather than
    only by record, so it also clears what a run that died mid-way created without recording
    it. `instance` may be "" when it is unknown; then only what lives under `state_dir` goes.
    """
    hosts_dir = state_dir / "hosts"
    live = machine.machines_under(hosts_dir)
    if live or machine.cgroup_pids(instance):
        progress(f"lab: stopping the hosts of {state_dir}")
    machine.stop(live, instance)
    if instance:
        for name in set(network.netns_with_prefix(network.netns_name(instance, ""))) | set(netns):
            network.delete_netns(name)
        for link in network.links_with_prefix(f"nxv{instance}"):
            network.delete_link(link)
        network.delete_link(network.bridge_name(instance))
        machine.remove_cgroups(instance)
        registry.unregister(instance)
    rootfs.remove(hosts_dir)


def prune(progress: Callable[[str], None] = _stderr) -> list[str]:
    """Tear down every registered lab whose state directory is gone; the ids removed."""
    prereqs.check(["ip"])
    removed = []
    for instance, state_dir in sorted(registry.orphans().items()):
        progress(f"lab: removing lab {instance}, whose state in {state_dir} is gone")
        teardown(instance, state_dir, [], progress)
        removed.append(instance)
    return removed


class Lab:
    """One lab instance, identified by its state directory."""

    def __init__(self, state_dir: Path | str | None = None, progress: Callable[[str], None] = _stderr):
        self.state_dir = Path(state_dir).absolute() if state_dir else default_state_dir()
        self.progress = progress

    # -- paths -------------------------------------------------------------------------------

    @property
    def known_hosts(self) -> Path:
        return ssh.known_hosts_file(self.state_dir)

    def _host_dir(self, name: str) -> Path:
        return self.state_dir / "hosts" / name

    # -- reading -----------------------------------------------------------------------------

    def state(self) -> LabState:
        """The recorded state with each host's `state` refreshed; LabNotUpError if there is none."""
        current = statefile.load(self.state_dir)
        if current is None or not current.hosts:
            raise LabNotUpError(f"the lab in {self.state_dir} is not up; start it with `nixcache lab up`")
        for host in current.hosts:
            host.state = "running" if machine.is_machine(host.pid, Path(host.root)) else "stopped"
        return current

    def status(self) -> list[Host]:
        """Every host of the lab with its current state."""
        return self.state().hosts

    def host(self, name: str) -> Host:
        """The host called `name`; UnknownHostError naming the known ones otherwise."""
        return self._named(self.state(), name)

    def _named(self, current: LabState, name: str) -> Host:
        found = current.host(name)
        if found is None:
            known = ", ".join(host.name for host in current.hosts)
            raise UnknownHostError(f"no lab host named {name!r} in {self.state_dir}; its hosts are: {known}")
        return found

    def environ(self) -> dict[str, str]:
        """os.environ with NIXCACHE_LAB_DIR pointing at this lab, for `pyinfra inventories/lab.py`."""
        return {**os.environ, "NIXCACHE_LAB_DIR": str(self.state_dir)}

    def ssh_command(self, host: Host) -> list[str]:
        """argv prefix of `ssh` to `host` with the lab key (append `--` and a command)."""
        return ssh.ssh_argv(Path(host.ssh_key), host.address, host.ssh_port, self.known_hosts, host.ssh_user)

    def run(self, name: str, command: list[str], timeout: float = 60) -> tuple[int, str]:
        """Run `command` on host `name` over SSH: (exit code, output)."""
        return ssh.probe(self.ssh_command(self.host(name)), command, timeout)

    # -- changing ----------------------------------------------------------------------------

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """One command at a time per instance (two `up`s racing would double-boot hosts)."""
        return locked(self.state_dir / "lock")

    def up(self, hosts: int = 3, *, rebuild: bool = False, timeout: float = READY_TIMEOUT) -> list[Host]:
        """Make hosts lab1..lab<hosts> run and be ready; harmless when they already are.

        Restarts hosts whose machine died (stale pid, crash, killed run) and repairs their
        network. Hosts beyond `hosts` that already exist are left as they are.
        """
        if hosts < 1:
            raise LabError(f"--hosts must be at least 1, not {hosts}")
        prereqs.ensure(progress=self.progress)
        with self._locked():
            current = statefile.load(self.state_dir) or LabState(instance=self._unused_instance_id())
            statefile.save(self.state_dir, current)  # the id is on disk before anything carries it
            registry.register(current.instance, self.state_dir)
            base = image.ensure(self.progress, rebuild=rebuild)
            current.image = str(base)
            if rebuild and current.hosts:
                self.progress(
                    "lab: hosts that already run keep their image; "
                    "`nixcache lab reset NAME` (or down, then up) moves them to the new one"
                )
            key = ssh.ensure_keypair(self.state_dir)
            self._ensure_network(current)
            wanted = [self._host_record(current, index, key) for index in range(1, hosts + 1)]
            statefile.save(self.state_dir, current)
            started = time.monotonic()
            # A machine whose namespace vanished (`ip netns delete`, a cleanup script) runs cut
            # off from the lab network: boot it again into a new one.
            to_boot = [
                host
                for host in wanted
                if not machine.is_machine(host.pid, Path(host.root)) or not network.netns_exists(host.netns)
            ]
            addresses = {host.name: host.address for host in current.hosts}
            for host in wanted:
                network.ensure_host_network(
                    host.netns, host.veth, current.bridge, current.subnet, host.address
                )
            if to_boot:
                names = ", ".join(host.name for host in to_boot)
                self.progress(f"lab: preparing {names} from {base}")
            # A host whose root is complete keeps it (as a machine keeps its disk over a reboot).
            fresh = [host for host in to_boot if not self._prepared(host)]
            with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda host: self._prepare_root(host, base, addresses), fresh))
            for host in to_boot:
                if host not in fresh:
                    self._stop_host(host)
                    rootfs.ensure_mounted(self._host_dir(host.name), host.storage)
            if fresh:
                self.progress(f"lab: {len(fresh)} root(s) created in {time.monotonic() - started:.1f} s")
            for host in to_boot:
                self._boot(host)
                statefile.save(self.state_dir, current)
            self._write_known_hosts(current)
            self._wait_ready(wanted, timeout)
            if to_boot:
                self.progress(
                    f"lab: {len(to_boot)} host(s) booted and ready in {time.monotonic() - started:.1f} s"
                )
            return self.state().hosts

    def reset(self, name: str, *, timeout: float = READY_TIMEOUT) -> Host:
        """Replace host `name` with a fresh copy of the base image, keeping name, address and SSH key."""
        prereqs.ensure(progress=self.progress)
        with self._locked():
            current = self.state()
            self._named(current, name)  # unknown name -> UnknownHostError before anything changes
            index = int(name.removeprefix(HOST_PREFIX))  # the lab names its hosts lab<index>
            host = self._host_record(current, index, ssh.ensure_keypair(self.state_dir))
            base = image.ensure(self.progress)  # the current build: a reset host gets today's image
            current.image = str(base)
            self.progress(f"lab: resetting {name} from {base}")
            self._stop_host(host)
            network.ensure_bridge(current.bridge, current.subnet)
            network.ensure_host_network(host.netns, host.veth, current.bridge, current.subnet, host.address)
            self._prepare_root(host, base, {h.name: h.address for h in current.hosts})
            self._boot(host)
            statefile.save(self.state_dir, current)
            self._write_known_hosts(current)
            self._wait_ready([host], timeout)
            return self.host(name)

    def down(self) -> None:
        """Stop every host and remove namespaces, links, processes, host roots and the state."""
        prereqs.check(["ip"])
        with self._locked():
            current = statefile.load(self.state_dir)
            netns = [h.netns for h in current.hosts if h.netns] if current else []
            teardown(current.instance if current else "", self.state_dir, netns, self.progress)
            self.known_hosts.unlink(missing_ok=True)
            statefile.remove(self.state_dir)
        # The key pair and logs stay: the next `up` reuses the key, and logs explain what happened.

    # -- steps -------------------------------------------------------------------------------

    @staticmethod
    def _unused_instance_id() -> str:
        """A fresh id that no bridge, veth or namespace on this machine carries yet."""
        for _ in range(20):
            instance = statefile.new_instance_id()
            taken = network.links_with_prefix(f"nxb{instance}") + network.links_with_prefix(f"nxv{instance}")
            if not taken and not network.netns_with_prefix(network.netns_name(instance, "")):
                return instance
        raise LabError(
            "could not find an unused lab id in 20 tries; check `ip link` for leftover nxb*/nxv* links"
        )

    def _ensure_network(self, current: LabState) -> None:
        with network.allocation_lock():
            if not current.bridge:
                current.bridge = network.bridge_name(current.instance)
            if not current.subnet or not network.link_exists(current.bridge):
                # New lab, or its bridge is gone (reboot, crash): (re)check the subnet is free.
                used = network.used_networks()
                if not current.subnet or any(
                    ipaddress.ip_network(current.subnet).overlaps(net) for net in used
                ):
                    current.subnet = network.choose_subnet(used)
            current.gateway = network.gateway_address(current.subnet)
            network.ensure_bridge(current.bridge, current.subnet)
            statefile.save(self.state_dir, current)

    def _host_record(self, current: LabState, index: int, key: Path) -> Host:
        name = host_name(index)
        host = current.host(name)
        if host is None:
            host = Host(name=name, address="", ssh_key=str(key))
            current.hosts.append(host)
        host.address = network.host_address(current.subnet, index)
        host.ssh_key = str(key)
        host.netns = network.netns_name(current.instance, name)
        host.veth = network.veth_name(current.instance, index)
        host.cgroup = f"{current.instance}/{name}"
        host.root = str(self._host_dir(name) / "root")
        host.log = str(self.state_dir / "logs" / f"{name}.log")
        return host

    def _stop_host(self, host: Host) -> None:
        pids = machine.machines_under(self._host_dir(host.name))
        if host.pid and machine.is_machine(host.pid, Path(host.root)):
            pids.append(host.pid)
        machine.stop(sorted(set(pids)), host.cgroup)
        machine.remove_cgroups(host.cgroup)
        host.pid = None
        host.state = "stopped"

    def _prepared(self, host: Host) -> bool:
        return rootfs.is_complete(self._host_dir(host.name)) and host.storage in ("overlay", "copy")

    def _prepare_root(self, host: Host, base: Path, addresses: dict[str, str]) -> None:
        self._stop_host(host)
        host_dir = self._host_dir(host.name)
        root, host.storage = rootfs.create(base, host_dir)
        machine.personalise(root, host.name, ssh.public_key(Path(host.ssh_key)), addresses)
        rootfs.mark_complete(host_dir, base)

    def _boot(self, host: Host) -> None:
        host.pid = machine.start(Path(host.root), host.name, host.netns, Path(host.log), host.cgroup)
        host.state = "running"

    def _write_known_hosts(self, current: LabState) -> None:
        """Pin each host's current SSH host keys (read from its root) for ssh and pyinfra."""
        lines = []
        for host in current.hosts:
            for pub in sorted(Path(host.root, "etc/ssh").glob("ssh_host_*_key.pub")):
                kind, blob = pub.read_text().split()[:2]
                target = host.address if host.ssh_port == 22 else f"[{host.address}]:{host.ssh_port}"
                lines.append(f"{target} {kind} {blob}")
        tmp = self.known_hosts.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.known_hosts)

    def _wait_ready(self, hosts: list[Host], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
            results = list(pool.map(lambda host: self._wait_host(host, deadline), hosts))
        for host, (system_state, failed) in zip(hosts, results, strict=True):
            if system_state == "degraded":
                self.progress(f"lab: {host.name} is degraded; failed units: {failed or 'unknown'}")

    def _wait_host(self, host: Host, deadline: float) -> tuple[str, str]:
        argv = self.ssh_command(host)
        last = "no answer yet"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LabError(
                    f"lab host {host.name} ({host.address}) was not ready in time (last: {last}); "
                    f"see its console log {host.log}"
                )
            if not machine.is_machine(host.pid, Path(host.root)):
                raise LabError(f"lab host {host.name} stopped while booting; see its console log {host.log}")
            code, output = ssh.probe(argv, ["systemctl", "is-system-running", "--wait"], min(remaining, 30))
            state = output.splitlines()[-1].strip() if output else ""
            if state in ("running", "degraded"):
                failed = ""
                if state == "degraded":
                    _, failed = ssh.probe(argv, ["systemctl", "--failed", "--plain", "--no-legend"], 10)
                    failed = " ".join(line.split()[0] for line in failed.splitlines() if line.strip())
                return state, failed
            last = output or f"exit {code}"
            time.sleep(0.3)
