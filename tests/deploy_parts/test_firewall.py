"""The firewall's accept rules follow the ports the deploy configures."""

from __future__ import annotations

from operations.firewall import Rule, rules
from operations.settings import from_data


def test_the_open_ports_are_those_of_the_services():
    s = from_data(
        "cache-eu-central",
        {
            "cache_allowed_sources": ["10.0.0.0/24", "fd00::/64"],
            "metrics_allowed_sources": ["10.9.0.0/24"],
            "cache_nginx_front": True,
            "nginx_https_port": 8443,
            "node_exporter_listen": "127.0.0.1:9200",
        },
    )
    assert [(r.family, r.sources, r.ports) for r in rules(s, ssh_port=2222)] == [
        ("ip", ("10.0.0.0/24",), (2222,)),
        ("ip6", ("fd00::/64",), (2222,)),
        ("ip", ("10.0.0.0/24",), (5000, 8443)),
        ("ip6", ("fd00::/64",), (5000, 8443)),
        # /metrics is on the cache port: the scraping Prometheus needs both.
        ("ip", ("10.9.0.0/24",), (5000, 9200)),
    ]


def test_without_the_front_only_the_cache_port_opens_and_metrics_stay_closed():
    s = from_data("lab1", {"cache_allowed_sources": ["10.0.0.0/24"]})
    assert rules(s) == [
        Rule("ip", ("10.0.0.0/24",), (22,), "SSH for admins and deploys (ssh_allowed_sources)"),
        Rule("ip", ("10.0.0.0/24",), (5000,), "the cache (cache_allowed_sources)"),
    ]


def test_the_s3_port_opens_only_on_the_host_that_runs_the_origin():
    # The lab's group data gives every lab host the same origin_allowed_sources; SeaweedFS
    # listens on the host of group `origin` only, and only there does the port open.
    s = from_data(
        "lab2", {"cache_allowed_sources": ["10.231.2.0/24"], "origin_allowed_sources": ["10.231.2.0/24"]}
    )
    s3 = Rule("ip", ("10.231.2.0/24",), (8333,), "the S3 origin (origin_allowed_sources)")
    assert s3 in rules(s, runs_origin=True)
    assert [r.ports for r in rules(s, runs_origin=False)] == [(22,), (5000,)]
