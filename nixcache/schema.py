"""One declaration per tunable: its type, default, converter and the reason for its default.

Every configuration of the project is a dataclass whose fields are declared with `setting()`:
the host data keys of the deploys (`operations.settings.Settings`), the server's config.toml
(`nixcache.server.config.ServerConfig` and its tables) and backup.toml
(`nixcache.backup.config.BackupConfig`). From that one declaration come

- `build()`: a dataclass from a mapping (host data, or a file parsed by `tomllib`): unknown keys
  are refused with the closest known key, every value goes through its converter (`Kind`), and
  a bad one raises `SchemaError` naming the key, the value and the fix, in one line;
- `to_toml()` / `dumps()`: the file's text, written by `tomli_w` (comments cannot be written by
  it: the reason of each key is in docs/settings.md, generated from the same declarations);
- `rows()`: the documentation table of every key.

Adding a key is one `setting(default, KIND, "why")` line in the dataclass it belongs to.
This module never imports pyinfra: the server and the backup tool use it on hosts.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nixcache.server.units import format_duration, format_size, parse_duration, parse_size


class SchemaError(ValueError):
    """A value (or key) that a configuration cannot take. `key` is dotted (`origin.bucket`),
    `fix` says what to give instead. The caller prefixes where it came from (host, file)."""

    def __init__(self, key: str, value: Any, fix: str, *, unknown: bool = False, missing: bool = False):
        self.key, self.value, self.fix, self.unknown, self.missing = key, value, fix, unknown, missing
        super().__init__(self.describe())

    def describe(self) -> str:
        """`'key' is value; fix` (or `unknown key 'key'; did you mean …`), without the source."""
        if self.unknown:
            return f"unknown key '{self.key}'; {self.fix}"
        if self.missing:
            return f"'{self.key}' is required; {self.fix}"
        return f"'{self.key}' is {_show(self.value)}; {self.fix}"

    def within(self, prefix: str) -> SchemaError:
        """The same error for a key inside table `prefix` (`origin`, `upstreams[0]`)."""
        if not self.key:  # a converter's own error about one item of its value
            joined = prefix
        elif self.key.startswith("["):
            joined = f"{prefix}{self.key}"
        else:
            joined = f"{prefix}.{self.key}"
        return SchemaError(joined, self.value, self.fix, unknown=self.unknown, missing=self.missing)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Kind:
    """A converter: what a key holds, how a raw value becomes it, and how it is written back.

    `parse` raises ValueError (or SchemaError from a nested table) for a value it cannot take;
    `fix` is then the advice. `from_text` reads the strings that `pyinfra --data key=value`
    passes (only host data is read leniently; a TOML file must hold the right type).
    """

    name: str
    fix: str
    parse: Callable[[Any], Any]
    dump: Callable[[Any], Any] = _same
    from_text: Callable[[str], Any] | None = None


def _typed(*types: type) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if isinstance(value, bool) and bool not in types:
            raise ValueError
        if not isinstance(value, types):
            raise ValueError
        return value

    return parse


def _bool_text(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError


BOOL = Kind("bool", "give true or false", _typed(bool), from_text=_bool_text)
STR = Kind("string", "give a string", _typed(str))


def integer(minimum: int | None = None, maximum: int | None = None) -> Kind:
    """A whole number, optionally bounded."""

    def parse(value: Any) -> int:
        number = _typed(int)(value)
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            raise ValueError
        return number

    if minimum is not None and maximum is not None:
        fix = f"give a whole number from {minimum} to {maximum}"
    elif minimum is not None:
        fix = f"give a whole number of at least {minimum}"
    else:
        fix = "give a whole number"
    return Kind("integer", fix, parse, from_text=lambda text: int(text.strip()))


INT = integer()
COUNT = integer(minimum=0)
PORT = Kind("port", "give a TCP port from 1 to 65535", integer(1, 65535).parse, from_text=lambda t: int(t))


def enum(*choices: str) -> Kind:
    """One of `choices`."""

    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError
        return value

    fix = "give " + (" or ".join(choices) if len(choices) <= 2 else "one of " + ", ".join(choices))
    return Kind("one of " + ", ".join(choices), fix, parse)


def _size(value: Any) -> int:
    if isinstance(value, float | bool):
        raise ValueError
    return parse_size(value)


SIZE = Kind(
    "size",
    "give a size such as 10G, 512M or a number of bytes (K/M/G/T/P are powers of 1024)",
    _size,
    format_size,
)


def _duration(value: Any) -> float:
    if isinstance(value, float):
        if value < 0:
            raise ValueError
        return value
    return parse_duration(value)


def _dump_duration(seconds: float) -> str | float:
    return format_duration(seconds) if float(seconds).is_integer() and seconds >= 1 else seconds


DURATION = Kind(
    "duration",
    "give a duration such as 30d, 12h, 90m, 1w2d or a number of seconds",
    _duration,
    _dump_duration,
)


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError
    return seconds


POSITIVE_DURATION = Kind(
    "duration", "give a duration above zero such as 2s, 1m or 0.5", _positive_duration, _dump_duration
)


def _matching(pattern: str) -> Callable[[Any], str]:
    regex = re.compile(pattern)

    def parse(value: Any) -> str:
        if not isinstance(value, str) or not regex.fullmatch(value.strip()):
            raise ValueError
        return value.strip()

    return parse


# systemd.resource-control(5) MemoryMax=: bytes, K/M/G/T (base 1024), a percentage of RAM, or
# "infinity". systemd ignores anything else with only a log line and runs without a limit.
MEMORY_LIMIT = Kind(
    "memory limit",
    "give a systemd memory limit: bytes with K, M, G or T (512M, 2G), a percentage (50%) or infinity",
    _matching(r"\d+(\.\d+)?[KMGT]?|\d+(\.\d+)?%|infinity"),
)
# nix-collect-garbage --delete-older-than: a number of days and "d", nothing else (Nix 2.8).
NIX_DAYS = Kind("age in days", "give a number of days with d, e.g. 7d", _matching(r"\d+d"))
# journald.conf(5) SystemMaxUse=: bytes with K, M, G, T, P, E (base 1024).
SYSTEMD_SIZE = Kind(
    "systemd size", "give bytes with K, M, G or T, e.g. 500M or 1G", _matching(r"\d+(\.\d+)?[KMGTPE]?")
)
_SYSTEMD_UNITS = (
    "usec|us|µs|msec|ms|seconds|second|sec|s|minutes|minute|min|m|hours|hour|hr|h|days|day|d"
    "|weeks|week|w|months|month|M|years|year|y"
)
# systemd.time(7) time spans: "30m", "2week", "1h 30min", or plain seconds.
TIMESPAN = Kind(
    "systemd time span",
    "give a systemd time span such as 30m, 2week or 1h 30min",
    _matching(rf"(\d+(\.\d+)?\s*({_SYSTEMD_UNITS})?\s*)+"),
    from_text=str,
)
# systemd.time(7) calendar events ("daily", "*:0/15", "Mon *-*-* 03:00"): too rich to check
# faithfully here, and a timer with an event systemd cannot parse loads but never fires. The
# judge is `systemd-analyze calendar` on the host: the unit primitive (operations/service.py,
# check_calendars) asks it for every OnCalendar= of a changed timer while the deploy is planned.
CALENDAR = Kind("systemd calendar", "give a systemd calendar event such as daily or *:0/15", _typed(str))
# Prometheus and Alertmanager durations: units y w d h m s ms, largest first, no spaces.
PROMETHEUS_DURATION = Kind(
    "Prometheus duration",
    "give a Prometheus duration such as 30s, 5m or 30d",
    _matching(r"(?=\d)(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?"),
)
# nginx time: a number with ms s m h d w M y (seconds without one), e.g. 300s or 5m.
NGINX_TIME = Kind(
    "nginx time", "give an nginx time such as 300s or 5m", _matching(r"(\d+(ms|s|m|h|d|w|M|y)?)+")
)


# What Prometheus' --web.listen-address and node exporter take: [address]:port (":9100" = all).
LISTEN_ADDRESS = Kind(
    "[address]:port", "give [address]:port, e.g. 127.0.0.1:9090 or :9100", _matching(r"[\w.\-\[\]:]*:\d+")
)


def _cidrs(value: Any) -> tuple[str, ...]:
    items = _strings_parse(value)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError from None
    return items


def _strings_parse(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise ValueError
    return tuple(item.strip() for item in value if item.strip())


def _split(text: str) -> list[str]:
    return [part for part in (p.strip() for p in text.split(",")) if part]


CIDRS = Kind(
    "list of CIDRs",
    "give networks such as 10.0.0.0/24 (a list, or comma-separated with --data)",
    _cidrs,
    list,
    _split,
)
STRINGS = Kind(
    "list of strings", "give a list of strings (comma-separated with --data)", _strings_parse, list, _split
)
STRING_LIST = Kind(
    "list of strings",
    "give a list of strings",
    lambda value: list(_strings_parse(value)),
    list,
    _split,
)


def _mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError
    return dict(value)


MAPPING = Kind("mapping", 'give a mapping, e.g. {"name": "value"} (JSON with --data)', _mapping)


def _records(value: Any) -> list[dict]:
    if not isinstance(value, list | tuple) or not all(isinstance(item, dict) for item in value):
        raise ValueError
    return [dict(item) for item in value]


RECORDS = Kind(
    "list of mappings", 'give a list of mappings, e.g. [{"name": "…"}] (JSON with --data)', _records
)


def _absolute(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError
    return value


# A file the server opens (relative to its working directory when not absolute).
FILE = Kind("path", "give a file path", lambda value: Path(_typed(str)(value)), str)
FILES = Kind(
    "list of paths",
    'give a list of file paths, e.g. ["/etc/nixcache/signing-key"]',
    lambda value: [Path(item) for item in _strings_parse(value)],
    lambda paths: [str(p) for p in paths],
)
ABSOLUTE_PATH = Kind("path", "give an absolute path", lambda value: Path(_absolute(value)), str)
PATH_TEXT = Kind("path", "give an absolute path", _absolute)
PATHS_TEXT = Kind(
    "list of paths",
    "give a list of absolute paths",
    lambda value: [_absolute(item) for item in _strings_parse(value)],
)


def _store_dir(value: Any) -> str:
    text = _absolute(value)
    if text != "/" and text.endswith("/"):
        raise ValueError
    return text


STORE_DIR = Kind("path", "give an absolute path without a trailing slash, e.g. /nix/store", _store_dir)


def _url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")) or "@" in value:
        raise ValueError
    return value.rstrip("/")


URL = Kind("URL", "give an http:// or https:// URL without credentials in it", _url)


def _secret_ref(value: Any) -> str:
    from nixcache.secrets.refs import parse

    if not isinstance(value, str):
        raise ValueError
    parse(value)  # SecretError (a ValueError) when the reference is malformed
    return value


SECRET_REF = Kind(
    "secret reference",
    "give a secret reference: op://vault/item/field, vault://mount/path#key or file:///path",
    _secret_ref,
)


def table(cls: type) -> Kind:
    """A nested TOML table declared as its own dataclass of `setting()`s."""
    return Kind(f"table [{cls.__name__}]", "give a table", lambda value: build(cls, value), to_toml)


def tables(cls: type) -> Kind:
    """An array of TOML tables, each one a `cls`."""

    def parse(value: Any) -> list:
        if not isinstance(value, list):
            raise ValueError
        items = []
        for index, item in enumerate(value):
            try:
                items.append(build(cls, item))
            except SchemaError as error:
                raise error.within(f"[{index}]") from None
        return items

    return Kind(
        f"array of tables [{cls.__name__}]",
        "give an array of tables",
        parse,
        lambda v: [to_toml(i) for i in v],
    )


# --- declarations -----------------------------------------------------------------------------
def setting(
    default: Any = dataclasses.MISSING,
    kind: Kind = STR,
    doc: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    optional: bool | None = None,
) -> Any:
    """A field of a configuration dataclass: `default` (or `factory`), its converter, and why.

    Optional (None allowed, and "" from host data means None) when the default is None or
    `optional=True`. A string default goes through the converter ("10G" is kept as bytes), so
    a bad default fails at import; mutable defaults (lists, dicts) are copied per instance.
    """
    if optional is None:
        optional = default is None
    if isinstance(default, str):
        default = kind.parse(default)  # declared as people write it ("10G", "30d"), kept converted
    metadata = {"kind": kind, "doc": " ".join(doc.split()), "optional": optional}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def kind_of(field: dataclasses.Field) -> Kind:
    return field.metadata["kind"]


def _closest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean '{close[0]}'?" if close else "known keys: " + ", ".join(sorted(known))


def convert(field: dataclasses.Field, value: Any, *, lenient: bool = False) -> Any:
    """`value` for `field` through its converter; SchemaError naming the key otherwise."""
    kind = kind_of(field)
    if value is None or (lenient and value == "" and field.metadata["optional"]):
        if field.metadata["optional"]:
            return None
        raise SchemaError(field.name, value, "remove it to use the default, or " + kind.fix)
    try:
        if lenient:
            return _lenient(kind, value)
        return kind.parse(value)
    except SchemaError as error:  # from a nested table: its key, within this one
        raise error.within(field.name) from None
    except (ValueError, TypeError):
        raise SchemaError(field.name, value, kind.fix) from None


def _lenient(kind: Kind, value: Any) -> Any:
    """What `pyinfra --data key=value` meant: pyinfra hands over "1G" as a string, 5001 as an int,
    4.48 as a float and a JSON list as a list; a comma-separated string is a list too."""
    if isinstance(value, str) and kind.from_text is not None:
        return kind.parse(kind.from_text(value))
    try:
        return kind.parse(value)
    except ValueError:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return kind.parse(str(value))  # e.g. --data origin_seaweedfs_version=4.48
        raise


def build(cls: type, data: Any, *, lenient: bool = False, base: Any = None, ignore=lambda key: False) -> Any:
    """A `cls` from `data`, laid over `base` (the defaults when None).

    Unknown keys (except those `ignore` accepts) and bad values raise SchemaError; so does a
    missing key that has no default. `lenient` reads the strings of `pyinfra --data`.
    """
    if not isinstance(data, Mapping):
        raise SchemaError(cls.__name__, data, "give a table of keys")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in sorted(data):
        if key not in fields and not ignore(key):
            raise SchemaError(key, data[key], _closest(key, list(fields)), unknown=True)
    values = {name: convert(fields[name], data[name], lenient=lenient) for name in fields if name in data}
    if base is not None:
        return dataclasses.replace(base, **values)
    for name, field in fields.items():
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and name not in values:
            raise SchemaError(name, None, kind_of(field).fix, missing=True)
    return cls(**values)


def to_toml(config: Any) -> dict[str, Any]:
    """The TOML document of `config`: every set key through its converter's `dump`, None left out."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is not None:
            out[field.name] = kind_of(field).dump(value)
    return out


