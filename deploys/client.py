"""Nix clients use the caches: substituters in order, trusted keys, a netrc for private caches.

    pyinfra -y inventories/lab.py deploys/client.py --data client_cache_group=lab
    pyinfra -y inventories/ci.py deploys/client.py      # with client_caches in its group data

Caches come from `client_caches` (URLs) or from the hosts of the inventory group
`client_cache_group`, whose public keys are derived from their signing keys; upstream caches
(`client_upstream_substituters`) follow ours. nix-daemon is restarted where it runs.
"""

from __future__ import annotations

from pyinfra import host, inventory
from pyinfra.api import HiddenValue

from deploys.parts.base import apt_packages
from nixcache.packages import NIX_CLIENT_PACKAGES
from nixcache.secrets import SecretError, resolve
from operations import client
from operations.settings import SettingsError, settings

s = settings()
try:
    caches = client.caches_for(host.name, s, inventory, resolve)
except SecretError as error:
    raise SettingsError(f"{host.name}: cannot read a cache's secret: {error}") from None

keys = [c.public_key for c in caches if c.public_key] + list(s.trusted_public_keys)
netrc = client.render_netrc(caches)

apt_packages("Install the Nix client", NIX_CLIENT_PACKAGES, s)
client.nix_conf(
    name="Nix uses the caches",
    substituters=[c.url for c in caches] + list(s.client_upstream_substituters),
    trusted_public_keys=list(dict.fromkeys(keys)),
    netrc=HiddenValue(netrc, masked_value="<netrc with read tokens>") if netrc else None,
)
