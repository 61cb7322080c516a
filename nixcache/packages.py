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

ALL_PACKAGES: tuple[str, ...] = CACHE_HOST_PACKAGES + NGINX_FRONT_PACKAGES + NIX_CLIENT_PACKAGES
