"""Facts about the cache's storage: the filesystem on a dedicated volume."""

from __future__ import annotations

from typing import Any

from pyinfra.api import FactBase, QuoteString, StringCommand


class BlockDeviceFilesystem(FactBase):
    """The filesystem type on a block device (``"ext4"``), ``""`` when it holds none, None when absent."""

    def requires_command(self, *args: Any, **kwargs: Any) -> str:
        return "blkid"

    def command(self, device: str) -> StringCommand:
        return StringCommand(
            "if [ -b",
            QuoteString(device),
            "]; then echo device $(blkid -o value -s TYPE",
            QuoteString(device),
            "2>/dev/null); else echo absent; fi",
        )

    def process(self, output: list[str]) -> str | None:
        words = " ".join(output).split()
        if not words or words[0] != "device":
            return None
        return words[1] if len(words) > 1 else ""