def dumps(config: Any, header: str) -> str:
    """The file's text: `header` as comment lines, then `config` written by tomli-w."""
    import tomli_w

    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + "\n" + tomli_w.dumps(to_toml(config))


# --- documentation ----------------------------------------------------------------------------
def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "unset"
    if kind_of(field).name.startswith("table"):
        return "its keys' defaults"
    dumped = kind_of(field).dump(value)
    if isinstance(dumped, bool):
        return "true" if dumped else "false"
    if isinstance(dumped, str):
        return f'"{dumped}"'
    if isinstance(dumped, list | tuple | dict) and not dumped:
        return "[]" if not isinstance(dumped, dict) else "{}"
    return str(dumped)


def rows(
    cls: type, prefix: str = "", defaults: Mapping[str, str] | None = None
) -> list[tuple[str, str, str, str]]:
    """(key, kind, default, why) of every key of `cls`, nested tables as `table.key`.

    `defaults` overrides the shown default of keys whose default is computed at run time.
    """
    out = []
    for field in dataclasses.fields(cls):
        kind = kind_of(field)
        name = f"{prefix}{field.name}"
        default = (defaults or {}).get(field.name) or _default_text(field)
        out.append((name, kind.name, default, field.metadata["doc"]))
    return out


def markdown_table(cls: type, prefix: str = "", defaults: Mapping[str, str] | None = None) -> str:
    """`rows()` as a Markdown table."""
    lines = ["| Key | Kind | Default | Why |", "| --- | --- | --- | --- |"]
    for name, kind, default, why in rows(cls, prefix, defaults):
        cells = [f"`{name}`", kind, f"`{default}`", why]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
