"""The production fleet: three environments across four regions.

    pyinfra inventories/prod.py deploys/cache.py --exclude backups   # every cache
    pyinfra inventories/prod.py deploys/cache.py --limit canary      # one environment
    pyinfra inventories/prod.py deploys/cache.py --limit eu_central  # one region

Hosts are addressed as ``cache-<region>[-<env>].<fleet_domain>``: production hosts carry no
environment suffix. ``fleet_domain`` is read from inventories/group_data/all.py; the default
below is a reserved name that never resolves, so a fleet without its own domain fails at
connect time instead of reaching someone else's machines.

Groups: ``production``, ``staging``, ``canary`` (data in group_data/<env>.py) and one per
region (``eu_central``, ``us_east``, ``us_west``, ``ap_southeast``; group_data/<region>.py
when a region needs its own values).

``backups`` is the fleet's backup repository host (``backup.<fleet_domain>``, data in
group_data/backups.py): not a cache. Every cache backs up to it, each with its own credential,
append-only (docs/decisions/0008-isolated-append-only-backups.md). It is deployed by
deploys/backup.py; deploys/cache.py refuses it, so leave it out of that one:

    pyinfra inventories/prod.py deploys/backup.py --limit backups        # after adding a cache
    pyinfra inventories/prod.py deploys/cache.py --exclude backups       # every cache

``builders`` (caches that also build, deploys/parts/nixhost.py) and ``builders_remote`` (remote
builders, deploys/builder.py) are empty: see the examples beside them.
"""

from __future__ import annotations

import runpy
from pathlib import Path

_DEFAULT_DOMAIN = "fleet.example"  # RFC 2606 reserved: never resolves

# environment -> regions it runs in (the fleet of the reference design).
_FLEET: dict[str, tuple[str, ...]] = {
    "production": ("eu-central", "us-east", "us-west", "ap-southeast"),
    "staging": ("eu-central", "us-east"),
    "canary": ("eu-central",),
}


def _domain() -> str:
    all_data = Path(__file__).resolve().parent / "group_data" / "all.py"
    domain = runpy.run_path(str(all_data)).get("fleet_domain") if all_data.is_file() else None
    return str(domain or _DEFAULT_DOMAIN).strip(".")


def _hostname(region: str, environment: str, domain: str) -> str:
    suffix = "" if environment == "production" else f"-{environment}"
    return f"cache-{region}{suffix}.{domain}"


_domain_name = _domain()
_hosts = {env: [_hostname(r, env, _domain_name) for r in regions] for env, regions in _FLEET.items()}

production = list(_hosts["production"])
staging = list(_hosts["staging"])
canary = list(_hosts["canary"])

eu_central = [h for hosts in _hosts.values() for h in hosts if h.startswith("cache-eu-central")]
us_east = [h for hosts in _hosts.values() for h in hosts if h.startswith("cache-us-east")]
us_west = [h for hosts in _hosts.values() for h in hosts if h.startswith("cache-us-west")]
ap_southeast = [h for hosts in _hosts.values() for h in hosts if h.startswith("cache-ap-southeast")]

# The backup repository host: one for the fleet, in the first region, outside every environment
# (a region that burns down must not take its own backups with it: back up a region's caches
# to a host elsewhere when you have more than one).
backups = [f"backup.{_domain_name}"]

# Caches that build (Nix's daemon, their own /nix/store served before pushed paths): name them
# here, e.g. the eu-central production cache; group data then sets their nix_profile,
# nix_settings and nix_builders (docs/settings.md, "nix_" keys):
#   builders = [_hostname("eu-central", "production", _domain_name)]
builders: list[str] = []
# Remote builders those caches send builds to (deploys/builder.py; their group data says
# nix_builder = True). They are not caches. E.g.:
#   builders_remote = [f"build-1.{_domain_name}"]
# and in group_data/production.py (host_key: `ssh-keyscan -t ed25519 build-1.<domain>`, checked
# out of band; the key pair is nix_builder_ssh_key_ref):
#   nix_builders = [{"host": "build-1.<domain>", "host_key": "ssh-ed25519 AAAA…",
#                    "system": "x86_64-linux", "max_jobs": 8, "speed_factor": 2,
#                    "features": ["big-parallel"], "mandatory_features": []}]
#   nix_builder_ssh_key_ref = "op://nixcache-production/nix-builder-ssh-key/private-key"
builders_remote: list[str] = []
