"""Host-side backups with restic: `nixcache backup run | list | restore | check`."""
