"""nftables: default-deny inbound, SSH / cache / metrics ports open only to the networks in data.

A new ruleset is checked with `nft -c -f` before it replaces /etc/nftables.conf (the one file
primitive, operations/hostfile.py), then loaded in one atomic `nft -f`; the "established" rule
comes first, so the deploy's own SSH session survives the reload. nftables.service loads it at
boot (pyinfra's `systemd.service`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import OperationError, QuoteString, StringCommand, operation
from pyinfra.operations import systemd

from facts.nixcache import NftTable
from operations import hostfile
from operations.render import render
from operations.settings import NFTABLES_FILE, Settings

TABLE = ("inet", "nixcache")


@dataclass(frozen=True)
class Rule:
    """Accept TCP `ports` from `sources` (one address family)."""

    family: str  # "ip" or "ip6"
    sources: tuple[str, ...]
    ports: tuple[int, ...]
    why: str


def _split(sources: Iterable[str]) -> dict[str, tuple[str, ...]]:
    networks = [ipaddress.ip_network(s, strict=False) for s in sources]
    return {
        "ip": tuple(str(n) for n in networks if n.version == 4),
        "ip6": tuple(str(n) for n in networks if n.version == 6),
    }


def node_exporter_port(listen: str) -> int:
    """The port of node exporter's `[address]:port` listen setting."""
    return int(listen.rsplit(":", 1)[1])


def rules(settings: Settings, ssh_port: int = 22, *, runs_origin: bool = False) -> list[Rule]:
    """The accept rules for `settings`, in order; origin_s3_port only on a host that `runs_origin`
    (SeaweedFS listens nowhere else, though origin_allowed_sources may be group data of all)."""
    cache_ports = {settings.cache_port}
    if settings.cache_nginx_front:
        # The server's own port stays open: the deploy's health check asks it directly.
        cache_ports.add(settings.nginx_https_port)
    # The cache's own /metrics is served on its port: a Prometheus that may scrape node exporter
    # may scrape the cache too, without being one of its clients (cache_allowed_sources).
    metrics_ports = tuple(sorted({settings.cache_port, node_exporter_port(settings.node_exporter_listen)}))
    wanted = [
        (settings.ssh_sources, (ssh_port,), "SSH for admins and deploys (ssh_allowed_sources)"),
        (settings.cache_allowed_sources, tuple(sorted(cache_ports)), "the cache (cache_allowed_sources)"),
        (
            settings.metrics_allowed_sources,
            metrics_ports,
            "node exporter and the cache's /metrics (metrics_allowed_sources)",
        ),
    ]
    if runs_origin:
        wanted.append(
            (
                settings.origin_allowed_sources,
                (settings.origin_s3_port,),
                "the S3 origin (origin_allowed_sources)",
            )
        )
    if settings.backup_store:
        wanted.append(
            (
                settings.backup_store_allowed_sources,
                (settings.backup_store_port,),
                "the backup repository for the cache hosts (backup_store_allowed_sources)",
            )
        )
    out = []
    for sources, ports, why in wanted:
        for family, networks in _split(sources).items():
            if networks:
                out.append(Rule(family, networks, ports, why))
    return out


def render_ruleset(settings: Settings, ssh_port: int = 22, *, runs_origin: bool) -> str:
    """The text of /etc/nftables.conf for `settings`; `runs_origin`: the host runs the S3 origin
    (every deploy that renders the ruleset says so alike, so none of them closes what another opened)."""
    if not settings.ssh_sources:
        raise OperationError(
            f"{host.name}: cache_allowed_sources and ssh_allowed_sources are both empty, so the firewall "
            "would lock everyone out; set cache_allowed_sources to the client networks"
        )
    return render("nftables.conf.j2", rules=rules(settings, ssh_port, runs_origin=runs_origin))


@operation()
def ruleset(content: str, path: str = NFTABLES_FILE):
    """`path` holds `content`, it is the loaded ruleset, and nftables.service loads it at boot."""
    loaded = host.get_fact(NftTable, family=TABLE[0], table=TABLE[1])
    changed = hostfile.differs(path, content)
    # Checked first: a ruleset that does not parse never replaces the working one.
    yield from hostfile.put._inner(
        path,
        content,
        check="nft -c -f {path}",
        fix="fix the *_allowed_sources networks in host data, then rerun",
    )
    if changed or not loaded:
        yield StringCommand("nft -f", QuoteString(path))
    yield from systemd.service._inner("nftables.service", running=None, enabled=True)
