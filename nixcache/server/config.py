"""Server configuration: `ServerConfig` and its tables, declared with nixcache.schema.

`dump()` is the one place that renders `/etc/nixcache/config.toml` (tomli-w); `load()` reads it
back through the same declarations (tomllib) and names the key at fault, the value and the fix
in one line. Flags of `nixcache serve` override the file. Every key, its default and why:
docs/settings.md (generated from these declarations).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from nixcache import schema
from nixcache.schema import (
    ABSOLUTE_PATH,
    BOOL,
    DURATION,
    FILE,
    FILES,
    INT,
    POSITIVE_DURATION,
    SIZE,
    STORE_DIR,
    STR,
    URL,
    Kind,
    SchemaError,
    enum,
    integer,
    setting,
    table,
    tables,
)

DEFAULT_LISTEN = "127.0.0.1:5000"
DOWNLOAD_COMPRESSION = enum("none", "zstd")  # also the host data key's kind (operations/settings.py)
ZSTD_LEVEL = integer(1, 19)
MAX_WORKERS = 256
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """The configuration file or a flag holds a value the server cannot use."""


class StartupError(Exception):
    """The server cannot start; the message is the one line a person sees. Here, not in the
    runner, so the pre-forking parent (which never imports gevent) raises it too."""


def default_data_dir() -> Path:
    """Where `nixcache serve` keeps its store and generated key when nothing is configured."""
    return platformdirs.user_data_path("nixcache")


def default_store() -> Path:
    return default_data_dir() / "store"


def parse_listen(listen: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [addr]:port); ConfigError naming the value otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen = {listen!r} must be HOST:PORT, e.g. 127.0.0.1:5000")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - ":5000" means all addresses


def _listen(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError
    try:
        parse_listen(value)
    except ConfigError:
        raise ValueError from None
    return value


LISTEN = Kind("HOST:PORT", "give HOST:PORT, e.g. 127.0.0.1:5000 or [::1]:5000", _listen)


def _bucket(value: Any) -> str:
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError
    return value


BUCKET = Kind("bucket name", "give a bucket name without slashes, e.g. nixcache", _bucket)


def _public_keys(value: Any) -> list[str]:
    from nixcache.keys import KeyFormatError, PublicKey

    if not isinstance(value, list) or not value:
        raise ValueError
    for key in value:
        try:
            PublicKey.parse(schema.STR.parse(key))
        except (KeyFormatError, ValueError):
            raise SchemaError(
                "", key, "give public keys as name:base64 (nix key convert-secret-to-public)"
            ) from None
    return list(value)


PUBLIC_KEYS = Kind(
    "list of public keys", 'give a non-empty list, e.g. ["cache.example.org-1:base64…"]', _public_keys
)


@dataclass
class NixStoreConfig:
    """The `[nix_store]` table: serving this host's own Nix store (nixcache.server.nixstore)."""

    serve_nix_store: bool = setting(
        False,
        BOOL,
        "Serve the paths of this host's Nix store (narinfo from Nix's database, NARs generated on "
        "the fly, signed with every signing key), tried before the store above. Needs read access to "
        "the Nix store and database only. Off: most cache hosts run no Nix.",
    )
    store_dir: str = setting(
        "/nix/store",
        STORE_DIR,
        "Where the Nix store's files are on this host (the paths in Nix's database are under the "
        "top-level store_dir).",
    )
    state_dir: Path = setting(
        Path("/nix/var/nix"),
        ABSOLUTE_PATH,
        "Nix's state directory: its database is db/db.sqlite there, opened read-only.",
    )
    log_dir: Path = setting(
        Path("/nix/var/log/nix"),
        ABSOLUTE_PATH,
        "Nix's log directory: build logs under drvs/, served at /log/<drv>.",
    )


