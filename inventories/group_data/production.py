"""Production caches (group `production` of inventories/prod.py): overrides of operations/settings.py.

Secrets are 1Password references (vault `nixcache-production`), resolved on the controller at
deploy time. Network ranges below are documentation placeholders (RFC 5737): replace them with
your client and operations networks; until then the firewall lets nobody in but loopback.
"""

import runpy
from pathlib import Path

# Production hosts reach the distribution's mirrors: refresh package lists before installing.
apt_update = True

# Clients connect over TLS and HTTP/2 on 443; nginx sends NAR bytes from disk.
cache_nginx_front = True
tls_cert_ref = "op://nixcache-production/tls/certificate"
tls_key_ref = "op://nixcache-production/tls/private-key"

# One signing key per environment: clients trust a single key for the whole fleet, and any
# region can be rebuilt or stand in for another with the same key.
signing_key_name = "nixcache-production-1"
signing_key_ref = "op://nixcache-production/signing-key/secret-key"
push_token_ref = "op://nixcache-production/push-token/credential"  # noqa: S105 - a reference, not the secret
# Private cache: clients present this token (deploys/client.py writes their netrc).
read_token_ref = "op://nixcache-production/read-token/credential"  # noqa: S105 - a reference, not the secret
# Warnings about a filling disk go to the on-call webhook as well as the journal.
alert_webhook_ref = "op://nixcache-production/alert-webhook/url"

# The store on its own disk (the reference layout: system on sda, cache volume on sdb).
cache_volume_device = "/dev/sdb"
cache_memory_max = "4G"

# A quarter of CI history stays warm; GC starts below 50G free and frees up to 100G.
gc_older_than = "90d"
gc_min_free = "50G"
gc_max_free = "100G"

# Four weeks of logs for post-incident reviews.
journald_max_retention = "4week"

cache_allowed_sources = ["198.51.100.0/24"]  # placeholder: your CI and developer networks
ssh_allowed_sources = ["192.0.2.0/24"]  # placeholder: your operations network
metrics_allowed_sources = ["192.0.2.0/24"]  # placeholder: your Prometheus
# The `environment` label of this group's metrics: alerts compare hosts of one environment.
monitoring_environment = "production"

# Admins log in with their own keys; list them here, then set ssh_permit_root_login = "no"
# (the deploy refuses "no" while no admin with sudo and a key is listed).
admin_users = []

# --- the environment's origin: one S3 bucket behind every production cache (issue 12) ------------
# Every production cache writes pushes through to it (201 only once it holds them) and pulls what
# it lacks from it, so a path pushed in one region is served in all. Placeholder: replace the
# endpoint, region and bucket with your S3's (docs/runbook.md, "Pointing an environment at its
# S3"); the keys are an S3 user that may read, write, list and delete in this bucket only.
origin_endpoint = "https://s3.eu-central-1.amazonaws.com"
origin_region = "eu-central-1"
origin_addressing = "virtual"
origin_bucket = "nixcache-production"
origin_access_key_ref = "op://nixcache-production/origin-s3/access-key-id"
origin_secret_key_ref = "op://nixcache-production/origin-s3/secret-access-key"  # noqa: S105 - a reference, not the secret
# The one host that runs the bucket's retention GC (nixcache-gc-origin.timer), by its inventory
# name as inventories/prod.py spells it: cache-eu-central.<fleet_domain>.
origin_gc_host = next(
    host
    for host in runpy.run_path(str(Path(__file__).resolve().parents[1] / "prod.py"))["production"]
    if host.startswith("cache-eu-central.")
)
# Retention on the bucket: the whole environment's history for half a year (the default), and
# never more than the bucket's budget (oldest uploads go first).
origin_gc_older_than = "180d"
origin_gc_max_size = "2T"

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
backup_password_ref = "op://nixcache-production/backup-{host}/restic-password"  # noqa: S105 - a reference, not the secret
backup_credential_ref = "op://nixcache-production/backup-{host}/rest-credential"
