"""The proof that ends deploys/recover.py: the replacement serves the stored key and valid signatures.

Checked from the controller's side, as a client sees it, and only while pyinfra executes (after
the service has started): `/pubkey` must list the public half of the key in the secret store, and
a known path's narinfo must carry a `Sig` that verifies with it (`nixcache.keys.PublicKey`).
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import operation

from facts.backup import NewestNarinfo
from nixcache.httpcompat import make_httpx_importable
from nixcache.keys import KeyFormatError, PublicKey, fingerprint
from operations.health import failed_step

make_httpx_importable()  # before httpx: pyinfra's gevent patching breaks an installed trio
import httpx  # noqa: E402

STORE_DIR = "/nix/store"


def _fields(text: str) -> tuple[dict[str, str], list[str]]:
    fields: dict[str, str] = {}
    sigs: list[str] = []
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if not sep:
            continue
        if key == "Sig":
            sigs.append(value.strip())
        else:
            fields[key] = value.strip()
    return fields, sigs


def check_served(base_url: str, public_key: str, hash_part: str | None, timeout: float = 10) -> str | None:
    """None when `base_url` lists `public_key` at /pubkey and signs `hash_part` with it; else why not."""
    try:
        key = PublicKey.parse(public_key)
    except KeyFormatError as error:
        return f"the stored public key is unusable ({error})"
    try:
        served = httpx.get(f"{base_url}/pubkey", timeout=timeout)
    except httpx.HTTPError as error:
        return f"{base_url}/pubkey does not answer ({type(error).__name__})"
    if served.status_code != 200 or str(key) not in served.text.split():
        return f"{base_url}/pubkey does not list the stored key {key.name} (HTTP {served.status_code})"
    if hash_part is None:
        return None
    try:
        response = httpx.get(f"{base_url}/{hash_part}.narinfo", timeout=timeout)
    except httpx.HTTPError as error:
        return f"{base_url}/{hash_part}.narinfo does not answer ({type(error).__name__})"
    if response.status_code != 200:
        return f"{base_url}/{hash_part}.narinfo answers HTTP {response.status_code}, not the path"
    fields, sigs = _fields(response.text)
    try:
        references = [f"{STORE_DIR}/{ref}" for ref in fields.get("References", "").split()]
        message = fingerprint(fields["StorePath"], fields["NarHash"], int(fields["NarSize"]), references)
    except (KeyError, ValueError):
        return f"{base_url}/{hash_part}.narinfo lacks StorePath/NarHash/NarSize"
    if not any(key.verify(sig, message) for sig in sigs):
        return f"{fields['StorePath']} is served without a valid Sig by {key.name} ({len(sigs)} Sig lines)"
    return None


@operation()
def proof(base_url: str, public_key: str, store: str, probe_path: str | None = None):
    """The recovered cache serves `public_key` and a valid signature on a known path.

    + base_url: http://host:port of the cache, as clients reach it
    + public_key: the public half of the signing key in the secret store
    + store: the cache's store directory (to find the newest narinfo when no probe is given)
    + probe_path: a store path or its 32-char hash part that must be served
    """
    if not host.state.is_executing:
        host.noop(f"{base_url} is proven when the deploy runs")
        return
    if probe_path:
        hash_part = probe_path.removeprefix(f"{STORE_DIR}/")[:32]
    else:
        hash_part = host.get_fact(NewestNarinfo, store=store)
    problem = check_served(base_url, public_key, hash_part)
    if problem is None:
        what = f"{hash_part}.narinfo signed" if hash_part else "no restored path to probe; key"
        host.noop(f"{base_url}: {what} by the stored key")
        return
    fix = "check `journalctl -u nixcache` on the host and the restore step's output above"
    yield failed_step(f"{host.name}: recovery proof failed: {problem}; {fix}")