@dataclass
class OriginConfig:
    """The `[origin]` table: the environment's shared S3 bucket (see nixcache.server.tiers)."""

    endpoint: str = setting(
        kind=URL, doc="S3 endpoint URL, e.g. https://s3.eu-central-1.amazonaws.com or http://10.0.0.5:8333."
    )
    bucket: str = setting(
        kind=BUCKET, doc="Bucket in the Nix binary cache layout (nix-cache-info, <hash>.narinfo, nar/…)."
    )
    access_key_file: Path = setting(
        kind=FILE, doc="File holding the S3 access key id (mode 0600; deployed from a secret reference)."
    )
    secret_key_file: Path = setting(
        kind=FILE, doc="File holding the S3 secret access key (mode 0600; never on a command line)."
    )
    region: str = setting(
        "us-east-1", STR, "Region for SigV4 signatures (most non-AWS engines accept us-east-1)."
    )
    addressing: str = setting(
        "path",
        enum("path", "virtual"),
        "path (http://endpoint/bucket/key: MinIO, SeaweedFS, Ceph, Garage) or virtual "
        "(http://bucket.endpoint/key: AWS, R2).",
    )
    narinfo_deadline: float = setting(
        2.0,
        POSITIVE_DURATION,
        "How long a narinfo lookup in the origin may take before the answer is 404 (counted as an "
        "error): a read never becomes a 5xx.",
    )
    nar_deadline: float = setting(
        10.0, POSITIVE_DURATION, "How long the origin may take to connect or to send the next bytes of a NAR."
    )
    write_timeout: float = setting(
        60.0,
        POSITIVE_DURATION,
        "How long a narinfo write-through may take, or a NAR upload may stall, before the push gets "
        "503 (and nothing is published here).",
    )
    gc_max_size: int | None = setting(
        None, SIZE, "nixcache gc --origin: delete the oldest paths until the bucket is below this size."
    )
    gc_older_than: float | None = setting(
        None, DURATION, "nixcache gc --origin: delete paths uploaded longer ago than this (e.g. 90d)."
    )
    gc_grace: float = setting(
        3600.0,
        POSITIVE_DURATION,
        "nixcache gc --origin spares unreferenced NARs younger than this (a push may be on its way); "
        "pushers upload a NAR again once its copy is older than half of it. The same on every host "
        "of the environment.",
    )


@dataclass
class UpstreamConfig:
    """One `[[upstreams]]` table: an HTTP binary cache and the keys it is trusted for."""

    url: str = setting(kind=URL, doc="Base URL of the binary cache, e.g. https://cache.nixos.org.")
    public_keys: list[str] = setting(
        kind=PUBLIC_KEYS,
        doc="Keys (name:base64) this upstream is trusted for; a narinfo without a valid signature "
        "from one of them is refused and counted.",
    )
    name: str = setting("", STR, "Label in metrics and logs (empty: the URL's host).")
    narinfo_deadline: float = setting(
        2.0, POSITIVE_DURATION, "How long a narinfo lookup may take before the answer is 404 (counted)."
    )
    nar_deadline: float = setting(
        10.0,
        POSITIVE_DURATION,
        "How long the upstream may take to connect or to send the next bytes of a NAR.",
    )

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.url.split("://", 1)[1].split("/", 1)[0]


