"""Rotate cache signing keys in resumable phases, without a moment where clients reject a path.

    # 1. group data of the caches: signing_key_next_ref (and optionally signing_key_next_name)
    pyinfra -y inventories/prod.py deploys/rotate_key.py                              # introduce
    # 2. once every client has run (trusts both keys):
    pyinfra -y inventories/prod.py deploys/rotate_key.py --data rotate_phase=retire   # retire
    # 3. group data: signing_key_ref := the next ref, signing_key_name := the next name, remove
    #    signing_key_next_ref/_name, then the same command once more:
    pyinfra -y inventories/prod.py deploys/rotate_key.py                              # make permanent
    # (docs/runbook.md, "Key rotation")

introduce: the next key is created in the secret store (stored first, read back) by whichever
host needs it first, installed beside the current one, servers sign every narinfo with both,
clients trust both. retire: servers sign with the next key only, clients trust only the next
key. make permanent: servers hold the one key in signing-key again (signing-key.next is
removed), clients trust it. The keys of each phase follow from host data alone
(operations/rotation.py), so a phase run twice, or an ordinary cache or client deploy in the
middle of a rotation, changes nothing.

Every host of the inventory gets its own deploy: caches deploys/cache.py, Nix clients (hosts with
client_caches or client_cache_group) deploys/client.py. So the one command works on an inventory
that holds caches and their clients.
"""

from __future__ import annotations

from pyinfra import host, local

from operations import client, rotation
from operations.settings import settings

s = settings()
if client.is_client(s):
    local.include("deploys/client.py")
else:
    step = rotation.phase(s) or "make permanent (no signing_key_next_ref: one key)"
    host.noop(f"key rotation, {step}: signing with {', '.join(rotation.key_files(s))}")
    local.include("deploys/cache.py")
