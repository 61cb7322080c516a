"""The production fleet: three environments across four regions.

    pyinfra inventories/prod.py deploys/cache.py                     # the whole fleet
    pyinfra inventories/prod.py deploys/cache.py --limit canary      # one environment
    pyinfra inventories/prod.py deploys/cache.py --limit eu_central  # one region

Hosts are addressed as ``cache-<region>[-<env>].<fleet_domain>``: production hosts carry no
environment suffix. ``fleet_domain`` is read from inventories/group_data/all.py; the default
below is a reserved name that never resolves, so a fleet without its own domain fails at
connect time instead of reaching someone else's machines.

Groups: ``production``, ``staging``, ``canary`` (data in group_data/<env>.py) and one per
region (``eu_central``, ``us_east``, ``us_west``, ``ap_southeast``; group_data/<region>.py
when a region needs its own values).
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
