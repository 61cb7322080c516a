"""Facts about the nixcache installation on a host: its Python, the installed build, the firewall.

Units' state is pyinfra's own `SystemdStatus` / `SystemdEnabled` (through `systemd.service`).
"""

from __future__ import annotations

from typing import Any

from pyinfra.api import FactBase, QuoteString, StringCommand

# Debian/Ubuntu release -> its python3, for hosts that do not have python3 yet (the base step
# installs it in the same run, after facts were gathered).
RELEASE_PYTHON: dict[str, str] = {
    "bookworm": "3.11",
    "trixie": "3.13",
    "jammy": "3.10",
    "noble": "3.12",
}

_PYTHON_PROBE = (
    "import platform, sys; "
    "print(f'{sys.version_info[0]}.{sys.version_info[1]}', platform.machine(), platform.libc_ver()[1])"
)


class HostPython(FactBase):
    """The host's python3 as a wheelhouse must match it: version, machine and glibc version.

    Returns ``{"version": "3.11", "machine": "x86_64", "glibc": "2.36", "source": "python3"}``.
    Without python3 the version comes from the release codename in /etc/os-release
    (``"source": "os-release"``) and glibc from ``ldd``; None when neither tells.
    """

    def command(self) -> StringCommand:
        return StringCommand(
            "if command -v python3 >/dev/null 2>&1; then echo python3 $(python3 -c",
            QuoteString(_PYTHON_PROBE),
            "); else . /etc/os-release 2>/dev/null;",
            "echo os-release ${VERSION_CODENAME:-unknown} $(uname -m)",
            "$(ldd --version 2>/dev/null | head -n1 | grep -oE '[0-9]+[.][0-9]+$'); fi",
        )

    def process(self, output: list[str]) -> dict[str, str] | None:
        words = " ".join(output).split()
        if len(words) < 3:
            return None
        source, version, machine = words[:3]
        glibc = words[3] if len(words) > 3 else ""
        if source == "os-release":
            version = RELEASE_PYTHON.get(version, "")
            if not version:
                return None
        return {"version": version, "machine": machine, "glibc": glibc, "source": source}


class FileLine(FactBase):
    """The first line of a small text file (stamps), or None when the file does not exist."""

    def command(self, path: str) -> StringCommand:
        return StringCommand("head -n1", QuoteString(path), "2>/dev/null || true")

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output else None


class NftTable(FactBase):
    """Whether the nftables table ``family table`` is loaded in the running kernel."""

    def requires_command(self, *args: Any, **kwargs: Any) -> str:
        return "nft"

    def command(self, family: str, table: str) -> StringCommand:
        return StringCommand(
            "nft list table",
            QuoteString(family),
            QuoteString(table),
            ">/dev/null 2>&1 && echo yes || echo no",
        )

    def process(self, output: list[str]) -> bool:
        return bool(output) and output[0].strip() == "yes"


class CalendarRejected(FactBase):
    """Of `events` (systemd OnCalendar= values), those the host's systemd cannot parse.

    systemd.time(7) calendar events are too rich to check faithfully on the controller, and
    systemd is what reads them: `systemd-analyze calendar` on the host is the judge (a timer
    with an event it cannot parse loads, but never fires). None without systemd-analyze.
    """

    @staticmethod
    def default() -> list[str]:
        return []

    def requires_command(self, *args: Any, **kwargs: Any) -> str:
        return "systemd-analyze"

    def command(self, events: list[str]) -> StringCommand:
        parts: list[Any] = ["for event in"]
        parts += [QuoteString(event) for event in events]
        parts += [
            '; do systemd-analyze calendar -- "$event" >/dev/null 2>&1 || printf "%s\\n" "$event"; done'
        ]
        return StringCommand(*parts)

    def process(self, output: list[str]) -> list[str]:
        return [line for line in output if line]
