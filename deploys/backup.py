"""Backups alone: the sftp repository host(s), then every cache host's backup timer.

    pyinfra -y inventories/lab.py deploys/backup.py

deploys/cache.py runs the same timer part; this file exists to change backup settings (or add
a repository host) without touching anything else.
"""

from deploys.parts.backup import backup_store, backup_timer

backup_store()
backup_timer()
