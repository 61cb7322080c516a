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
}

_SIZE_KEYS = {"max_upload_size", "gc_max_size", "gc_min_free", "gc_max_free"}
_DURATION_KEYS = {"gc_older_than", "keepalive_timeout"}


def parse_listen(listen: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [addr]:port); ConfigError naming the value otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen = {listen!r} must be HOST:PORT, e.g. 127.0.0.1:5000")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - ":5000" means all addresses


def _convert(name: str, value: Any) -> Any:
    """Turn a TOML value into the field's type; ConfigError naming the key on mismatch."""
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
        if f.name == "nix_store":
            continue  # a table: after every top-level key, as TOML requires
        for comment_line in _wrap(_COMMENTS[f.name]):
            lines.append(f"# {comment_line}")
        value = getattr(config, f.name)
        if value is None:
            lines.append(f"# {f.name} =")
        else:
            lines.append(f"{f.name} = {_toml_value(f.name, value)}")
        lines.append("")
    lines += ["[nix_store]", ""]
    for f in dataclasses.fields(NixStoreConfig):
        for comment_line in _wrap(_NIX_STORE_COMMENTS[f.name]):
            lines.append(f"# {comment_line}")
        lines.append(f"{f.name} = {_toml_value(f.name, getattr(config.nix_store, f.name))}")
        lines.append("")
    return "\n".join(lines)


def _wrap(text: str, width: int = 96) -> list[str]:
    out, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*out, line] if line else out
