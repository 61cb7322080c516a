"""Bring a replacement host back: same key, restored store and configuration, proven serving.

    pyinfra -y inventories/prod.py deploys/recover.py --limit cache-eu-central-1

Steps: what the restore needs (packages, service user, the nixcache venv, restic with the
repository's password) -> restore /etc/nixcache and the store from this host's latest
snapshot, only onto an empty store -> the full cache deploy (deploys/cache.py) with key
generation forced off, so a key missing from the secret store stops the run instead of
minting a new one -> proof from the controller: /pubkey lists the stored key and a restored
path is served with a signature that verifies with it.

A repository that cannot be read, or holds no snapshot of this host, stops the run for the
host at the restore, before the backup timer exists: the next backup would otherwise record
the empty store as the newest snapshot. Only a repository that holds no snapshot at all, or
`recover_allow_empty = True` for a genuinely new host, lets it start empty.
"""

from __future__ import annotations

from pyinfra import host, local

from deploys.parts.backup import BACKUP_CONFIG_FILE, backup_timer
from facts.nixcache import HostPython
from nixcache.keys import SecretKey
from nixcache.secrets import SecretError, resolve
from operations import backup, install, recovery, storage
from operations.settings import NIXCACHE_BIN, SettingsError, settings

# A recovered host must sign with the key its clients trust: never generate one here.
host.data.signing_key_generate = False
s = settings()
if not s.signing_key_ref:
    raise SettingsError(
        f"{host.name}: recover: host data 'signing_key_ref' is not set; give the lost host's key ref"
    )
try:
    public_key = str(SecretKey.parse(resolve(s.signing_key_ref)).public())
except (SecretError, ValueError) as error:
    raise SettingsError(
        f"{host.name}: recover, step key: the signing key at {s.signing_key_ref} cannot be read ({error}); "
        "restore it into the secret store (runbook: lost key, `nixcache keys import`) and rerun"
    ) from None

# --- what the restore needs -----------------------------------------------------------------
storage.service_user(name="nixcache service user", user=s.service_user, home=s.cache_data_dir)
python = host.get_fact(HostPython)
if python is None:
    raise SettingsError(f"{host.name}: recover, step install: no python3 on the host; install it and rerun")
install.nixcache(name="nixcache venv (needed by the restore)", python=python)
backup_timer(schedule=False)  # the timer comes with the full deploy, after the restore

# --- restore, only onto an empty store -------------------------------------------------------
if s.backup_repository:
    backup.restore(
        name="Restore /etc/nixcache and the store from the latest snapshot",
        nixcache_bin=NIXCACHE_BIN,
        config_path=BACKUP_CONFIG_FILE,
        store_dir=s.store_dir,
        repository=s.backup_repository,
        # Snapshots are recorded under the inventory name (deploys/parts/backup.py).
        snapshot_host=host.name,
        owner=s.service_user,
        content_dir=f"{s.store_dir}/narinfo",
        allow_empty=s.recover_allow_empty,
    )
elif not s.recover_allow_empty:
    raise SettingsError(
        f"{host.name}: recover: host data 'backup_repository' is not set, so there is nothing to restore"
        " from; set it to the lost host's repository, or set recover_allow_empty = True for a host"
        " that never had backups"
    )

# --- the full cache deploy ------------------------------------------------------------------------
local.include("deploys/cache.py")

# --- proof ----------------------------------------------------------------------------------------
address = host.data.get("ssh_hostname") or host.name
recovery.proof(
    name="Proof: the stored key is served and signs a restored path",
    base_url=f"http://{address}:{s.cache_port}",
    public_key=public_key,
    store=s.store_dir,
    probe_path=s.recover_probe_path,
)
