"""Serving this host's own Nix store (`[nix_store] serve_nix_store = true`), as nix-serve and
harmonia do: nothing is copied, every answer is read from Nix's database and store when asked.

    store.py    LocalNixStore: one method per route (narinfo, NAR, .ls, log)
    db.py       Nix's SQLite database, read-only, schema checked at open
    dump.py     NARs generated from the store path, streamed (bytes chunks and sendfile regions)
    listing.py  the `.ls` JSON listing, from the same walk as the NAR
    logs.py     build logs from Nix's log directory

Exceptions: `db.NixDbError` (the database cannot answer) and `dump.PathChanged` (an OSError: the
path changed or vanished under a download; the connection is closed).
"""
