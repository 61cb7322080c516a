"""Canary cache (group `canary` of inventories/prod.py): production's settings, deployed first.

A change goes to the canary, is watched for a day, then to production. It has its own key
and vault (`nixcache-canary`) so a canary mistake can never leak a production secret.
Network ranges are documentation placeholders (RFC 5737); replace them.
"""

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
