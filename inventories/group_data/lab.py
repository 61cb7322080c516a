"""Lab hosts (`nixcache lab up`): overrides of operations/settings.py for local test hosts.

The lab's secrets live in the lab's own state directory (NIXCACHE_LAB_DIR, default .lab) and
are created on the first deploy; the lab network is read from the lab's state file.

The lab is one environment: every host is a cache behind one S3 origin, SeaweedFS on the
host of group `origin` (lab1 unless $NIXCACHE_LAB_ORIGIN names another, or none), which also
runs the origin's GC. Pushes to any lab cache are written through to it; misses pull from it.
"""

import os
from pathlib import Path

from nixcache.lab.state import load, origin_host
from operations.settings import Settings

__all__ = [
    "apt_update",
    "backup_store_allowed_sources",
    "cache_allowed_sources",
    "cache_memory_max",
    "gc_max_free",
    "gc_min_free",
    "metrics_allowed_sources",
    "monitoring_environment",
    "nix_builder_ssh_key_generate",
    "nix_builder_ssh_key_ref",
    "nix_settings",
    "origin_access_key_ref",
    "origin_allowed_sources",
    "origin_credentials_generate",
    "origin_endpoint",
    "origin_gc_host",
    "origin_memory_max",
    "origin_secret_key_ref",
    "push_token_generate",
    "push_token_ref",
    "signing_key_generate",
    "signing_key_name",
    "signing_key_ref",
]

_lab_dir = Path(os.environ.get("NIXCACHE_LAB_DIR") or ".lab")
_state = load(_lab_dir) if _lab_dir.is_dir() else None

# Only the lab network reaches SSH and the cache (the controller sits on it as the gateway).
cache_allowed_sources = [_state.subnet] if _state and _state.subnet else []
metrics_allowed_sources = list(cache_allowed_sources)
# The `environment` label of the lab's metrics (one signing key for the whole lab).
monitoring_environment = "lab"

signing_key_ref = f"file://{_lab_dir / 'secrets' / 'signing-key'}"
push_token_ref = f"file://{_lab_dir / 'secrets' / 'push-token'}"
# One key for the whole lab (one ref), so its name is the lab's, not the first host's.
signing_key_name = "nixcache-lab-1"
# Lab secrets are throwaway: create them on the first deploy.
signing_key_generate = True
push_token_generate = True

# Lab hosts have no route to a package registry; their image carries every package.
apt_update = False
# Lab containers are small: keep the service's ceiling modest.
cache_memory_max = "512M"
# The lab's disk is the controller's: collect early.
gc_min_free = "1G"
gc_max_free = "2G"

# The origin (SeaweedFS on the host of group `origin`): S3 open to the lab network only, and on
# that host only (the firewall opens origin_s3_port on hosts of group `origin`), throwaway
# credentials created on the first deploy, a small ceiling for a lab container.
origin_allowed_sources = list(cache_allowed_sources)
origin_access_key_ref = f"file://{_lab_dir / 'secrets' / 'origin-access-key'}"
origin_secret_key_ref = f"file://{_lab_dir / 'secrets' / 'origin-secret-key'}"
origin_credentials_generate = True
origin_memory_max = "512M"

# Hosts that run Nix (nix_host, nix_builder): a throwaway remote-build key created on the first
# deploy; Nix collects during builds only when the controller's disk (the lab's) is nearly full.
nix_builder_ssh_key_ref = f"file://{_lab_dir / 'secrets' / 'nix-builder-ssh-key'}"
nix_builder_ssh_key_generate = True
nix_settings = {"min-free": "512M", "max-free": "1G"}

# The backup repository host (deploys/backup.py with backup_store = True): its REST port is open
# to the lab's hosts only, each by its own address (not the controller, not the whole network).
backup_store_allowed_sources = [f"{h.address}/32" for h in _state.hosts if h.address] if _state else []

# Every lab cache writes through to and pulls through from that origin; its host collects it.
_origin = origin_host(_state) if _state else None
origin_endpoint = f"http://{_origin.address}:{Settings.origin_s3_port}" if _origin else None
origin_gc_host = _origin.name if _origin else None
