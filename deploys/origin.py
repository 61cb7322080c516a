"""The environment's S3 origin (SeaweedFS) on this host, for the caches' tiers (issue 12).

    pyinfra -y --limit lab1 inventories/lab.py deploys/origin.py

Order: service user and data dir -> the `weed` binary -> identity file from the secret refs
-> seaweedfs.service -> the bucket exists (checked from the controller). Every step changes
nothing on a converged host. In production the origin is whatever S3 the operator runs; this
deploy is for the lab and for self-hosted fleets. The firewall is rendered by the same code as
the cache deploy's (origin_allowed_sources opens origin_s3_port), so the two deploys agree.
"""

from __future__ import annotations

import functools

from pyinfra import host
from pyinfra.api import HiddenValue
from pyinfra.operations import files

from facts.nixcache import HostPython
from nixcache.secrets import ensure_token
from operations import firewall, hostfile, origin, storage
from operations.render import sha256
from operations.settings import SettingsError, host_secret, settings

s = settings()

storage.service_user(name="SeaweedFS service user", user=s.origin_user, home=s.origin_data_dir)
files.directory(
    name="SeaweedFS data directory",
    path=s.origin_data_dir,
    user=s.origin_user,
    group=s.origin_user,
    mode="0700",
)

python = host.get_fact(HostPython)
if python is None:
    raise SettingsError(
        f"{host.name}: cannot tell the host's machine and glibc (no python3); install python3"
    )
origin.binary(
    name=f"SeaweedFS {s.origin_seaweedfs_version}", version=s.origin_seaweedfs_version, python=python
)

access_key = host_secret(
    "S3 access key",
    "origin_access_key_ref",
    s.origin_access_key_ref,
    functools.partial(ensure_token, generate=s.origin_credentials_generate),
)
secret_key = host_secret(
    "S3 secret key",
    "origin_secret_key_ref",
    s.origin_secret_key_ref,
    functools.partial(ensure_token, generate=s.origin_credentials_generate),
)
identities = origin.identities_json(access_key.unmask(), secret_key.unmask())
files.directory(name=origin.CONFIG_DIR, path=origin.CONFIG_DIR, user="root", group=s.origin_user, mode="0750")
hostfile.put(
    name="SeaweedFS S3 identities",
    path=origin.IDENTITIES_FILE,
    content=HiddenValue(identities, masked_value="<S3 identities>"),
    user=s.origin_user,
    group=s.origin_user,
    mode="0600",
)

# The same ruleset the cache deploy renders (one renderer): origin_s3_port open to
# origin_allowed_sources, SSH to its sources, everything else dropped.
firewall.ruleset(
    name="nftables firewall",
    content=firewall.render_ruleset(s, ssh_port=int(host.data.get("ssh_port") or 22)),
)

origin.seaweedfs_service(name="seaweedfs.service", settings=s, identities_digest=sha256(identities))

origin.bucket(
    name=f"S3 bucket {s.origin_bucket} answers from the controller",
    endpoint=f"{origin.bind_address(s)}:{s.origin_s3_port}",
    bucket_name=s.origin_bucket,
    access_key=access_key,
    secret_key=secret_key,
)
