"""Build traces of content-addressed derivations: which output path a derivation output built to.

Two layouts, both uploaded by `nix copy` of CA derivation outputs (registerDrvOutputUnchecked in
Nix's src/libstore/binary-cache-store.cc) and fetched when substituting them:

- `build-trace-v2/<drv base name>/<output>.doi` (Nix ≥ 2.35): the entry's value,
  `{"outPath":"<hash>-<name>","signatures":[{"keyName":"…","sig":"<base64>"},…]}`; the key is
  the path. Signed over `{"key":{"drvPath":…,"outputName":…},"value":{"outPath":…}}`
  (UnkeyedRealisation::fingerprint: the JSON of key and value without signatures, keys sorted,
  no spaces). Nix also reads signatures written as `"keyName:base64"` strings.
- `realisations/<sha256:hex>!<output>.doi` (Nix 2.4–2.34, Lix): one object,
  `{"dependentRealisations":{…},"id":"sha256:…!out","outPath":"…","signatures":["name:base64"]}`,
  signed over the same object without `signatures` (Realisation::fingerprint of Nix 2.28).

A client with `require-sigs` takes an entry only with a valid signature from a key it trusts
(`realisationIsUntrusted`), as for a narinfo: so entries are stored as uploaded and served with
a signature by each of this cache's keys added, like narinfos (a key rotation rewrites nothing).
Kept while the narinfo of their outPath is (extras/gc.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from nixcache.keys import SecretKey
from nixcache.server.extras import OUTPUT_NAME, SEGMENT, ExtraError, Kind, parse_json
from nixcache.server.narinfo import is_base_name
from nixcache.server.nixstore.logs import is_drv_name

LIMIT = 256 * 1024  # one output path and a few signatures (old entries list their dependencies)
_DRV_HASH = r"sha256:[0-9a-f]{64}"


def _dump(value: Any) -> str:
    """JSON as nlohmann's dump() writes it: object keys sorted (std::map), no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _entry(where: str, data: bytes, *, structured: bool) -> tuple[dict[str, Any], str]:
    """The uploaded entry and its outPath, once the fields both layouts share are checked: an
    object, outPath a store path base name, signatures a list (`structured`: build-trace-v2's
    {"keyName","sig"} objects allowed besides "name:base64" strings)."""
    entry = parse_json(where, data)
    if not isinstance(entry, dict):
        raise ExtraError(f"{where}: a build trace entry is a JSON object")
    out_path = entry.get("outPath")
    if not isinstance(out_path, str) or not is_base_name(out_path):
        raise ExtraError(f"{where}: outPath {str(out_path)[:80]!r} is not a store path base name")
    sigs = entry.get("signatures", [])
    if not isinstance(sigs, list):
        raise ExtraError(f"{where}: signatures is not a list")
    for sig in sigs:
        ok = isinstance(sig, str) and ":" in sig
        if structured and isinstance(sig, dict):
            ok = isinstance(sig.get("keyName"), str) and isinstance(sig.get("sig"), str)
        if not ok:
            form = '{"keyName":…,"sig":…} or ' if structured else ""
            raise ExtraError(f"{where}: signature {str(sig)[:80]!r} is not {form}'name:base64'")
    return entry, out_path


# -- build-trace-v2 ------------------------------------------------------------------------------


def _trace_key(name: str) -> tuple[str, str]:
    drv, _, file = name.partition("/")
    return drv, file[: -len(".doi")]


def validate_trace(name: str, data: bytes) -> str:
    where = f"build-trace-v2/{name}"
    drv, _output = _trace_key(name)
    if not is_drv_name(drv):
        raise ExtraError(f"{where}: {drv[:120]!r} is not a derivation (<hash>-<name>.drv)")
    _, out_path = _entry(where, data, structured=True)
    return out_path


def sign_trace(name: str, data: bytes, keys: Iterable[SecretKey]) -> bytes:
    entry = json.loads(data)
    drv, output = _trace_key(name)
    key = {"drvPath": drv, "outputName": output}
    fingerprint = _dump({"key": key, "value": {"outPath": entry["outPath"]}})
    sigs = list(entry.get("signatures", []))
    for secret in keys:
        key_name, _, sig = secret.sign(fingerprint.encode()).partition(":")
        signature = {"keyName": key_name, "sig": sig}
        if signature not in sigs:
            sigs.append(signature)
    entry["signatures"] = sigs
    return _dump(entry).encode()


# -- realisations (Nix < 2.35, Lix) --------------------------------------------------------------


def validate_realisation(name: str, data: bytes) -> str:
    where = f"realisations/{name}"
    entry, out_path = _entry(where, data, structured=False)
    if entry.get("id") != name[: -len(".doi")]:
        raise ExtraError(f"{where}: id {str(entry.get('id'))[:100]!r} does not match the file name")
    deps = entry.get("dependentRealisations", {})
    if not isinstance(deps, dict) or not all(isinstance(v, str) and is_base_name(v) for v in deps.values()):
        raise ExtraError(f"{where}: dependentRealisations is not an object of id -> store path base name")
    return out_path


def sign_realisation(name: str, data: bytes, keys: Iterable[SecretKey]) -> bytes:
    entry = json.loads(data)
    unsigned = {k: v for k, v in entry.items() if k != "signatures"}
    unsigned.setdefault("dependentRealisations", {})  # Nix's toJSON always writes it
    fingerprint = _dump(unsigned).encode()
    sigs = list(entry.get("signatures", []))
    for key in keys:
        sig = key.sign(fingerprint)
        if sig not in sigs:
            sigs.append(sig)
    entry["signatures"] = sigs
    return _dump(entry).encode()


def out_path_of(data: bytes) -> str | None:
    """The outPath of a stored entry of either layout (None when unreadable)."""
    try:
        out_path = json.loads(data).get("outPath")
    except (ValueError, AttributeError):
        return None
    return out_path if isinstance(out_path, str) else None


BUILD_TRACE = Kind(
    name="build-trace",
    pattern=rf"/build-trace-v2/({SEGMENT}/{OUTPUT_NAME}\.doi)",
    directory="build-trace-v2",
    content_type="application/json",
    limit=LIMIT,
    validate=validate_trace,
    sign=sign_trace,
    url_prefix="build-trace-v2/",
)
REALISATION = Kind(
    name="realisation",
    pattern=rf"/realisations/({_DRV_HASH}!{OUTPUT_NAME}\.doi)",
    directory="realisations",
    content_type="application/json",
    limit=LIMIT,
    validate=validate_realisation,
    sign=sign_realisation,
    url_prefix="realisations/",
)
