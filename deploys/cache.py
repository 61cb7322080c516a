"""The main job: a bare Debian host becomes a hardened, monitored, signed nixcache server.

    pyinfra -y inventories/lab.py deploys/cache.py

Order: base (packages, admins, sshd, kernel, limits) -> storage -> install -> config and keys
-> on hosts that build (nix_host or group `builders`), Nix (deploys/parts/nixhost.py)
-> service -> firewall -> on hosts of group `origin`, the environment's S3 origin (SeaweedFS,
deploys/parts/origin.py) -> gc -> verify -> backups -> monitoring -> nginx front -> on hosts of group
`monitoring`, the fleet's Prometheus and Alertmanager -> health check.
Every step is an operation from operations/ that changes nothing on a converged host, so a
second run reports no changes. Values come from host data (operations/settings.py).
"""

from __future__ import annotations

import functools

from pyinfra import host
from pyinfra.api import HiddenValue
from pyinfra.operations import files

from deploys.parts.backup import backup_timer
from deploys.parts.base import base
from deploys.parts.monitoring import monitoring
from deploys.parts.monitoring_server import MONITORING_GROUP, monitoring_server
from deploys.parts.nginx_front import nginx_front
from deploys.parts.nixhost import is_nix_host, nix_host
from deploys.parts.origin import ORIGIN_GROUP, origin_server
from deploys.parts.origin import s3_keys as origin_s3_keys
from facts.nixcache import HostPython
from nixcache.keys import SecretKey
from nixcache.secrets import ensure_signing_key, ensure_token
from operations import (
    client,
    config,
    firewall,
    gc,
    health,
    hostfile,
    install,
    rotation,
    service,
    storage,
    verify,
)
from operations.render import sha256
from operations.settings import (
    CONFIG_FILE,
    PUSH_TOKEN_FILE,
    READ_TOKEN_FILE,
    S3_ACCESS_KEY_FILE,
    S3_SECRET_KEY_FILE,
    SIGNING_KEY_FILE,
    SettingsError,
    host_secret,
    settings,
)

s = settings()
if not client.is_cache(s):
    raise SettingsError(
        f"{host.name}: is a Nix client of the caches (client_cache_group or client_caches is set), "
        "not a cache: deploys/cache.py would make it one; deploy it with deploys/client.py, and "
        "this file with --limit <the caches' group> (deploys/rotate_key.py deploys both)"
    )
if s.backup_store and not s.signing_key_ref:
    raise SettingsError(
        f"{host.name}: is a backup repository host only (backup_store, no signing_key_ref), not a "
        "cache; deploy it with deploys/backup.py, and this file with --limit <the caches' group>"
    )

# --- base: packages, admin users, sshd, sysctls, limits --------------------------------------
base(config=s)

# --- storage ---------------------------------------------------------------------------------
storage.service_user(name="nixcache service user", user=s.service_user, home=s.cache_data_dir)
if s.cache_volume_device:
    storage.volume(
        name=f"Store volume {s.cache_volume_device}",
        device=s.cache_volume_device,
        mountpoint=s.cache_data_dir,
        options=s.cache_volume_options,
        format_empty=s.cache_volume_format,
    )
files.directory(
    name="Cache data directory", path=s.cache_data_dir, user=s.service_user, group=s.service_user, mode="0750"
)
files.directory(
    name="Cache store directory", path=s.store_dir, user=s.service_user, group=s.service_user, mode="0750"
)

# --- install: the controller's checkout, for the host's Python --------------------------------
python = host.get_fact(HostPython)
if python is None:
    raise SettingsError(
        f"{host.name}: cannot tell the host's Python version (no python3, unknown release); "
        "install python3 on the host and rerun"
    )
build = install.build_key(python)
install.nixcache(name=f"nixcache {build} in /opt/nixcache/venv", python=python)
install.command_on_path(name=f"nixcache on PATH ({install.COMMAND_LINK})")

# --- config and keys ------------------------------------------------------------------------
signing_key = host_secret(
    "signing key",
    "signing_key_ref",
    s.signing_key_ref,
    functools.partial(ensure_signing_key, name=s.key_name(host.name), generate=s.signing_key_generate),
)
push_token = host_secret(
    "push token",
    "push_token_ref",
    s.push_token_ref,
    functools.partial(ensure_token, generate=s.push_token_generate),
)
read_token = (
    host_secret(
        "read token",
        "read_token_ref",
        s.read_token_ref,
        functools.partial(ensure_token, generate=s.read_token_generate),
    )
    if s.read_token_ref
    else None
)
# The origin tier's S3 credentials (nixcache.server.tiers), when host data names an origin.
runs_origin = ORIGIN_GROUP in host.groups
s3_keys = origin_s3_keys(s) if s.origin_endpoint or runs_origin else None
# The server's copy of them, when it uses an origin.
server_s3_keys = s3_keys if s3_keys and s.origin_endpoint else ()
# A cache host that runs Nix (deploys/parts/nixhost.py) also serves its own /nix/store.
serves_nix_store = is_nix_host(s)
config_text = config.render_config(
    s, push_token=True, read_token=read_token is not None, nix_store=serves_nix_store
)


