"""Rotate cache signing keys in two resumable phases, without a moment where clients reject a path.

    # 1. inventory: signing_key_next_ref (and optionally signing_key_next_name) on the caches
    pyinfra -y inventories/prod.py deploys/rotate_key.py                              # introduce
    # 2. once every client has run (trusts both keys):
    pyinfra -y inventories/prod.py deploys/rotate_key.py --data rotate_phase=retire   # retire
    # 3. inventory: signing_key_ref := the next ref, signing_key_name := the next name, remove
    #    signing_key_next_ref/_name; `deploys/cache.py` and `deploys/client.py` then report the
    #    same keys (docs/runbook.md, "Key rotation").

introduce: the next key is created in the secret store (stored first, read back), installed
beside the current one, servers sign every narinfo with both, clients trust both.
retire: servers sign with the next key only, clients trust only the next key.
The keys of each phase follow from host data alone (operations/rotation.py), so a phase run
twice, or an ordinary cache or client deploy in the middle of a rotation, changes nothing.
Cache hosts run deploys/cache.py, client hosts (client_caches or client_cache_group set)
deploys/client.py: caches come first, so servers sign with a key before clients need it.
"""

from __future__ import annotations

from pyinfra import host, local

from operations import rotation
from operations.settings import SettingsError, settings

s = settings()
is_client = bool(s.client_caches or s.client_cache_group)
if is_client:
    local.include("deploys/client.py")
else:
    if not s.signing_key_next_ref:
        raise SettingsError(
            f"{host.name}: rotate: host data 'signing_key_next_ref' is not set; give the secret ref "
            "where the next signing key goes (see docs/runbook.md, Key rotation)"
        )
    step = rotation.phase(s)
    host.noop(f"key rotation phase {step}: signing with {', '.join(rotation.key_files(s))}")
    local.include("deploys/cache.py")
