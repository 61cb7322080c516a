"""Canary cache (group `canary` of inventories/prod.py): production's settings, deployed first.

A change goes to the canary, is watched for a day, then to production. It has its own key
and vault (`nixcache-canary`) so a canary mistake can never leak a production secret.
Network ranges are documentation placeholders (RFC 5737); replace them.
"""

import runpy
from pathlib import Path

apt_update = True

cache_nginx_front = True
tls_cert_ref = "op://nixcache-canary/tls/certificate"
tls_key_ref = "op://nixcache-canary/tls/private-key"

signing_key_name = "nixcache-canary-1"
signing_key_ref = "op://nixcache-canary/signing-key/secret-key"
push_token_ref = "op://nixcache-canary/push-token/credential"  # noqa: S105 - a reference, not the secret
read_token_ref = "op://nixcache-canary/read-token/credential"  # noqa: S105 - a reference, not the secret
alert_webhook_ref = "op://nixcache-canary/alert-webhook/url"

cache_volume_device = "/dev/sdb"
cache_memory_max = "4G"

# Shorter retention than production: the canary sees the same traffic mix, not the same history.
gc_older_than = "30d"
gc_min_free = "50G"
gc_max_free = "100G"
journald_max_retention = "4week"

cache_allowed_sources = ["198.51.100.0/24"]  # placeholder: your CI networks
ssh_allowed_sources = ["192.0.2.0/24"]  # placeholder: your operations network
metrics_allowed_sources = ["192.0.2.0/24"]  # placeholder: your Prometheus
# The `environment` label of this group's metrics: alerts compare hosts of one environment.
monitoring_environment = "canary"

admin_users = []

# --- the environment's origin: one S3 bucket behind every canary cache (issue 12) ------------
# Every canary cache writes pushes through to it (201 only once it holds them) and pulls what
# it lacks from it, so a path pushed in one region is served in all. Placeholder: replace the
# endpoint, region and bucket with your S3's (docs/runbook.md, "Pointing an environment at its
# S3"); the keys are an S3 user that may read, write, list and delete in this bucket only.
origin_endpoint = "https://s3.eu-central-1.amazonaws.com"
origin_region = "eu-central-1"
origin_addressing = "virtual"
origin_bucket = "nixcache-canary"
origin_access_key_ref = "op://nixcache-canary/origin-s3/access-key-id"
origin_secret_key_ref = "op://nixcache-canary/origin-s3/secret-access-key"  # noqa: S105 - a reference, not the secret
# The one host that runs the bucket's retention GC (nixcache-gc-origin.timer), by its inventory
# name as inventories/prod.py spells it: cache-eu-central-canary.<fleet_domain>.
origin_gc_host = next(
    host
    for host in runpy.run_path(str(Path(__file__).resolve().parents[1] / "prod.py"))["canary"]
    if host.startswith("cache-eu-central-canary.")
)
# The canary's bucket keeps two months.
origin_gc_older_than = "60d"
origin_gc_max_size = "200G"

# --- backups: to the fleet's backup repository host (group `backups` of inventories/prod.py) ---
# Append-only, one credential per host ({host} becomes each host's inventory name): a cache can
# add snapshots to its own repository and nothing else. Create both secrets per host before the
# first deploy (`nixcache secrets` or 1Password); the repository host reads them too.
# Plain http: the repository host serves no TLS yet (docs/decisions/0008, Consequences). restic
# encrypts the data, but the credential crosses the network in clear: keep the repository host
# on the fleet's private network until it does.
backup_repository = (
    "rest:http://"
    + runpy.run_path(str(Path(__file__).resolve().parents[1] / "prod.py"))["backups"][0]
    + ":8000/{host}/"
)
backup_password_ref = "op://nixcache-canary/backup-{host}/restic-password"  # noqa: S105 - a reference, not the secret
backup_credential_ref = "op://nixcache-canary/backup-{host}/rest-credential"
