"""Keep httpx importable inside pyinfra runs (the 1Password client, the deploy's health check).

pyinfra's CLI monkey-patches the process with gevent before it loads deploys, and gevent's
patched `select` has no `epoll`. httpcore (under httpx, under onepasswordconnectsdk) probes for
trio with `try: import trio except ImportError`, but when trio is installed its import fails
with AttributeError on `select.epoll`, which escapes that probe and breaks every httpx import.
"""

from __future__ import annotations

import sys


def make_httpx_importable() -> None:
    """Make a trio that cannot load under gevent look absent, before httpx is first imported."""
    import select

    if hasattr(select, "epoll") or "httpcore" in sys.modules or "trio" in sys.modules:
        return  # not under gevent's patched select, or too late to matter
    try:
        import trio  # noqa: F401
    except ImportError:
        return
    except Exception:  # the AttributeError described above, or similar
        # None in sys.modules makes `import trio` raise ImportError, which httpcore expects.
        sys.modules["trio"] = None  # type: ignore[assignment]
