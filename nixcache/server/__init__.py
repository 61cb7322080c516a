"""The nixcache binary cache server: the Nix binary cache protocol over a local store, on gevent
with llhttp parsing requests (see `nixcache.server.http`).

Nothing in this package imports pyinfra; `nixcache serve` monkey-patches with gevent before
importing the modules that open sockets (see `nixcache.server.cli`).
"""