@dataclass
class ServerConfig:
    """Everything `nixcache serve` and `nixcache gc` need. Sizes are bytes, durations seconds."""

    listen: str = setting(
        DEFAULT_LISTEN,
        LISTEN,
        "Address and port the server binds (HOST:PORT). Loopback by default: open it to client "
        "networks with the firewall, or put nginx in front.",
    )
    workers: int = setting(
        0,
        integer(0, MAX_WORKERS),
        "Worker processes serving the port, each with its own event loop (one core each); a "
        "parent replaces one that dies and drains them all on SIGTERM. 0: one per core this "
        "process may run on. 1: a single process, no parent.",
    )
    store: Path = setting(
        kind=FILE,
        factory=default_store,
        doc="Directory holding narinfo/, nar/, nar-meta/ and tmp/ (uploads, same filesystem). Back up "
        "narinfo/ nar/ nar-meta/ when the store itself is backed up. Default: the user's data dir.",
    )
    store_dir: str = setting(
        "/nix/store", STORE_DIR, "The Nix store directory of the clients (StoreDir in nix-cache-info)."
    )
    signing_key_files: list[Path] = setting(
        [],
        FILES,
        "Secret key files (nix-store --generate-binary-cache-key format, mode 0600). Every narinfo "
        "is signed with each of them when served, so a rotation is a config change. Empty: a key is "
        "generated once under the user's data dir.",
    )
    push_token_file: Path | None = setting(
        None,
        FILE,
        "File holding the token CI uses to push (HTTP Basic password or Bearer). Unset: pushes are refused.",
    )
    read_token_file: Path | None = setting(
        None,
        FILE,
        "File holding the token required for reads. Unset: reads are open to anyone who can reach the port.",
    )
    priority: int = setting(
        30,
        INT,
        "Priority in nix-cache-info: lower wins; cache.nixos.org uses 40, so a local cache below "
        "40 is asked first.",
    )
    max_upload_size: int = setting(
        8 * 1024**3,
        SIZE,
        "Largest accepted upload (413 above it). Bounds what a push can take from the disk in one request.",
    )
    accel_redirect_prefix: str | None = setting(
        None,
        STR,
        "When nginx fronts the server: GET /nar/* answers with X-Accel-Redirect: <prefix>/<file> and "
        "nginx sends the bytes from disk. Unset: served here.",
    )
    download_compression: str = setting(
        "zstd",
        DOWNLOAD_COMPRESSION,
        "zstd: an uncompressed NAR (nar/<hash>.nar) is sent with Content-Encoding: zstd to a client "
        "whose Accept-Encoding allows it (current Nix does; Range requests, HEAD and compressed NARs "
        "never). Measured in docs/benchmarks.md: see docs/decisions/0009-download-compression.md.",
    )
    download_compression_level: int = setting(
        1,
        ZSTD_LEVEL,
        "zstd level of download_compression: 1 compresses several times faster than a 1 Gbit/s "
        "link per core and keeps most of level 3's ratio on NARs (docs/benchmarks.md).",
    )
    front_hits_log: Path | None = setting(
        None,
        FILE,
        "When nginx fronts the server and serves hits from disk: the log it writes them to "
        '("<method> <status> <bytes> <uri>" lines), read every second to record last-served '
        "times for gc and count the hits in /metrics, then emptied. Unset: nothing to read.",
    )
    log_level: str = setting("info", enum(*LOG_LEVELS), "info logs one line per request.")
    keepalive_timeout: float = setting(
        75.0,
        DURATION,
        "How long a connection may sit idle, or take to send a request head, before it is closed; "
        "also bounds a stalled body or reader.",
    )
    gc_max_size: int | None = setting(
        None, SIZE, "nixcache gc: delete least recently served entries until the store is below this size."
    )
    gc_older_than: float | None = setting(
        None, DURATION, "nixcache gc: delete entries not served for this long."
    )
    gc_min_free: int | None = setting(
        None, SIZE, "nixcache gc: when free space drops below this, collect until gc_max_free is free."
    )
    gc_max_free: int | None = setting(
        None, SIZE, "nixcache gc: the free space to reach once gc_min_free triggered a collection."
    )
    negative_ttl: float = setting(
        60.0,
        DURATION,
        "How long a path that no tier (local, origin, upstreams) has is remembered as absent, so a "
        "client walking a closure does not hammer the origin.",
    )
    origin: OriginConfig | None = setting(
        None,
        table(OriginConfig),
        "The environment's shared S3-compatible bucket: pushes are written through to it, misses "
        "are pulled from it. Unset: this cache is an island.",
    )
    upstreams: list[UpstreamConfig] = setting(
        [],
        tables(UpstreamConfig),
        "HTTP binary caches tried after the origin on a miss, in order; a narinfo is accepted only "
        "with a valid signature from one of that upstream's public_keys.",
    )
    nix_store: NixStoreConfig = setting(
        kind=table(NixStoreConfig),
        factory=NixStoreConfig,
        doc="Serving this host's own Nix store, when it runs Nix (nixcache.server.nixstore).",
    )

    def worker_count(self) -> int:
        """`workers`, with 0 read as the number of cores this process may run on."""
        return self.workers or len(os.sched_getaffinity(0))

    def host_port(self) -> tuple[str, int]:
        """`listen` split into host and port; ConfigError when it is not HOST:PORT."""
        return parse_listen(self.listen)


# The tables of config.toml, in the order docs/settings.md lists them.
TABLES: dict[str, type] = {
    "": ServerConfig,
    "nix_store.": NixStoreConfig,
    "origin.": OriginConfig,
    "upstreams[].": UpstreamConfig,
}


def from_mapping(data: dict[str, Any], *, base: ServerConfig | None = None) -> ServerConfig:
    """A config from `data` (TOML keys) laid over `base` (defaults when None)."""
    try:
        return schema.build(ServerConfig, data, base=base)
    except SchemaError as error:
        raise ConfigError(error.describe()) from None


def with_overrides(config: ServerConfig, **overrides: object) -> ServerConfig:
    """`config` with the flags that were given (None and empty tuples mean not given)."""
    given = {k: v for k, v in overrides.items() if v is not None and v != ()}
    return from_mapping(given, base=config)


def load(path: Path | str) -> ServerConfig:
    """Read a TOML config file; ConfigError with the file and key at fault."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config {path} is not valid TOML: {error}") from None
    try:
        return from_mapping(data)
    except ConfigError as error:
        raise ConfigError(f"config {path}: {error}") from None


def dump(config: ServerConfig) -> str:
    """The TOML text of `config` (tomli-w); unset optional keys are left out."""
    return schema.dumps(
        config,
        "nixcache server configuration, rendered by nixcache.server.config.dump (tomli-w).\n"
        "Every key, its default and the reason for it: docs/settings.md.",
    )
