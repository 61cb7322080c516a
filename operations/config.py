"""Files with content from the controller, /etc/nixcache/config.toml, the signing key and the tokens.

Every file is compared by sha256 with what the host holds (a fact), so an unchanged file is
neither uploaded nor touched. A changed file is written as `<path>.nixcache-new`, created
empty with its final owner and mode *before* any byte is uploaded (a secret is never readable
by anyone else, not even for a moment), then renamed over the old one (readers never see half a
file). Secret values travel as `HiddenValue`s, so pyinfra prints them masked, and go up through
SFTP from memory, never on a command line. The same holds under `pyinfra --sudo` (see
operations/upload.py for the temporary file that takes).
"""

from __future__ import annotations

import io
from pathlib import Path

from pyinfra import host
from pyinfra.api import HiddenValue, QuoteString, StringCommand, operation
from pyinfra.facts.files import File, Sha256File

from nixcache.server.config import OriginConfig, ServerConfig, UpstreamConfig, dump
from operations import rotation, storage, upload
from operations.render import sha256
from operations.settings import (
    CONFIG_DIR,
    PUSH_TOKEN_FILE,
    READ_TOKEN_FILE,
    S3_ACCESS_KEY_FILE,
    S3_SECRET_KEY_FILE,
    Settings,
    SettingsError,
)
from operations.storage import fact_mode


def file_changes(path: str, content: str, user: str, group: str, mode: str):
    """Commands that put `content` at `path` (owner and mode set before the first byte)."""
    current = host.get_fact(File, path=path)
    if host.get_fact(Sha256File, path=path) != sha256(content):
        new = f"{path}.nixcache-new"
        yield from upload.staged_upload(io.StringIO(content), new, user, group, mode)
        yield StringCommand("mv -f", QuoteString(new), QuoteString(path))
        return
    if current and (current["user"], current["group"], current["mode"]) != (user, group, fact_mode(mode)):
        yield StringCommand("chown", QuoteString(f"{user}:{group}"), QuoteString(path))
        yield StringCommand("chmod", mode, QuoteString(path))
        return
    host.noop(f"{path} is up to date")


@operation()
def text_file(path: str, content: str, user: str = "root", group: str = "root", mode: str = "0644"):
    """`path` holds exactly `content`, owned `user:group` with `mode`."""
    yield from file_changes(path, content, user, group, mode)


@operation()
def secret_file(path: str, value: HiddenValue, user: str, group: str | None = None, mode: str = "0600"):
    """`path` holds the secret `value` (a HiddenValue), mode 0600 owned by `user` by default."""
    secret = value.unmask() if isinstance(value, HiddenValue) else value
    yield from file_changes(path, secret, user, group or user, mode)


@operation()
def config_dir(user: str, path: str = CONFIG_DIR):
    """/etc/nixcache: root-owned, readable by the service's group only (it holds key and tokens)."""
    yield from storage.directory._inner(path, "root", user, "0750")


def server_config(settings: Settings, *, push_token: bool, read_token: bool) -> ServerConfig:
    """The ServerConfig the deploy installs for `settings`."""
    return ServerConfig(
        listen=f"0.0.0.0:{settings.cache_port}",
        store=Path(settings.store_dir),
        # One key, or two during a rotation (operations/rotation.py).
        signing_key_files=[Path(path) for path in rotation.key_files(settings)],
        push_token_file=Path(PUSH_TOKEN_FILE) if push_token else None,
        read_token_file=Path(READ_TOKEN_FILE) if read_token else None,
        priority=settings.cache_priority,
        accel_redirect_prefix=settings.cache_accel_redirect_prefix if settings.cache_nginx_front else None,
        gc_max_size=settings.gc_max_size,
        gc_older_than=settings.gc_older_than,
        gc_min_free=settings.gc_min_free,
        gc_max_free=settings.gc_max_free,
        origin=_origin(settings),
        upstreams=[_upstream(entry) for entry in settings.origin_upstreams],
    )


def _upstream(entry: dict) -> UpstreamConfig:
    """One [[upstreams]] table from host data (validated as the server validates its config)."""
    from nixcache.server.config import ConfigError, from_mapping

    try:
        return from_mapping({"upstreams": [entry]}).upstreams[0]
    except ConfigError as error:
        raise SettingsError(f"{host.name}: host data 'origin_upstreams': {error}") from None


def _origin(settings: Settings) -> OriginConfig | None:
    """The [origin] table when the host data names an origin endpoint."""
    if not settings.origin_endpoint:
        return None
    return OriginConfig(
        endpoint=settings.origin_endpoint.rstrip("/"),
        bucket=settings.origin_bucket,
        access_key_file=Path(S3_ACCESS_KEY_FILE),
        secret_key_file=Path(S3_SECRET_KEY_FILE),
        region=settings.origin_region,
        addressing=settings.origin_addressing,
        gc_max_size=settings.origin_gc_max_size,
        gc_older_than=settings.origin_gc_older_than,
    )


def render_config(settings: Settings, *, push_token: bool = True, read_token: bool = False) -> str:
    """The text of /etc/nixcache/config.toml (rendered by the server's own `dump`, tomli-w)."""
    return dump(server_config(settings, push_token=push_token, read_token=read_token))
