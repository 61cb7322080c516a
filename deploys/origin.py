"""The environment's S3 origin (SeaweedFS) on a host of its own, for the caches' tiers (issue 12).

    pyinfra -y --limit lab1 inventories/lab.py deploys/origin.py

The main job (deploys/cache.py) already runs it on the cache hosts of group `origin` (the
lab's lab1); this deploy is for an origin host that is not a cache. In production the origin
is whatever S3 the operator runs (docs/runbook.md, pointing an environment at its S3).
Its hosts must be in group `origin`, as the main job's are: the firewall opens origin_s3_port on
hosts of that group only. Steps: the firewall (the same ruleset the cache deploy renders:
origin_s3_port open to origin_allowed_sources, SSH to its sources, everything else dropped),
then deploys/parts/origin.py. Every step changes nothing on a converged host.
"""

from __future__ import annotations

from pyinfra import host

from deploys.parts.origin import ORIGIN_GROUP, origin_server
from operations import firewall
from operations.settings import SettingsError, settings

s = settings()
if ORIGIN_GROUP not in host.groups:
    # Every deploy renders the one ruleset, which opens origin_s3_port on hosts of that group only.
    raise SettingsError(
        f"{host.name}: deploys/origin.py runs the S3 origin on hosts of inventory group "
        f"'{ORIGIN_GROUP}' only, and this host is not in it; add it to that group"
    )

firewall.ruleset(
    name="nftables firewall",
    content=firewall.render_ruleset(s, ssh_port=int(host.data.get("ssh_port") or 22), runs_origin=True),
)
origin_server(config=s)
