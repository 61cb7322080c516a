"""nixcache: signed Nix binary cache servers, provisioned and recovered with pyinfra."""

__version__ = "0.1.0"
