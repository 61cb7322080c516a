"""Nix base32, sizes and durations: the formats people and Nix write."""

from __future__ import annotations

import hashlib
import os

import pytest

from nixcache.server import base32
from nixcache.server.units import format_duration, format_size, parse_duration, parse_size

# `nix hash to-base32 --type sha256 $(echo -n hello | sha256sum)` printed this (Nix 2.8).
HELLO = "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic"


def test_nix_base32_matches_nix() -> None:
    digest = hashlib.sha256(b"hello").digest()
    assert base32.encode(digest) == HELLO
    assert base32.decode(HELLO, 32) == digest
    assert base32.normalize_sha256("sha256:" + digest.hex()) == "sha256:" + HELLO


def test_round_trips_and_store_hash_length() -> None:
    for size in (20, 32):
        for _ in range(200):
            data = os.urandom(size)
            assert base32.decode(base32.encode(data), size) == data
    assert len(base32.encode(os.urandom(20))) == 32


@pytest.mark.parametrize(
    "text",
    [
        "sha256:2" + HELLO[1:],  # top bits beyond 256
        "sha256:" + HELLO[:-1] + "e",  # 'e' is not in Nix's alphabet
        "sha256:" + HELLO[:-1],
        "md5:" + HELLO,
        HELLO,
    ],
)
def test_bad_hashes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        base32.normalize_sha256(text)


def test_sizes_and_durations() -> None:
    assert parse_size("8G") == 8 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size(1000) == 1000
    assert format_size(1536 << 20) == "1536M"
    assert parse_size(format_size(123456789)) == 123456789
    assert parse_duration("1w2d") == 9 * 86400
    assert parse_duration("90m") == 5400
    assert parse_duration("3600") == 3600
    shown = [format_duration(s) for s in (3600, 36 * 3600, 30 * 86400 + 90, 0.2)]
    assert shown == ["1h", "1d12h", "30d1m30s", "0.2s"]
    for seconds in (1, 59, 3601, 4 * 86400 + 43200, 30 * 86400):
        assert parse_duration(format_duration(seconds)) == seconds
    for bad in ("lots", "-1"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)
    for bad in ("5 parsecs", "\u00b2"):  # isdigit() admits "²", which float() refuses
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
