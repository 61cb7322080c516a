"""Narinfo files: parse and validate what clients upload, render what clients fetch.

The store keeps narinfos as uploaded (normalised, with the uploaded `Sig` lines) and, beside
them, the text served: `NarInfo.signed`, a signature by every configured key added (store.py's
signed/), so a key rotation rewrites only signed/ (nixcache/server/signed.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from nixcache.keys import SecretKey, fingerprint
from nixcache.server import base32

HASH_LEN = 32  # characters of a store path's hash part
# Store path names: Nix allows letters, digits and +-._?= and never a leading dot.
_NAME = re.compile(r"\A[A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,210}\Z")
# Compression (Nix's name) -> NAR file extension, as Nix's BinaryCacheStore::uploadData names
# them; every one is decoded by nixcache.server.codecs. Nix's lzip (`.nar.lzip`) and the
# compressions it names plain `.nar` (gzip, lzma, lzop, …) are refused: no maintained decoder.
COMPRESSIONS = {
    "none": ".nar",
    "xz": ".nar.xz",
    "zstd": ".nar.zst",
    "bzip2": ".nar.bz2",
    "br": ".nar.br",
    "lz4": ".nar.lz4",
}
SUPPORTED = ", ".join(COMPRESSIONS)  # for messages: what ?compression= may be
# The NAR file names this server stores: nar/<base32 sha256 of the file><extension>.
# Every pattern is anchored with \A and \Z: `$` also matches before a final newline.
_BASE32 = "[0-9a-df-np-sv-z]"
NAR_EXTENSION = r"\.nar(?:" + "|".join(re.escape(e[4:]) for e in COMPRESSIONS.values() if e != ".nar") + ")?"
NAR_NAME = rf"{_BASE32}{{52}}{NAR_EXTENSION}"  # for patterns that embed it (the route table)
NAR_FILE = re.compile(rf"\A({_BASE32}{{52}})({NAR_EXTENSION})\Z")
NAR_FORM = ".nar[" + "|".join(ext[4:] for ext in COMPRESSIONS.values() if ext != ".nar") + "]"
_SIG = re.compile(r"\A[^:\s]+:[A-Za-z0-9+/]+={0,2}\Z")
MAX_DIGITS = 19  # NarSize and FileSize: 10**19 bytes is past any NAR; int() refuses > 4300 digits


class NarInfoError(ValueError):
    """A narinfo field is missing or malformed; `field` names it."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"narinfo field {field_name}: {reason}")
        self.field = field_name


def is_hash_part(text: str) -> bool:
    """True when `text` is a 32-character store path hash."""
    return base32.is_base32(text, HASH_LEN)


def is_base_name(text: str) -> bool:
    """True when `text` is `<hash>-<name>`, a store path without its directory."""
    hash_part, sep, name = text.partition("-")
    return bool(sep) and is_hash_part(hash_part) and bool(_NAME.match(name))


def compression_of(nar_file: str) -> str | None:
    """The Compression value matching a NAR file name's extension, or None for a bad name."""
    match = NAR_FILE.match(nar_file)
    if not match:
        return None
    return next(c for c, ext in COMPRESSIONS.items() if ext == match.group(2))


