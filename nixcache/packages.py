"""Debian packages that nixcache's deploys install.

One list, two users: the deploys install these on cache hosts, and the lab bakes them
into its base image because lab hosts have no route to a package registry.
"""

# Every cache host, whatever its options.
CACHE_HOST_PACKAGES: tuple[str, ...] = (
    "ca-certificates",
    "nftables",  # default-deny firewall
    "openssh-server",
    "prometheus-node-exporter",  # host metrics and the textfile collector
    "python3",
    "python3-venv",  # /opt/nixcache/venv
    "restic",  # scheduled backups
    "sudo",  # admin users
    "curl",  # local health probes in units and the runbook
)

# Only with cache_nginx_front = True.
NGINX_FRONT_PACKAGES: tuple[str, ...] = (
    "nginx-light",
    "openssl",  # self-signed certificate in the lab
)

# Hosts configured by deploys/client.py.
NIX_CLIENT_PACKAGES: tuple[str, ...] = ("nix-bin",)

# Hosts that run Nix themselves (nix_host, nix_builder: deploys/parts/nixhost.py): Debian's Nix
# with its daemon; nix-setup-systemd creates the nixbld group and build users on install.
NIX_HOST_PACKAGES: tuple[str, ...] = ("nix-bin", "nix-setup-systemd")
# Their daemon, which the package enables on install: only the deploy of a Nix host starts it.
NIX_HOST_SERVICES: tuple[str, ...] = ("nix-daemon.service", "nix-daemon.socket")

# Hosts of the inventory group `monitoring` (deploys/monitoring.py): Debian's Prometheus 2.42,
# Alertmanager 0.25, and the blackbox exporter that reads the nginx fronts' certificates.
MONITORING_PACKAGES: tuple[str, ...] = (
    "prometheus",
    "prometheus-alertmanager",
    "prometheus-blackbox-exporter",
)
# Their services, which the packages enable on install: only the monitoring deploy starts them.
MONITORING_SERVICES: tuple[str, ...] = (
    "prometheus.service",
    "prometheus-alertmanager.service",
    "prometheus-blackbox-exporter.service",
)

ALL_PACKAGES: tuple[str, ...] = tuple(
    dict.fromkeys(
        CACHE_HOST_PACKAGES
        + NGINX_FRONT_PACKAGES
        + NIX_CLIENT_PACKAGES
        + NIX_HOST_PACKAGES
        + MONITORING_PACKAGES
    )
)
