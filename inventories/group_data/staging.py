"""Staging caches (group `staging` of inventories/prod.py): production's shape, smaller and shorter-lived.

Secrets are 1Password references in the vault `nixcache-staging`: staging never holds a
production key. Network ranges are documentation placeholders (RFC 5737); replace them.
"""

apt_update = True

cache_nginx_front = True
tls_cert_ref = "op://nixcache-staging/tls/certificate"
tls_key_ref = "op://nixcache-staging/tls/private-key"

signing_key_name = "nixcache-staging-1"
signing_key_ref = "op://nixcache-staging/signing-key/secret-key"
push_token_ref = "op://nixcache-staging/push-token/credential"  # noqa: S105 - a reference, not the secret
read_token_ref = "op://nixcache-staging/read-token/credential"  # noqa: S105 - a reference, not the secret

# Staging shares the root disk: no dedicated volume, tighter GC.
gc_older_than = "14d"
gc_min_free = "10G"
gc_max_free = "25G"
journald_max_retention = "2week"

cache_allowed_sources = ["198.51.100.0/24"]  # placeholder: your CI networks
ssh_allowed_sources = ["192.0.2.0/24"]  # placeholder: your operations network
metrics_allowed_sources = ["192.0.2.0/24"]  # placeholder: your Prometheus
# The `environment` label of this group's metrics: alerts compare hosts of one environment.
monitoring_environment = "staging"

admin_users = []
