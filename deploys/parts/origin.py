"""The environment's S3 origin (SeaweedFS) on the hosts of inventory group `origin`.

Called by deploys/cache.py for a cache host that is also in group `origin` (the lab's first
host: the origin beside its cache), and by deploys/origin.py for a host of its own. The
firewall is not its business: both deploys render the one ruleset, which opens
origin_s3_port to origin_allowed_sources on hosts of group `origin` only.

Order: service user and data dir -> the `weed` binary -> identity file from the secret refs
-> seaweedfs.service -> the bucket exists (checked from the controller). Every step changes
nothing on a converged host.
"""

from __future__ import annotations

import functools

from pyinfra import host
from pyinfra.api import HiddenValue, deploy
from pyinfra.operations import files

from facts.nixcache import HostPython
from nixcache.secrets import ensure_token
from operations import hostfile, origin, storage
from operations.render import sha256
from operations.settings import Settings, SettingsError, host_secret, settings

ORIGIN_GROUP = "origin"


def s3_keys(s: Settings) -> tuple[HiddenValue, HiddenValue]:
    """The origin's S3 access and secret key (created on first use when origin_credentials_generate)."""
    access, secret = (
        host_secret(
            f"S3 {which} key",
            f"origin_{which}_key_ref",
            getattr(s, f"origin_{which}_key_ref"),
            functools.partial(ensure_token, generate=s.origin_credentials_generate),
        )
        for which in ("access", "secret")
    )
    return access, secret


@deploy("nixcache origin: SeaweedFS as the environment's S3 bucket")
def origin_server(
    config: Settings | None = None, keys: tuple[HiddenValue, HiddenValue] | None = None
) -> None:
    """seaweedfs.service serving the bucket `origin_bucket` with the credentials of the
    origin_*_key_ref secrets (`keys`, when the caller resolved them already)."""
    s = config or settings()
    access_key, secret_key = keys or s3_keys(s)
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

    identities = origin.identities_json(access_key.unmask(), secret_key.unmask())
    files.directory(
        name=origin.CONFIG_DIR, path=origin.CONFIG_DIR, user="root", group=s.origin_user, mode="0750"
    )
    hostfile.put(
        name="SeaweedFS S3 identities",
        path=origin.IDENTITIES_FILE,
        content=HiddenValue(identities, masked_value="<S3 identities>"),
        user=s.origin_user,
        group=s.origin_user,
        mode="0600",
    )

    origin.seaweedfs_service(name="seaweedfs.service", settings=s, identities_digest=sha256(identities))

    origin.bucket(
        name=f"S3 bucket {s.origin_bucket} answers from the controller",
        endpoint=f"{origin.bind_address(s)}:{s.origin_s3_port}",
        bucket_name=s.origin_bucket,
        access_key=access_key,
        secret_key=secret_key,
    )
