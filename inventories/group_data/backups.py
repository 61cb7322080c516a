"""The backup repository host (group `backups` of inventories/prod.py): overrides of operations/settings.py.

It serves every cache's restic repository with `rclone serve restic --append-only --private-repos`:
each cache logs in as its inventory name with its own credential (backup_credential_ref of its
environment's group data, read here too) and can only add snapshots to /<its name>/; retention
and prune run here, where deletion is allowed (docs/decisions/0008-isolated-append-only-backups.md).
Network ranges are documentation placeholders (RFC 5737); replace them.
"""

apt_update = True
backup_store = True
# The caches' networks: nothing else reaches backup_store_port.
backup_store_allowed_sources = ["198.51.100.0/24", "203.0.113.0/24"]  # placeholder: your caches
ssh_allowed_sources = ["192.0.2.0/24"]  # placeholder: your operations network
# Repositories of a fleet of seven caches with their stores: give it a disk of its own.
backup_store_dir = "/srv/nixcache-backup"
admin_users = []
