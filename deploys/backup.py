"""Backups alone: the backup repository host(s), then every cache host's backup timer.

    pyinfra -y inventories/lab.py deploys/backup.py

deploys/cache.py runs the same timer part; this file exists to change backup settings (or add
a repository host) without touching anything else. Run it on the repository host after adding
a cache host to the inventory: it creates that host's credential there (append-only REST
server, docs/decisions/0008-isolated-append-only-backups.md).
"""

from deploys.parts.backup import backup_store, backup_timer

backup_store()
backup_timer()
