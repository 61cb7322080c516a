"""`file://` secrets: a local file holds the value, written atomically with mode 0600."""

from __future__ import annotations

import os
from pathlib import Path

from nixcache.secrets.errors import SecretError, SecretNotFound
from nixcache.secrets.refs import FileRef

BACKEND = "file"


class FileBackend:
    """Values are whole files; a trailing newline (as editors add) is not part of the value."""

    def get(self, ref: FileRef) -> str:
        path = ref.path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SecretNotFound(
                ref.ref, BACKEND, f"{path} does not exist", "create it (nixcache secrets put) or fix the path"
            ) from None
        except PermissionError:
            raise SecretError(
                ref.ref,
                BACKEND,
                f"{path} is not readable by uid {os.geteuid()}",
                "fix its owner/mode or run as its owner",
            ) from None
        except IsADirectoryError:
            raise SecretError(ref.ref, BACKEND, f"{path} is a directory", "point the ref at a file") from None
        except UnicodeDecodeError:
            raise SecretError(
                ref.ref, BACKEND, f"{path} is not UTF-8 text", "store text secrets only"
            ) from None
        except OSError as error:
            raise SecretError(
                ref.ref, BACKEND, f"cannot read {path}: {error.strerror}", "check the path and the disk"
            ) from None
        return text.removesuffix("\n")

    def put(self, ref: FileRef, value: str, *, overwrite: bool) -> None:
        write_atomic(ref, ref.path, value, overwrite=overwrite)


def write_atomic(ref: FileRef, path: Path, value: str, *, overwrite: bool) -> None:
    """Write `value` to `path`: parent created 0700, temp file 0600 from its first byte, fsync, rename.

    Without `overwrite` the temp file is hard-linked into place, which fails if `path` appeared
    in the meantime, so two concurrent creators can never replace each other's value.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise SecretError(
            ref.ref,
            BACKEND,
            f"cannot create directory {path.parent}: {error.strerror}",
            "check permissions on its parent",
        ) from None
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SecretError(
            ref.ref, BACKEND, f"stale temp file {tmp} is in the way", "remove it and retry"
        ) from None
    except OSError as error:
        raise SecretError(
            ref.ref, BACKEND, f"cannot write in {path.parent}: {error.strerror}", "check its permissions"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(value)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        raise SecretError(
            ref.ref, BACKEND, f"{path} already exists and must not be overwritten", "use the existing value"
        ) from None
    except OSError as error:
        raise SecretError(
            ref.ref, BACKEND, f"cannot write {path}: {error.strerror}", "check permissions and free space"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk; a key lost to a crash
    # right after it was "stored" would defeat storing it before use.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backend() -> FileBackend:
    return FileBackend()
