"""The lab network: one bridge and one /24 per lab instance, one network namespace per host.

Each instance gets its own 10.231.X.0/24, X chosen so that it overlaps no IPv4 address or
route already on the machine (other lab instances included, since their bridges carry their
gateway address). The controller holds .1 on the bridge `nxb<id>`; host i is .(10+i), on
`eth0` inside its namespace, wired to the bridge by the veth `nxv<id><i>`. Hosts on one
bridge reach each other directly, so deploys can allow the whole lab network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Iterable
from pathlib import Path

from nixcache.lab.command import run
from nixcache.lab.errors import LabError
from nixcache.lab.lock import locked

LAB_PREFIX = ipaddress.ip_network("10.231.0.0/16")
NETNS_DIR = Path("/run/netns")
ALLOCATION_LOCK = Path("/run/lock/nixcache-lab.lock")
HOST_OFFSET = 10  # host i lives at .(10+i); .1 is the controller


def bridge_name(instance: str) -> str:
    return f"nxb{instance}"


def veth_name(instance: str, index: int) -> str:
    name = f"nxv{instance}{index}"
    if len(name) > 15:
        raise LabError(f"host index {index} makes the link name {name} longer than Linux's 15 characters")
    return name


def netns_name(instance: str, host: str) -> str:
    return f"nixcache-lab-{instance}-{host}"


def host_address(subnet: str, index: int) -> str:
    """The address of host `index` (1-based) in `subnet`."""
    network = ipaddress.ip_network(subnet)
    if not 1 <= index <= 240:
        raise LabError(f"a lab holds at most 240 hosts; {index} asked for")
    return str(network.network_address + HOST_OFFSET + index)


def gateway_address(subnet: str) -> str:
    return str(ipaddress.ip_network(subnet).network_address + 1)


def used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the machine already has an address in or a route to."""
    networks: list[ipaddress.IPv4Network] = []
    for link in json.loads(run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]"):
        for info in link.get("addr_info", []):
            networks.append(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network)
    for route in json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]"):
        destination = route.get("dst", "")
        if destination and destination != "default":
            with contextlib.suppress(ValueError):
                networks.append(ipaddress.ip_network(destination, strict=False))
    return [network for network in networks if isinstance(network, ipaddress.IPv4Network)]


def choose_subnet(used: Iterable[ipaddress.IPv4Network]) -> str:
    """The first 10.231.X.0/24 (X from 1) overlapping none of `used`."""
    used = list(used)
    for candidate in list(LAB_PREFIX.subnets(new_prefix=24))[1:]:
        if not any(candidate.overlaps(network) for network in used):
            return str(candidate)
    raise LabError(
        f"every /24 in {LAB_PREFIX} is already in use on this machine; "
        "run `nixcache lab down` in the labs you no longer need"
    )


def allocation_lock() -> contextlib.AbstractContextManager[None]:
    """Serialise subnet choice and bridge creation between lab instances on this machine."""
    return locked(ALLOCATION_LOCK)


def link_exists(name: str) -> bool:
    return run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def links_with_prefix(prefix: str) -> list[str]:
    """Names of links in the root namespace starting with `prefix`."""
    links = json.loads(run(["ip", "-j", "link", "show"]).stdout or "[]")
    return [link["ifname"] for link in links if link.get("ifname", "").startswith(prefix)]


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_with_prefix(prefix: str) -> list[str]:
    result = run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    return [name for name in names if name.startswith(prefix)]


def ensure_bridge(name: str, subnet: str) -> None:
    """Create the instance's bridge with the controller's address, unless it is already there."""
    gateway = f"{gateway_address(subnet)}/{ipaddress.ip_network(subnet).prefixlen}"
    if not link_exists(name):
        run(["ip", "link", "add", name, "type", "bridge"])
    existing = run(["ip", "-j", "-4", "addr", "show", "dev", name]).stdout
    if gateway.split("/")[0] not in existing:
        run(["ip", "addr", "add", gateway, "dev", name])
    run(["ip", "link", "set", name, "up"])


def ensure_host_network(netns: str, veth: str, bridge: str, subnet: str, address: str) -> None:
    """Give a host its namespace with eth0 at `address`, wired to `bridge`; repair what is missing."""
    prefixlen = ipaddress.ip_network(subnet).prefixlen
    if not netns_exists(netns):
        run(["ip", "netns", "add", netns])
    inside = ["ip", "netns", "exec", netns]
    has_eth0 = run([*inside, "ip", "link", "show", "dev", "eth0"], check=False).returncode == 0
    if not has_eth0:
        if link_exists(veth):
            run(["ip", "link", "del", veth])  # a stale half of a pair whose peer is gone
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
    run(["ip", "link", "set", veth, "master", bridge])
    run(["ip", "link", "set", veth, "up"])
    current = run([*inside, "ip", "-j", "-4", "addr", "show", "dev", "eth0"]).stdout
    if f'"{address}"' not in current:
        run([*inside, "ip", "addr", "flush", "dev", "eth0"])
        run([*inside, "ip", "addr", "add", f"{address}/{prefixlen}", "dev", "eth0"])
    run([*inside, "ip", "link", "set", "lo", "up"])
    run([*inside, "ip", "link", "set", "eth0", "up"])
    # No default route on purpose: lab hosts talk to the lab network only, and anything else
    # fails at once ("Network is unreachable") instead of hanging until a timeout.


def delete_netns(name: str) -> None:
    """Delete a namespace; its veth ends (and their peers in the root namespace) go with it."""
    if netns_exists(name):
        run(["ip", "netns", "delete", name], check=False)
    # `ip netns add` can leave the file behind if it died mid-way; unmount and remove it.
    path = NETNS_DIR / name
    if path.exists():
        run(["umount", "-l", str(path)], check=False)
        path.unlink(missing_ok=True)


def delete_link(name: str) -> None:
    if link_exists(name):
        run(["ip", "link", "del", name], check=False)
