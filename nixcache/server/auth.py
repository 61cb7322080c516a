"""Push and read tokens: loaded from files, presented as HTTP Basic (netrc) or Bearer."""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass
from pathlib import Path


class TokenError(ValueError):
    """A token file cannot be used."""


def load_token(path: Path, what: str) -> bytes:
    """The token in `path` (surrounding whitespace stripped); TokenError naming the file otherwise."""
    try:
        token = path.read_bytes().strip()
    except OSError as error:
        raise TokenError(
            f"cannot read {what} file {path}: {error.strerror}; check the path and its owner"
        ) from None
    if not token:
        raise TokenError(f"{what} file {path} is empty; write a random token into it")
    return token


def presented_token(authorization: str | None) -> bytes | None:
    """The token in an Authorization header: Basic's password (any user name) or Bearer's value."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip().encode() or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        _, sep, password = decoded.partition(b":")
        return password if sep else None
    return None


def _matches(presented: bytes | None, expected: bytes | None) -> bool:
    # compare_digest takes time independent of where the strings differ.
    return presented is not None and expected is not None and hmac.compare_digest(presented, expected)


@dataclass(frozen=True, repr=False)
class Tokens:
    """The configured tokens; `repr` never shows them."""

    push: bytes | None = None
    read: bytes | None = None

    @classmethod
    def load(cls, push_file: Path | None, read_file: Path | None) -> Tokens:
        return cls(
            push=load_token(push_file, "push token") if push_file else None,
            read=load_token(read_file, "read token") if read_file else None,
        )

    def may_read(self, authorization: str | None) -> bool:
        """Reads are open without a read token; otherwise the read or the push token opens them."""
        if self.read is None:
            return True
        token = presented_token(authorization)
        # Evaluate both comparisons so timing does not tell which token matched.
        read_ok = _matches(token, self.read)
        push_ok = _matches(token, self.push)
        return read_ok or push_ok

    def may_push(self, authorization: str | None) -> bool:
        return _matches(presented_token(authorization), self.push)

    def __repr__(self) -> str:
        return f"Tokens(push={'set' if self.push else 'unset'}, read={'set' if self.read else 'unset'})"
