"""The nixcache binary cache server: a gevent WSGI app over a local store.

Nothing in this package imports pyinfra; `nixcache serve` monkey-patches with gevent before
importing the modules that open sockets (see `nixcache.server.cli`).
"""
