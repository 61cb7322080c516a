"""Uploads that keep a file private from its first byte, as root and under `pyinfra --sudo`.

A file is staged beside its destination (`<dest>.nixcache-new`) and renamed over it by the
caller. The staged file is created empty, with its final owner and mode, before anything is
uploaded. As root, pyinfra uploads straight onto it over SFTP (an existing file keeps its owner
and mode). Under `--sudo`, pyinfra's SSH connector uploads as the SSH user to
`remote_temp_filename`, copies that with sudo onto the staged file (`cp` onto an existing file
keeps its owner and mode), and removes it without sudo. So the temporary file is created first,
by root, empty, mode 0600 and owned by the SSH user (`$SUDO_USER`, which sudo sets; unset when
deploying as root), under an unpredictable name: nobody but root, the SSH user and the final
owner can read the content at any moment, and nobody else can swap the file before the copy.
The temporary file is removed afterwards in both modes (as root, pyinfra never touches it).
"""

from __future__ import annotations

import secrets
from typing import IO

from pyinfra import host
from pyinfra.api import FileUploadCommand, QuoteString, StringCommand

# The user whose SFTP session writes the temporary file: the sudo caller, or root itself.
# Expanded by the shell on the host (pyinfra runs commands through `sh -c '...'`).
SSH_USER = '"${SUDO_USER:-root}"'
TEMP_PREFIX = "nixcache-upload-"


def temp_filename() -> str:
    """An unpredictable name in pyinfra's temp directory on the host (/tmp/pyinfra-nixcache-upload-<hex>)."""
    return host.get_temp_filename(f"{TEMP_PREFIX}{secrets.token_hex(16)}", hash_filename=False)


def staged_upload(src: str | IO, staged: str, user: str, group: str, mode: str):
    """Commands that write `src` (a controller path or a file object) to `staged`, owned and
    moded before the first byte; the caller moves `staged` into place."""
    temp = temp_filename()
    owner = ("-o", QuoteString(user), "-g", QuoteString(group))
    yield StringCommand("install -m", mode, *owner, "/dev/null", QuoteString(staged))
    yield StringCommand("install -m 0600 -o", SSH_USER, "/dev/null", QuoteString(temp))
    yield FileUploadCommand(src, staged, remote_temp_filename=temp)
    yield StringCommand("rm -f", QuoteString(temp))
