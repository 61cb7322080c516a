"""Server configuration: the `ServerConfig` dataclass, read from and rendered to TOML.

`dump()` is the one place that renders `/etc/nixcache/config.toml`; `load()` reads it back and
names the key at fault when something is wrong. Flags of `nixcache serve` override the file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from nixcache.server.units import format_size, parse_duration, parse_size

DEFAULT_LISTEN = "127.0.0.1:5000"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """The configuration file or a flag holds a value the server cannot use."""


def default_data_dir() -> Path:
    """Where `nixcache serve` keeps its store and generated key when nothing is configured."""
    return platformdirs.user_data_path("nixcache")


def default_store() -> Path:
    return default_data_dir() / "store"


@dataclass
class NixStoreConfig:
    """The `[nix_store]` table: serving this host's own Nix store (nixcache.server.nixstore)."""

    serve_nix_store: bool = False
    store_dir: str = "/nix/store"
    state_dir: Path = Path("/nix/var/nix")
    log_dir: Path = Path("/nix/var/log/nix")


_NIX_STORE_COMMENTS: dict[str, str] = {
    "serve_nix_store": "Serve the paths of this host's Nix store (narinfo from Nix's database, NARs "
    "generated on the fly, signed with every signing key), tried before the store above. Needs "
    "read access to the Nix store and database only.",
    "store_dir": "Where the Nix store's files are on this host (the paths in Nix's database are under "
    "the top-level store_dir).",
    "state_dir": "Nix's state directory: its database is db/db.sqlite there, opened read-only.",
    "log_dir": "Nix's log directory: build logs under drvs/, served at /log/<drv>.",
}


@dataclass
class OriginConfig:
    """The `[origin]` table: the environment's shared S3 bucket (see nixcache.server.tiers)."""

    endpoint: str
    bucket: str
    access_key_file: Path
    secret_key_file: Path
    region: str = "us-east-1"
    addressing: str = "path"
    narinfo_deadline: float = 2.0
    nar_deadline: float = 10.0
    write_timeout: float = 60.0
    gc_max_size: int | None = None
    gc_older_than: float | None = None
    gc_grace: float = 3600.0


@dataclass
class UpstreamConfig:
    """One `[[upstreams]]` table: an HTTP binary cache and the keys it is trusted for."""

    url: str
    public_keys: list[str]
    name: str = ""
    narinfo_deadline: float = 2.0
    nar_deadline: float = 10.0


@dataclass
class ServerConfig:
    """Everything `nixcache serve` and `nixcache gc` need. Sizes are bytes, durations seconds."""

    listen: str = DEFAULT_LISTEN
    store: Path = field(default_factory=default_store)
    store_dir: str = "/nix/store"
    signing_key_files: list[Path] = field(default_factory=list)
    push_token_file: Path | None = None
    read_token_file: Path | None = None
    priority: int = 30
    max_upload_size: int = 8 * 1024**3
    accel_redirect_prefix: str | None = None
    log_level: str = "info"
    keepalive_timeout: float = 75.0
    gc_max_size: int | None = None
    gc_older_than: float | None = None
    gc_min_free: int | None = None
    gc_max_free: int | None = None
    negative_ttl: float = 60.0
    origin: OriginConfig | None = None
    upstreams: list[UpstreamConfig] = field(default_factory=list)
    nix_store: NixStoreConfig = field(default_factory=NixStoreConfig)

    def host_port(self) -> tuple[str, int]:
        """`listen` split into host and port; ConfigError when it is not HOST:PORT."""
        return parse_listen(self.listen)


