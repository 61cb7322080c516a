"""`nixcache serve`, `nixcache gc` and `nixcache verify`.

This module imports click only: `serve` must call `gevent.monkey.patch_all()` before the
server modules (sockets, threads, ssl) are imported.
"""

from __future__ import annotations

from pathlib import Path

import click

_PATH = click.Path(dir_okay=False, path_type=Path)


@click.command()
@click.option("--config", "config_file", type=_PATH, help="TOML config (e.g. /etc/nixcache/config.toml).")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), help="Store directory.")
@click.option("--listen", help="HOST:PORT to bind [default: 127.0.0.1:5000].")
@click.option("--workers", type=int, help="Worker processes; 0 = one per core [default: 0].")
@click.option("--signing-key", "signing_keys", type=_PATH, multiple=True, help="Secret key file; repeatable.")
@click.option("--push-token-file", type=_PATH, help="File holding the push token.")
@click.option("--read-token-file", type=_PATH, help="File holding the read token.")
@click.option("--priority", type=int, help="Priority advertised in nix-cache-info.")
@click.option("--max-upload-size", help="Largest upload accepted, e.g. 8G.")
@click.option("--accel-redirect-prefix", help="Answer GET /nar/* with X-Accel-Redirect for an nginx front.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
def serve(
    config_file: Path | None,
    store: Path | None,
    listen: str | None,
    workers: int | None,
    signing_keys: tuple[Path, ...],
    push_token_file: Path | None,
    read_token_file: Path | None,
    priority: int | None,
    max_upload_size: str | None,
    accel_redirect_prefix: str | None,
    log_level: str | None,
) -> None:
    """Serve the binary cache (flags override the config file)."""
    # The config is read before gevent is imported: with several workers the parent stays an
    # unpatched process that forks, and each worker patches for itself (nixcache.server.prefork).
    from nixcache.server import config as configmod

    try:
        config = configmod.load(config_file) if config_file else configmod.ServerConfig()
        config = configmod.with_overrides(
            config,
            store=str(store) if store else None,
            listen=listen,
            workers=workers,
            signing_key_files=[str(p) for p in signing_keys] or None,
            push_token_file=str(push_token_file) if push_token_file else None,
            read_token_file=str(read_token_file) if read_token_file else None,
            priority=priority,
            max_upload_size=max_upload_size,
            accel_redirect_prefix=accel_redirect_prefix,
            log_level=log_level,
        )
        if config.worker_count() == 1:
            from gevent import monkey

            monkey.patch_all()

            from nixcache.server import runner

            runner.run(config)
        else:
            from nixcache.server import prefork

            prefork.run(config)
    except (configmod.ConfigError, configmod.StartupError) as error:
        raise click.ClickException(str(error)) from None


@click.command()
@click.option("--config", "config_file", type=_PATH, help="Read store and gc_* limits from this config.")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), help="Store directory.")
@click.option("--max-size", help="Collect until the store is at most this big, e.g. 50G.")
@click.option("--older-than", help="Collect entries not served for this long, e.g. 30d.")
@click.option("--min-free", help="Collect when free space is below this …")
@click.option("--max-free", help="… until this much is free.")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted, delete nothing.")
@click.option(
    "--origin",
    "origin",
    is_flag=True,
    help="Collect the origin bucket of the config's [origin] (by --max-size, --older-than) "
    "instead of the local store. Run it on one host per environment.",
)
def gc(
    config_file: Path | None,
    store: Path | None,
    max_size: str | None,
    older_than: str | None,
    min_free: str | None,
    max_free: str | None,
    dry_run: bool,
    origin: bool,
) -> None:
    """Delete least recently served entries until the limits hold (safe while serving)."""
    if origin:
        _gc_origin(config_file, max_size, older_than, min_free, max_free, dry_run)
        return
    from nixcache.server import gc as gcmod

    try:
        limits = gcmod.limits_from(config_file, store, max_size, older_than, min_free, max_free)
        gcmod.run(limits, dry_run=dry_run, echo=click.echo)
    except gcmod.GcError as error:
        raise click.ClickException(str(error)) from None


def _gc_origin(
    config_file: Path | None,
    max_size: str | None,
    older_than: str | None,
    min_free: str | None,
    max_free: str | None,
    dry_run: bool,
) -> None:
    from nixcache.server import config as configmod
    from nixcache.server.tiers import TierError, origin_gc
    from nixcache.server.tiers.origin import Origin
    from nixcache.server.units import parse_duration, parse_size

    if min_free or max_free:
        raise click.ClickException("--min-free/--max-free apply to a local disk, not to --origin")
    try:
        config = configmod.load(config_file) if config_file else configmod.ServerConfig()
        if config.origin is None:
            raise click.ClickException(
                "--origin needs a config with an [origin] table (endpoint, bucket, key files): pass --config"
            )
        origin = Origin(config.origin, config.store_dir)
        origin_gc.run(
            origin,
            max_size=parse_size(max_size) if max_size is not None else config.origin.gc_max_size,
            older_than=parse_duration(older_than) if older_than is not None else config.origin.gc_older_than,
            dry_run=dry_run,
            echo=click.echo,
            grace=config.origin.gc_grace,
        )
    except (configmod.ConfigError, origin_gc.OriginGcError, TierError, ValueError) as error:
        raise click.ClickException(str(error)) from None


@click.command()
@click.option("--config", "config_file", type=_PATH, help="Read store and store_dir from this config.")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), help="Store directory.")
@click.option(
    "--nar-hash",
    is_flag=True,
    help="Also decompress every NAR and check its NarHash/NarSize (slower; FileHash covers bit rot).",
)
@click.option("--dry-run", is_flag=True, help="Report damaged entries, move nothing.")
@click.option(
    "--progress-seconds",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds between progress lines on stderr.",
)
def verify(
    config_file: Path | None, store: Path | None, nar_hash: bool, dry_run: bool, progress_seconds: float
) -> None:
    """Re-hash every NAR of the store; move damaged entries aside (safe while serving).

    Exit status: 0 nothing damaged, 1 damaged entries found (quarantined unless --dry-run),
    2 verify could not run.
    """
    from nixcache.server import config as configmod
    from nixcache.server import verify as verifymod

    try:
        config = configmod.load(config_file) if config_file else configmod.ServerConfig()
        report = verifymod.run(
            store or config.store,
            store_dir=config.store_dir,
            nar_hash=nar_hash,
            dry_run=dry_run,
            echo=click.echo,
            progress=lambda line: click.echo(line, err=True),
            progress_seconds=progress_seconds,
        )
    except (configmod.ConfigError, verifymod.VerifyError) as error:
        raise _Trouble(str(error)) from None
    except OSError as error:
        raise _Trouble(f"verify stopped: {error}; check the store's permissions and disk") from None
    if report.damaged:
        raise SystemExit(1)


class _Trouble(click.ClickException):
    """A command that could not do its work: exit 2, so that 1 keeps its own meaning."""

    exit_code = 2
