"""Drive the `restic` binary: repository access, JSON output, and errors a person can act on.

The password reaches restic only as RESTIC_PASSWORD_FILE (a path), and s3/rest credentials
only through the environment: argv is world-readable through /proc, so nothing secret is
ever put there, and nothing read from those files is ever printed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from nixcache.backup.config import BackupConfig

TAG = "nixcache"

# Inherited variables that would override or redirect what the configuration says.
_SCRUBBED = (
    "RESTIC_PASSWORD",
    "RESTIC_PASSWORD_COMMAND",
    "RESTIC_PASSWORD_FILE",
    "RESTIC_REPOSITORY",
    "RESTIC_REPOSITORY_FILE",
    "RESTIC_KEY_HINT",
)


class ResticError(RuntimeError):
    """A restic step failed; `str()` is one line naming the repository, the cause and the fix."""

    def __init__(
        self, repository: str, cause: str, fix: str, detail: list[str] | None = None, kind: str = "failed"
    ):
        super().__init__(f"backup repository {repository}: {cause}; {fix}")
        self.repository = repository
        self.cause = cause
        self.fix = fix
        # What kind of failure, for programs reading `--json` errors: "missing" (no repository
        # at that location), "password", "unreachable", "locked", "permission", "no-space",
        # "damaged", or "failed" for anything else.
        self.kind = kind
        # restic's own last lines (credentials redacted), printed above the one-line error
        self.detail = detail or []


@dataclass(frozen=True)
class Snapshot:
    """One snapshot as `restic snapshots --json` lists it."""

    id: str
    short_id: str
    time: str
    host: str
    paths: list[str]
    tags: list[str]

    def moment(self) -> datetime:
        """When the snapshot was taken (restic writes RFC 3339 with nanoseconds)."""
        return datetime.fromisoformat(self.time)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        return cls(
            id=data["id"],
            short_id=data.get("short_id", data["id"][:8]),
            time=data["time"],
            host=data.get("hostname", ""),
            paths=list(data.get("paths") or []),
            tags=list(data.get("tags") or []),
        )


@dataclass(frozen=True)
class BackupSummary:
    """What one `restic backup` did."""

    snapshot_id: str
    bytes_added: int  # new data in the repository, after deduplication and compression
    bytes_processed: int  # size of everything backed up
    vanished: list[str]  # store files deleted while the backup ran (not an error)


def classify_backup_errors(stderr: str, vanish_ok_under: str | None) -> tuple[list[str], list[str]]:
    """restic's JSON error messages -> (vanished store files, other problems as text)."""
    vanished, unreadable = [], []
    for line in stderr.splitlines():
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(message, dict) or message.get("message_type") != "error":
            continue
        error = message.get("error") or {}
        item = str(message.get("item") or error.get("Path") or "?")
        errno_ = error.get("Err") if isinstance(error, dict) else None
        if errno_ == errno.ENOENT and vanish_ok_under and item.startswith(vanish_ok_under):
            vanished.append(item)
            continue
        reason = os.strerror(errno_) if isinstance(errno_, int) else str(error)
        op = error.get("Op", "read") if isinstance(error, dict) else "read"
        unreadable.append(f"{op} {item}: {reason}")
    return vanished, unreadable


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments ignored); values are never echoed in errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(
            f"cannot read env file {path}: {error.strerror}; check env_file and its mode"
        ) from None
    env = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"env file {path} line {number} is not KEY=VALUE; fix that line")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