# Why each key exists, rendered above it by dump(). Keep in step with the fields above.
_COMMENTS: dict[str, str] = {
    "listen": "Address and port the server binds (HOST:PORT). Loopback by default: open it to "
    "client networks with the firewall, or put nginx in front.",
    "store": "Directory holding narinfo/, nar/, nar-meta/ and tmp/ (uploads, same filesystem). "
    "Back up narinfo/ nar/ nar-meta/ when the store itself is backed up.",
    "store_dir": "The Nix store directory of the clients (StoreDir in nix-cache-info).",
    "signing_key_files": "Secret key files (nix-store --generate-binary-cache-key format, mode 0600). "
    "Every narinfo is signed with each of them when served, so a rotation is a config change. "
    "Empty: a key is generated once under the user's data dir.",
    "push_token_file": "File holding the token CI uses to push (HTTP Basic password or Bearer). "
    "Unset: pushes are refused.",
    "read_token_file": "File holding the token required for reads. Unset: reads are open to "
    "anyone who can reach the port.",
    "priority": "Priority in nix-cache-info: lower wins; cache.nixos.org uses 40, so a local "
    "cache below 40 is asked first.",
    "max_upload_size": "Largest accepted upload (413 above it). Bounds what a push can take "
    "from the disk in one request.",
    "accel_redirect_prefix": "When nginx fronts the server: GET /nar/* answers with "
    "X-Accel-Redirect: <prefix>/<file> and nginx sends the bytes from disk. Unset: served here.",
    "log_level": "One of debug, info, warning, error. info logs one line per request.",
    "keepalive_timeout": "How long a connection may sit idle, or take to send a request head, "
    "before it is closed (seconds, or e.g. 75s, 2m); also bounds a stalled body or reader.",
    "gc_max_size": "nixcache gc: delete least recently served entries until the store is below this size.",
    "gc_older_than": "nixcache gc: delete entries not served for this long (seconds).",
    "gc_min_free": "nixcache gc: when free space drops below this, collect until gc_max_free is free.",
    "gc_max_free": "nixcache gc: the free space to reach once gc_min_free triggered a collection.",
    "negative_ttl": "How long a path that no tier (local, origin, upstreams) has is remembered as "
    "absent (seconds, or e.g. 1m), so a client walking a closure does not hammer the origin.",
    "origin": "The environment's shared S3-compatible bucket: pushes are written through to it, "
    "misses are pulled from it. Unset: this cache is an island.",
    "upstreams": "HTTP binary caches tried after the origin on a miss, in order; a narinfo is "
    "accepted only with a valid signature from one of that upstream's public_keys.",
    "nix_store": "Serving this host's own Nix store, when it runs Nix (nixcache.server.nixstore).",
}
# The fields that are TOML tables: rendered after every top-level key, as TOML requires.
_TABLES = ("nix_store", "origin", "upstreams")

# The keys of the [origin] and [[upstreams]] tables, with why each exists.
_ORIGIN_COMMENTS: dict[str, str] = {
    "endpoint": "S3 endpoint URL, e.g. https://s3.eu-central-1.amazonaws.com or http://10.0.0.5:8333.",
    "bucket": "Bucket in the Nix binary cache layout (nix-cache-info, <hash>.narinfo, nar/…).",
    "access_key_file": "File holding the S3 access key id (mode 0600; deployed from a secret reference).",
    "secret_key_file": "File holding the S3 secret access key (mode 0600; never on a command line).",
    "region": "Region for SigV4 signatures (most non-AWS engines accept us-east-1).",
    "addressing": "path (http://endpoint/bucket/key: MinIO, SeaweedFS, Ceph, Garage) or virtual "
    "(http://bucket.endpoint/key: AWS, R2).",
    "narinfo_deadline": "Seconds a narinfo lookup in the origin may take before the answer is 404 "
    "(counted as an error): a read never becomes a 5xx.",
    "nar_deadline": "Seconds the origin may take to connect or to send the next bytes of a NAR.",
    "write_timeout": "Seconds a narinfo write-through may take, or a NAR upload may stall, before "
    "the push gets 503 (and nothing is published here).",
    "gc_max_size": "nixcache gc --origin: delete the oldest paths until the bucket is below this size.",
    "gc_older_than": "nixcache gc --origin: delete paths uploaded longer ago than this (seconds, 90d).",
    "gc_grace": "nixcache gc --origin spares unreferenced NARs younger than this (a push may be on "
    "its way); pushers upload a NAR again once its copy is older than half of it. The same on "
    "every host of the environment.",
}
_UPSTREAM_COMMENTS: dict[str, str] = {
    "url": "Base URL of the binary cache, e.g. https://cache.nixos.org.",
    "public_keys": "Keys (name:base64) this upstream is trusted for; a narinfo without a valid "
    "signature from one of them is refused and counted.",
    "name": "Label in metrics and logs (default: the URL's host).",
    "narinfo_deadline": "Seconds a narinfo lookup may take before the answer is 404 (counted).",
    "nar_deadline": "Seconds the upstream may take to connect or to send the next bytes of a NAR.",
}
_TABLE_DURATIONS = {"narinfo_deadline", "nar_deadline", "write_timeout", "gc_older_than", "gc_grace"}