def service_secret(name: str, path: str, value: HiddenValue) -> None:
    """A key or token only the service reads: 0600, owned by the service user."""
    hostfile.put(name=name, path=path, content=value, user=s.service_user, group=s.service_user, mode="0600")


config.config_dir(name="/etc/nixcache", user=s.service_user)
hostfile.put(
    name="/etc/nixcache/config.toml", path=CONFIG_FILE, content=config_text, group=s.service_user, mode="0640"
)
service_secret("Signing key", SIGNING_KEY_FILE, signing_key)
# During a key rotation: the next key beside the current one (operations/rotation.py).
next_signing_key = rotation.next_key(s, host.name)
if next_signing_key is not None:
    service_secret("Next signing key", rotation.NEXT_SIGNING_KEY_FILE, next_signing_key)
service_secret("Push token", PUSH_TOKEN_FILE, push_token)
if read_token is not None:
    service_secret("Read token", READ_TOKEN_FILE, read_token)
for path, value in zip((S3_ACCESS_KEY_FILE, S3_SECRET_KEY_FILE), server_s3_keys, strict=False):
    service_secret(f"Origin credential {path}", path, value)

# The public keys the server signs with, in its order (one, or two during a rotation).
key_values = {SIGNING_KEY_FILE: signing_key, rotation.NEXT_SIGNING_KEY_FILE: next_signing_key}
public_keys = [str(SecretKey.parse(key_values[path].unmask()).public()) for path in rotation.key_files(s)]

# --- Nix, on a host that builds: before the service, which reads Nix's database at start -------
if serves_nix_store:
    nix_host(config=s, own_cache=f"http://127.0.0.1:{s.cache_port}", own_keys=public_keys, build=build)

# --- service: restarted only when something it reads changed ----------------------------------
depends_on = "\0".join(
    [
        build,
        sha256(config_text),
        # The next key only joins during a rotation (unchanged digest, no restart, otherwise).
        sha256(signing_key.unmask()) + (sha256(next_signing_key.unmask()) if next_signing_key else ""),
        sha256(push_token.unmask()),
        sha256(read_token.unmask()) if read_token is not None else "",
        *(sha256(key.unmask()) for key in server_s3_keys),
    ]
)
service.nixcache(
    name="nixcache.service", settings=s, depends_on=sha256(depends_on), nix_store=serves_nix_store
)
if next_signing_key is None:
    # No rotation under way (any more): the server reads signing-key only, so the next key of a
    # finished rotation goes, once the service runs without it.
    files.file(name="No next signing key", path=rotation.NEXT_SIGNING_KEY_FILE, present=False)

# --- firewall --------------------------------------------------------------------------------
firewall.ruleset(
    name="nftables firewall",
    content=firewall.render_ruleset(
        s, ssh_port=int(host.data.get("ssh_port") or 22), runs_origin=runs_origin
    ),
)

# --- the environment's S3 origin beside this cache, on hosts of group `origin` ------------------
# After the firewall, which opens origin_s3_port: the bucket is checked from the controller.
if runs_origin:
    origin_server(config=s, keys=s3_keys)

# --- garbage collection ------------------------------------------------------------------------
gc.timer(name="nixcache-gc.timer", settings=s, depends_on=build)
gc.origin_timer(name="nixcache-gc-origin.timer", settings=s, host_name=host.name, depends_on=build)
verify.timer(name="nixcache-verify.timer", settings=s, depends_on=build)

# --- backups, monitoring and nginx front --------------------------------------------------------
backup_timer()
monitoring(config=s, public_keys=public_keys, build=build)
nginx_front(config=s, read_token=read_token, serves_nix_store=serves_nix_store)
# The Prometheus of the fleet, on the hosts of group `monitoring` (deploys/monitoring.py alone).
if MONITORING_GROUP in host.groups:
    monitoring_server(config=s)

# --- last: the cache answers from the controller's side ----------------------------------------
address = host.data.get("ssh_hostname") or host.name
health.cache_info(
    name="Health check: /nix-cache-info from the controller",
    url=f"http://{address}:{s.cache_port}/nix-cache-info",
    timeout=s.health_check_timeout,
    read_token=read_token,
)