class Restic:
    """One repository, as configured; every call runs the real `restic` binary."""

    def __init__(self, config: BackupConfig, binary: str = "restic"):
        self.config = config
        self.repository = config.repository
        self.host = config.host or socket.gethostname()
        self.binary = binary
        # The repository as restic gets it: with env_file's credential, once environment() ran.
        self.credentialed = config.repository

    def display_repository(self) -> str:
        """The repository as it may be printed (a URL's password hidden)."""
        return redact(self.repository)

    # -- plumbing ---------------------------------------------------------------------------

    def _fail(self, cause: str, fix: str, stderr: str = "", kind: str = "failed") -> ResticError:
        detail = [redact(line, self.credentialed) for line in _meaningful_lines(stderr)[-10:]]
        return ResticError(redact(self.repository), redact(cause, self.credentialed), fix, detail, kind)

    def environment(self) -> dict[str, str]:
        """The environment restic runs with: repository, password file, credentials, cache."""
        if shutil.which(self.binary) is None:
            raise self._fail(f"the '{self.binary}' program is not installed", "apt-get install restic")
        password_file = Path(self.config.password_file)
        try:
            with password_file.open("rb") as handle:
                empty = not handle.read(1)
        except FileNotFoundError:
            raise self._fail(
                f"password file {password_file} does not exist",
                "deploy the backup password (mode 0600) or fix password_file in the config",
            ) from None
        except OSError as error:
            raise self._fail(
                f"cannot read password file {password_file}: {error.strerror}",
                "run as root or fix the file's owner and mode (0600)",
            ) from None
        if empty:
            raise self._fail(f"password file {password_file} is empty", "put the repository password in it")
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        if self.config.env_file:
            try:
                env.update(read_env_file(Path(self.config.env_file)))
            except ValueError as error:
                raise self._fail(str(error).split(";")[0], "fix env_file or the file it names") from None
        # A rest: repository's URL carries the host's credential (user:password@), so it comes
        # from env_file (0600), never from backup.toml; it must name the same repository.
        credentialed = env.get("RESTIC_REPOSITORY")
        if credentialed and without_credentials(credentialed) != without_credentials(self.repository):
            raise self._fail(
                f"env_file {self.config.env_file} sets RESTIC_REPOSITORY to"
                f" {without_credentials(credentialed)}, not the configured repository",
                "make 'repository' and env_file name the same repository (redeploy the backup config)",
            )
        self.credentialed = credentialed or self.repository
        env["RESTIC_REPOSITORY"] = self.credentialed
        env["RESTIC_PASSWORD_FILE"] = str(password_file)
        if self.config.cache_dir:
            env["RESTIC_CACHE_DIR"] = self.config.cache_dir
        # restic emits JSON status 60 times a second by default; one a second is plenty.
        env["RESTIC_PROGRESS_FPS"] = "1"
        return env

    def explain(self, stderr: str, returncode: int, action: str) -> ResticError:
        """Turn restic's stderr into one line: what broke and how to fix it."""
        text = stderr.strip()
        lowered = text.lower()

        def fail(cause: str, fix: str, kind: str = "failed") -> ResticError:
            return self._fail(cause, fix, text, kind)

        if "wrong password" in lowered:
            return fail(
                f"the password in {self.config.password_file} does not open it",
                "put the repository's password in that file (or point password_file at the right one)",
                "password",
            )
        if "already locked" in lowered or "unable to create lock" in lowered:
            return fail(
                "it is locked by another restic process",
                "wait for it to finish; if none is running, run `restic unlock` against the repository",
                "locked",
            )
        ssh = [line for line in text.splitlines() if line.startswith("subprocess ssh:")]
        if ssh:
            said = ssh[-1].removeprefix("subprocess ssh:").strip()
            if "host key verification failed" in lowered:
                fix = "add the repository host's key to root's known_hosts (ssh-keyscan, then verify it)"
            elif "permission denied" in lowered:
                fix = "install root's ssh public key for that user on the repository host"
            else:
                fix = "check the host name, that sshd runs there, and the network between the hosts"
            return fail(f"ssh to the repository host failed ({said})", fix, "unreachable")
        # A REST repository server (the backup repository host, rclone serve restic) answers
        # 401 to a credential it does not know, and 403 to a host opening another host's
        # repository or deleting anything but a lock in its append-only repository.
        if "(401)" in lowered or "401 unauthorized" in lowered:
            return fail(
                "the repository server does not accept this host's credential (HTTP 401)",
                "deploy deploys/backup.py on the repository host, then this host, so that both use"
                " the credential at backup_credential_ref",
                "permission",
            )
        if "(403)" in lowered or "403 forbidden" in lowered:
            if action.startswith("forget") or "not removed" in lowered:
                return fail(
                    f"the repository is append-only for this host: it may add snapshots, not {action}",
                    "old snapshots are removed by the repository host's retention"
                    " (nixcache-backup-prune.timer there), never by a cache host",
                    "permission",
                )
            return fail(
                f"the repository server forbids this host to {action} there (HTTP 403): a host may"
                " open only its own repository, /<its inventory name>/",
                "point 'repository' at this host's own repository",
                "permission",
            )
        if "permission denied" in lowered or "read-only file system" in lowered:
            return fail(
                f"permission denied while trying to {action}",
                "make the repository writable for the backup user (root) and mounted read-write",
                "permission",
            )
        if "no space left" in lowered:
            return fail(
                f"no space left on the repository's device while trying to {action}",
                "free space there or lower the retention counts",
                "no-space",
            )
        if "unable to open config file" in lowered and _says_missing(lowered):
            return fail(
                "there is no repository there yet",
                "run `nixcache backup run` (it initialises the repository) or fix 'repository' in the config",
                "missing",
            )
        if (
            "is there a repository at the following location" in lowered
            or "unable to open repository" in lowered
        ):
            return fail(
                f"cannot reach it ({_last_fatal(text)})",
                "check the URL/path, the network and the credentials in env_file",
                "unreachable",
            )
        if "repository contains errors" in lowered:
            problems = [line for line in _meaningful_lines(text) if not line.startswith("Fatal:")]
            first = f": {problems[0]}" if problems else ""
            return fail(
                f"restic check found damage{first}",
                "see the restic lines above; run `restic rebuild-index` and `nixcache backup check` again,"
                " and if it stays damaged start a new repository (the next run fills it)",
                "damaged",
            )
        detail = _last_fatal(text) or f"restic exited with status {returncode}"
        return fail(f"{action} failed: {detail}", "see the restic lines above and fix their cause")

    def _json(self, stdout: str, opener: str, action: str) -> Any:
        """The JSON document in restic's stdout, skipping any notice printed before it."""
        start = stdout.find(opener)
        document = _first_json_document(stdout[start:]) if start >= 0 else None
        if document is None:
            raise self._fail(
                f"restic's answer to '{action}' was not JSON ({stdout.strip()[:80]!r})",
                "run the same restic command by hand to see what it prints",
            )
        return document

    def _argv(self, args: list[str]) -> list[str]:
        return [self.binary, *args]

    def run(self, args: list[str], action: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run restic to completion; raise ResticError (unless `check` is false) when it fails.

        A lock left by a killed run blocks every later run; when restic reports one, stale locks
        are removed (`restic unlock` leaves live ones alone) and the command is tried once more.
        """
        env = self.environment()

        def once() -> subprocess.CompletedProcess[str]:
            return subprocess.run(self._argv(args), env=env, capture_output=True, text=True, check=False)

        result = once()
        if result.returncode != 0 and self._locked(result.stderr, env):
            result = once()
        if check and result.returncode != 0:
            raise self.explain(result.stderr, result.returncode, action)
        return result

    def _locked(self, stderr: str, env: dict[str, str]) -> bool:
        """True when restic refused because of a lock, after clearing the stale ones."""
        if "already locked" not in stderr.lower():
            return False
        subprocess.run(self._argv(["unlock"]), env=env, capture_output=True, check=False)
        return True

    def stream(
        self,
        args: list[str],
        action: str,
        on_message: Callable[[dict[str, Any]], None],
        *,
        ok_codes: tuple[int, ...] = (0,),
    ) -> tuple[int, str, list[dict[str, Any]]]:
        """Run restic with --json, hand each JSON line to `on_message`.

        Returns (exit code, stderr, non-status messages); raises ResticError for an exit code
        outside `ok_codes`. stderr is drained on a thread so a chatty restic never blocks.
        """
        env = self.environment()
        returncode, stderr, messages = self._stream_once(args, env, on_message)
        if returncode != 0 and self._locked(stderr, env):
            returncode, stderr, messages = self._stream_once(args, env, on_message)
        if returncode not in ok_codes:
            raise self.explain(stderr, returncode, action)
        return returncode, stderr, messages

    def _stream_once(
        self, args: list[str], env: dict[str, str], on_message: Callable[[dict[str, Any]], None]
    ) -> tuple[int, str, list[dict[str, Any]]]:
        process = subprocess.Popen(
            self._argv(args),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        errors: list[str] = []
        drain = threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
        drain.start()
        messages = []
        assert process.stdout is not None
        for message in _json_lines(process.stdout):
            on_message(message)
            if message.get("message_type") != "status":
                messages.append(message)
        returncode = process.wait()
        drain.join()
        return returncode, "".join(errors), messages

    # -- repository -------------------------------------------------------------------------

    def exists(self) -> bool:
        """True when the repository is initialised; False when there is none at that location.

        restic 0.14 exits 1 for both "no repository" and "unreachable", so stderr decides.
        """
        result = self.run(["cat", "config", "--no-lock"], "open the repository", check=False)
        if result.returncode == 0:
            return True
        lowered = result.stderr.lower()
        if "unable to open config file" in lowered and _says_missing(lowered):
            return False
        raise self.explain(result.stderr, result.returncode, "open the repository")

    def init(self) -> None:
        self.run(["init"], "initialise the repository")

    def snapshots(self, *, this_host: bool = True) -> list[Snapshot]:
        args = ["snapshots", "--json", "--no-lock"]
        if this_host:
            args += ["--host", self.host]
        result = self.run(args, "list snapshots")
        return [Snapshot.from_json(item) for item in self._json(result.stdout, "[", "list snapshots")]

    def backup(
        self, paths: list[str], on_status: Callable[[dict[str, Any]], None], *, time: str | None = None
    ) -> BackupSummary:
        """Back up `paths` (restic's --time sets the snapshot's date, for tests and imports).

        Exit code 3 means restic saved a snapshot but could not read some files. Store files that
        vanished meanwhile (garbage collection deletes NARs while a backup runs) are harmless and
        only reported; any other unreadable file fails the backup.
        """
        args = ["backup", "--json", "--host", self.host, "--tag", TAG]
        for pattern in self.config.excludes():
            args += ["--exclude", pattern]
        if time:
            args += ["--time", time]
        args += ["--", *paths]
        returncode, stderr, messages = self.stream(args, "back up", on_status, ok_codes=(0, 3))
        vanished: list[str] = []
        if returncode == 3:
            gone_ok = self.config.store_dir.rstrip("/") + "/" if self.config.include_store else None
            vanished, unreadable = classify_backup_errors(stderr, gone_ok)
            if unreadable or not vanished:
                first = unreadable[0] if unreadable else _last_line(stderr)
                raise self._fail(
                    f"{len(unreadable) or 'some'} file(s) could not be read,"
                    f" the snapshot is incomplete ({first})",
                    "fix the permissions of those files or add them to 'exclude'",
                    stderr,
                )
        summaries = [m for m in messages if m.get("message_type") == "summary"]
        if not summaries:
            raise self._fail(
                "restic reported no summary for the backup", "run it again with restic -v", stderr
            )
        summary = summaries[-1]
        return BackupSummary(
            snapshot_id=summary.get("snapshot_id", ""),
            bytes_added=int(summary.get("data_added", 0)),
            bytes_processed=int(summary.get("total_bytes_processed", 0)),
            vanished=vanished,
        )

    def forget(self) -> list[str]:
        """Apply the retention to this host's snapshots and prune; return the removed snapshot ids."""
        c = self.config
        args = ["forget", "--json", "--prune", "--host", self.host, "--tag", TAG, "--group-by", "host"]
        for flag, count in (
            ("--keep-daily", c.keep_daily),
            ("--keep-weekly", c.keep_weekly),
            ("--keep-monthly", c.keep_monthly),
        ):
            if count:
                args += [flag, str(count)]
        result = self.run(args, "forget old snapshots")
        removed = []
        # With --prune, restic prints prune's plain-text report after the JSON document.
        for group in _first_json_document(result.stdout) or []:
            removed += [s["id"] for s in group.get("remove") or []]
        return removed

    def check(self) -> None:
        args = ["check"]
        if self.config.check_read_data_subset:
            args += ["--read-data-subset", self.config.check_read_data_subset]
        self.run(args, "check the repository")

    def restore_size(self, snapshot_id: str) -> int:
        """Total bytes of the files in a snapshot (what a restore writes)."""
        action = "measure the snapshot"
        result = self.run(["stats", "--json", "--no-lock", "--mode", "restore-size", snapshot_id], action)
        return int(self._json(result.stdout, "{", action).get("total_size", 0))

    def restore(self, snapshot_id: str, target: str, includes: list[str], *, verify: bool) -> None:
        args = ["restore", snapshot_id, "--target", target]
        for pattern in includes:
            args += ["--include", pattern]
        if verify:
            args.append("--verify")
        self.run(args, "restore")


def without_credentials(url: str) -> str:
    """`url` without a user:password@ part (how a rest: repository is named in messages and config)."""
    return re.sub(r"://[^/@]+@", "://", url)


def redact(text: str, repository: str | None = None) -> str:
    """Hide the password of a URL with credentials (rest:https://user:secret@host/) in `text`."""
    repository = repository or text
    match = re.search(r"://([^/@:]+):([^/@]+)@", repository)
    if not match:
        return text
    return text.replace(f":{match.group(2)}@", ":***@")


def _json_lines(stream) -> Iterator[dict[str, Any]]:
    for line in stream:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def _first_json_document(text: str) -> Any:
    text = text.lstrip()
    if not text:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
    return value


def _says_missing(lowered_stderr: str) -> bool:
    """restic's backends word "there is no such file" differently; these are the ones seen."""
    markers = ("no such file or directory", "does not exist", "404", "not found", "nosuchkey")
    return any(marker in lowered_stderr for marker in markers)


_CHATTER = (
    "using temporary cache",
    "create exclusive lock",
    "load indexes",
    "check all packs",
    "check snapshots, trees and blobs",
    "[",
)


def _meaningful_lines(stderr: str) -> list[str]:
    """restic's stderr without its progress chatter."""
    lines = [line.strip() for line in stderr.splitlines()]
    return [line for line in lines if line and not line.startswith(_CHATTER)]


def _last_fatal(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("Fatal:"):
            return line.removeprefix("Fatal:").strip()
    return lines[-1] if lines else ""


def _last_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else "no detail"