_SIZE_KEYS = {"max_upload_size", "gc_max_size", "gc_min_free", "gc_max_free"}
_DURATION_KEYS = {"gc_older_than", "keepalive_timeout", "negative_ttl"}


def parse_listen(listen: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [addr]:port); ConfigError naming the value otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen = {listen!r} must be HOST:PORT, e.g. 127.0.0.1:5000")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - ":5000" means all addresses


def _convert(name: str, value: Any) -> Any:
    """Turn a TOML value into the field's type; ConfigError naming the key on mismatch."""
    if name == "origin":
        return _origin(value)
    if name == "upstreams":
        if not isinstance(value, list):
            raise ConfigError('upstreams must be an array of tables: [[upstreams]] url = "…"')
        return [_upstream(i, v) for i, v in enumerate(value)]
    try:
        if name in _SIZE_KEYS:
            return parse_size(value)
        if name in _DURATION_KEYS:
            return parse_duration(value)
    except ValueError as error:
        raise ConfigError(f"{name}: {error}") from None
    if name in ("store", "push_token_file", "read_token_file"):
        return Path(_expect(name, value, str))
    if name == "signing_key_files":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f'{name} must be a list of file paths, e.g. ["/etc/nixcache/key.secret"]')
        return [Path(v) for v in value]
    if name == "priority":
        return _expect(name, value, int)
    if name == "log_level":
        if value not in LOG_LEVELS:
            raise ConfigError(f"log_level = {value!r} must be one of {', '.join(LOG_LEVELS)}")
        return value
    if name == "listen":
        parse_listen(_expect(name, value, str))
        return value
    if name == "store_dir":
        text = _expect(name, value, str)
        if not text.startswith("/") or text.endswith("/"):
            raise ConfigError(f"store_dir = {text!r} must be an absolute path without trailing slash")
        return text
    return _expect(name, value, str)


