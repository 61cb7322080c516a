"""/etc/nixcache: its directory and the text of config.toml (the server's own `dump`).

The files in it (config.toml, the signing key, the tokens) are put by the one file primitive,
`operations.hostfile.put`: owner and mode set before the first byte, renamed into place.
"""

from __future__ import annotations

from pathlib import Path

from pyinfra import host
from pyinfra.api import operation
from pyinfra.operations import files

from nixcache.server.config import NixStoreConfig, OriginConfig, ServerConfig, UpstreamConfig, dump
from operations import rotation
from operations.nginx import hits_log
from operations.settings import (
    CONFIG_DIR,
    PUSH_TOKEN_FILE,
    READ_TOKEN_FILE,
    S3_ACCESS_KEY_FILE,
    S3_SECRET_KEY_FILE,
    Settings,
    SettingsError,
)


@operation()
def config_dir(user: str, path: str = CONFIG_DIR):
    """/etc/nixcache: root-owned, readable by the service's group only (it holds key and tokens)."""
    yield from files.directory._inner(path=path, user="root", group=user, mode="0750")


def server_config(
    settings: Settings, *, push_token: bool, read_token: bool, nix_store: bool = False
) -> ServerConfig:
    """The ServerConfig the deploy installs for `settings`; `nix_store`: a host that runs Nix
    (deploys/parts/nixhost.py) also serves its own /nix/store."""
    return ServerConfig(
        listen=f"0.0.0.0:{settings.cache_port}",
        workers=settings.cache_workers,
        store=Path(settings.store_dir),
        # One key, or two during a rotation (operations/rotation.py).
        signing_key_files=[Path(path) for path in rotation.key_files(settings)],
        push_token_file=Path(PUSH_TOKEN_FILE) if push_token else None,
        read_token_file=Path(READ_TOKEN_FILE) if read_token else None,
        priority=settings.cache_priority,
        accel_redirect_prefix=settings.cache_accel_redirect_prefix if settings.cache_nginx_front else None,
        download_compression=settings.cache_download_compression,
        download_compression_level=settings.cache_download_compression_level,
        front_hits_log=Path(hits_log(settings.cache_data_dir)) if settings.cache_nginx_front else None,
        gc_max_size=settings.gc_max_size,
        gc_older_than=settings.gc_older_than,
        gc_min_free=settings.gc_min_free,
        gc_max_free=settings.gc_max_free,
        origin=_origin(settings),
        upstreams=[_upstream(entry) for entry in settings.origin_upstreams],
        nix_store=NixStoreConfig(serve_nix_store=nix_store),
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


def render_config(
    settings: Settings, *, push_token: bool = True, read_token: bool = False, nix_store: bool = False
) -> str:
    """The text of /etc/nixcache/config.toml (rendered by the server's own `dump`, tomli-w)."""
    return dump(server_config(settings, push_token=push_token, read_token=read_token, nix_store=nix_store))