@dataclass
class NarInfo:
    store_path: str
    url: str
    compression: str
    nar_hash: str
    nar_size: int
    file_hash: str | None = None
    file_size: int | None = None
    references: list[str] = field(default_factory=list)
    deriver: str | None = None
    sigs: list[str] = field(default_factory=list)
    ca: str | None = None

    @property
    def hash_part(self) -> str:
        return self.store_path.rsplit("/", 1)[1][:HASH_LEN]

    @property
    def nar_file(self) -> str:
        """The file name under nar/ that `URL` points to."""
        return self.url[len("nar/") :]

    def fingerprint(self, store_dir: str) -> bytes:
        refs = [f"{store_dir}/{ref}" for ref in self.references]
        return fingerprint(self.store_path, self.nar_hash, self.nar_size, refs)

    def render(self, extra_sigs: Iterable[str] = ()) -> str:
        """The narinfo text, `Key: Value` lines each ending in a newline."""
        lines = [
            f"StorePath: {self.store_path}",
            f"URL: {self.url}",
            f"Compression: {self.compression}",
        ]
        if self.file_hash is not None:
            lines.append(f"FileHash: {self.file_hash}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines.append(f"NarHash: {self.nar_hash}")
        lines.append(f"NarSize: {self.nar_size}")
        lines.append("References: " + " ".join(self.references))
        if self.deriver:
            lines.append(f"Deriver: {self.deriver}")
        seen = set()
        for sig in [*self.sigs, *extra_sigs]:
            if sig not in seen:
                seen.add(sig)
                lines.append(f"Sig: {sig}")
        if self.ca:
            lines.append(f"CA: {self.ca}")
        return "\n".join(lines) + "\n"

    def signed(self, keys: Iterable[SecretKey], store_dir: str) -> str:
        """The narinfo text with a signature by each of `keys` after the uploaded ones."""
        message = self.fingerprint(store_dir)
        return self.render(key.sign(message) for key in keys)


def _int_field(name: str, value: str) -> int:
    # isdigit() alone admits "²", which int() refuses; and int() stalls or refuses on thousands of digits
    if not (value.isascii() and value.isdigit()) or len(value) > MAX_DIGITS:
        raise NarInfoError(
            name, f"{value[:40]!r} is not a non-negative integer of at most {MAX_DIGITS} digits"
        )
    return int(value)


def _hash_field(name: str, value: str) -> str:
    try:
        return base32.normalize_sha256(value)
    except ValueError as error:
        raise NarInfoError(name, f"{error}; expected sha256:<52 base32 characters>") from None


def parse(text: str, store_dir: str = "/nix/store") -> NarInfo:
    """Parse and validate a narinfo; NarInfoError names the first bad field.

    Hashes are normalised to `sha256:<base32>` (the form signatures cover).
    """
    fields: dict[str, str] = {}
    sigs: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            # "References:" with nothing after it has no space
            key, sep, value = line.partition(":")
            if not sep or value.strip():
                raise NarInfoError(f"line {number}", f"{line[:80]!r} is not 'Key: Value'")
        value = value.strip()
        if key == "Sig":
            if not _SIG.match(value):
                raise NarInfoError("Sig", f"{value[:80]!r} is not 'keyname:base64'")
            sigs.append(value)
        elif key in fields:
            raise NarInfoError(key, "appears more than once")
        else:
            fields[key] = value

    def required(name: str) -> str:
        if not fields.get(name):
            raise NarInfoError(name, "is missing")
        return fields[name]

    store_path = required("StorePath")
    directory, _, base = store_path.rpartition("/")
    if directory != store_dir or not is_base_name(base):
        raise NarInfoError("StorePath", f"{store_path!r} is not a store path under {store_dir}")
    url = required("URL")
    compression = fields.get("Compression") or "bzip2"  # absent means bzip2, as in Nix
    if compression not in COMPRESSIONS:
        raise NarInfoError(
            "Compression", f"{compression!r} is not one of {SUPPORTED}: push with ?compression= one of those"
        )
    url_compression = compression_of(url[4:]) if url.startswith("nar/") else None
    if url_compression is None:
        raise NarInfoError("URL", f"{url!r} is not nar/<52-char base32 file hash>{NAR_FORM}")
    if url_compression != compression:
        raise NarInfoError("URL", f"{url!r} does not end in {COMPRESSIONS[compression]!r} (Compression)")
    nar_hash = _hash_field("NarHash", required("NarHash"))
    nar_size = _int_field("NarSize", required("NarSize"))
    if nar_size == 0:
        raise NarInfoError("NarSize", "must not be zero")
    info = NarInfo(
        store_path=store_path, url=url, compression=compression, nar_hash=nar_hash, nar_size=nar_size
    )
    if "FileHash" in fields:
        info.file_hash = _hash_field("FileHash", fields["FileHash"])
        if info.file_hash[len("sha256:") :] != url[4:56]:
            raise NarInfoError("FileHash", f"{info.file_hash} does not match the file name in URL {url}")
    if "FileSize" in fields:
        info.file_size = _int_field("FileSize", fields["FileSize"])
    for ref in fields.get("References", "").split():
        if not is_base_name(ref):
            raise NarInfoError("References", f"{ref[:80]!r} is not a store path base name")
        info.references.append(ref)
    deriver = fields.get("Deriver")
    if deriver and deriver != "unknown-deriver":
        if not is_base_name(deriver) or not deriver.endswith(".drv"):
            raise NarInfoError("Deriver", f"{deriver[:80]!r} is not a .drv base name")
        info.deriver = deriver
    info.sigs = sigs
    info.ca = fields.get("CA") or None
    return info