def _table(where: str, value: Any, cls: type, convert: Any) -> Any:
    """A dataclass from a TOML table: every key known and converted, required keys present."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(fields))}")
    missing = [
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in value
    ]
    if missing:
        raise ConfigError(f"{where}: {missing[0]} is required")
    try:
        return cls(**{k: convert(k, v) for k, v in value.items()})
    except ConfigError as error:
        raise ConfigError(f"{where}.{error}") from None


def _table_value(name: str, value: Any) -> Any:
    """A key of [origin] or [[upstreams]]."""
    try:
        if name in _TABLE_DURATIONS:
            seconds = float(value) if isinstance(value, float) else parse_duration(value)
            if seconds <= 0:
                raise ValueError(f"{value!r} must be more than zero")
            return seconds
        if name == "gc_max_size":
            return parse_size(value)
    except ValueError as error:
        raise ConfigError(f"{name}: {error}") from None
    if name in ("access_key_file", "secret_key_file"):
        return Path(_expect(name, value, str))
    if name in ("endpoint", "url"):
        text = _expect(name, value, str)
        if not text.startswith(("http://", "https://")) or "@" in text:
            raise ConfigError(
                f"{name} = {text!r} must be an http:// or https:// URL without credentials in it"
            )
        return text.rstrip("/")
    if name == "addressing":
        if value not in ("path", "virtual"):
            raise ConfigError(f"addressing = {value!r} must be path or virtual")
        return value
    if name == "public_keys":
        from nixcache.keys import KeyFormatError, PublicKey

        if not isinstance(value, list) or not value:
            raise ConfigError('public_keys must be a non-empty list, e.g. ["cache.example.org-1:base64…"]')
        for key in value:
            try:
                PublicKey.parse(_expect(name, key, str))
            except KeyFormatError as error:
                raise ConfigError(f"public_keys: {str(key)[:60]!r} is not a public key ({error})") from None
        return list(value)
    return _expect(name, value, str)


def _origin(value: Any) -> OriginConfig:
    origin = _table("origin", value, OriginConfig, _table_value)
    if not origin.bucket or "/" in origin.bucket:
        raise ConfigError(f"origin.bucket = {origin.bucket!r} must be a bucket name (no slashes)")
    return origin


def _upstream(index: int, value: Any) -> UpstreamConfig:
    upstream = _table(f"upstreams[{index}]", value, UpstreamConfig, _table_value)
    if not upstream.name:
        upstream.name = upstream.url.split("://", 1)[1].split("/", 1)[0]
    return upstream


def _expect(name: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{name} = {value!r} must be a {kind.__name__}")
    return value


def from_mapping(data: dict[str, Any], *, base: ServerConfig | None = None) -> ServerConfig:
    """A config from `data` (TOML keys) laid over `base` (defaults when None)."""
    config = dataclasses.replace(base) if base else ServerConfig()
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    for name, value in data.items():
        if name == "nix_store":
            config.nix_store = _nix_store(value, config.nix_store)
            continue
        if name not in known:
            raise ConfigError(f"unknown key {name!r}; known keys: {', '.join(sorted(known))}")
        setattr(config, name, _convert(name, value))
    return config


def _nix_store(data: Any, base: NixStoreConfig) -> NixStoreConfig:
    """The `[nix_store]` table laid over `base`; ConfigError naming `nix_store.<key>`."""
    if not isinstance(data, dict):
        raise ConfigError("nix_store must be a table: [nix_store] with serve_nix_store = true …")
    section = dataclasses.replace(base)
    for name, value in data.items():
        if name == "serve_nix_store":
            if not isinstance(value, bool):
                raise ConfigError(f"nix_store.serve_nix_store = {value!r} must be true or false")
        elif name in ("store_dir", "state_dir", "log_dir"):
            if not isinstance(value, str) or not value.startswith("/"):
                raise ConfigError(f"nix_store.{name} = {value!r} must be an absolute path")
            value = value.rstrip("/") if name == "store_dir" else Path(value)
        else:
            known = ", ".join(_NIX_STORE_COMMENTS)
            raise ConfigError(f"unknown key nix_store.{name!r}; known keys: {known}")
        setattr(section, name, value)
    return section


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


def _toml_value(name: str, value: Any) -> str:
    if name in _SIZE_KEYS:
        return _toml_string(format_size(value))
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(name, v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def dump(config: ServerConfig) -> str:
    """The TOML text of `config`, each key preceded by a comment saying why it exists.

    Unset optional keys are written commented out, so the file documents every tunable.
    """
    lines = ["# nixcache server configuration (rendered by nixcache.server.config.dump)", ""]
    for f in dataclasses.fields(ServerConfig):
        if f.name in _TABLES:
            continue  # TOML tables come after every top-level key
        for comment_line in _wrap(_COMMENTS[f.name]):
            lines.append(f"# {comment_line}")
        value = getattr(config, f.name)
        if value is None:
            lines.append(f"# {f.name} =")
        else:
            lines.append(f"{f.name} = {_toml_value(f.name, value)}")
        lines.append("")
    lines += _dump_table("nix_store", config.nix_store, _NIX_STORE_COMMENTS, "[nix_store]")
    lines += _dump_table("origin", config.origin, _ORIGIN_COMMENTS, "[origin]")
    for upstream in config.upstreams or [None]:
        lines += _dump_table("upstreams", upstream, _UPSTREAM_COMMENTS, "[[upstreams]]")
    return "\n".join(lines)


def _dump_table(name: str, table: Any, comments: dict[str, str], header: str) -> list[str]:
    """A table with a comment above each key; absent, it is written commented out."""
    lines = [f"# {line}" for line in _wrap(_COMMENTS[name])]
    lines.append(header if table is not None else f"# {header}")
    for key, why in comments.items():
        lines += [f"# {line}" for line in _wrap(why)]
        value = getattr(table, key, None)
        if value is None:
            lines.append(f"# {key} =")
        elif key == "gc_max_size":
            lines.append(f"{key} = {_toml_string(format_size(value))}")
        else:
            lines.append(f"{key} = {_toml_value(key, value)}")
    lines.append("")
    return lines


def _wrap(text: str, width: int = 96) -> list[str]:
    out, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*out, line] if line else out
