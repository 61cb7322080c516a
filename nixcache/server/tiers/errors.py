"""Why a tier could not answer (the tree is drawn in nixcache.server.tiers)."""

from __future__ import annotations


class TierError(Exception):
    """A tier could not answer; `reason` is the metrics label, the message names tier and cause."""

    reason = "error"

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class TierUnavailable(TierError):
    """Unreachable, timed out, or a server error."""

    reason = "unavailable"


class TierRefused(TierError):
    """The tier answered with something this cache will not take (malformed, untrusted)."""

    reason = "refused"


class FetchAborted(OSError):
    """A pulled-through NAR failed while a client was receiving it: its connection is cut (an
    OSError, as a broken connection is, so the HTTP layer closes it without an answer)."""
