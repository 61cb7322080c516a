"""The `nixcache` command.

Subcommands live beside the code they drive and are imported only when invoked:
`nixcache serve` must be able to monkey-patch with gevent before anything else
(ssl, threading, socket) is imported, and `nixcache lab` must not pay for the server.
"""

from __future__ import annotations

import importlib

import click

from nixcache import __version__

# name -> "module:attribute" of a click command or group
SUBCOMMANDS: dict[str, str] = {
    "serve": "nixcache.server.cli:serve",
    "gc": "nixcache.server.cli:gc",
    "keys": "nixcache.keycli:keys",
    "lab": "nixcache.lab.cli:lab",
    "secrets": "nixcache.secrets.cli:secrets",
    "backup": "nixcache.backup.cli:backup",
    "disk-alert": "nixcache.alerts:disk_alert",
    "nix-stats": "nixcache.nixstats:nix_stats",
    "drill": "nixcache.drill:drill",
    "fleet": "nixcache.fleet:fleet",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            return self._load(name)
        return super().get_command(ctx, name)

    def _load(self, name: str) -> click.Command:
        module_name, attribute = self.lazy[name].split(":")
        return getattr(importlib.import_module(module_name), attribute)


@click.group(cls=LazyGroup, lazy=SUBCOMMANDS)
@click.version_option(__version__, prog_name="nixcache")
def main() -> None:
    """Signed Nix binary cache servers: serve, provision, back up, recover."""
