"""The one way a file with content from the controller lands on a host: `hostfile.put`.

Every file the deploys write (config.toml, keys and tokens, unit files, sshd and sudoers
drop-ins, the firewall ruleset, Prometheus' configuration…) goes through `put`:

- compared by sha256 with what the host holds (pyinfra's `Sha256File` and `File` facts), so an
  unchanged file is neither uploaded nor touched, and only an owner or mode fix is a chown/chmod;
- a changed file is staged beside its target as `<path>.nixcache-new`, created empty with its
  final owner and mode *before* the first byte is uploaded (operations/upload.py, also under
  `pyinfra --sudo`), so a secret is never readable by anyone else, not even for a moment;
- optionally checked by a command before it replaces the old one; then renamed over it in one
  `mv` (readers never see half a file). A check that fails leaves the old file in place (or no
  file, when there was none) and fails the step with one line naming the host, the file, the
  check, what the check printed and the fix.

Content may be a `HiddenValue`: pyinfra prints it masked, and it goes up over SFTP from memory,
never on a command line.

Why not pyinfra's `files.put` / `files.template`: they upload onto the target and chown/chmod
afterwards (a new secret is readable with the default umask in between, and an existing file is
rewritten in place, so readers can see half of it), they have no check-before-replace, and
`--diff` prints the content (secrets included). Directories use pyinfra's `files.directory`.
"""

from __future__ import annotations

import io
import posixpath
import shlex

from pyinfra import host
from pyinfra.api import HiddenValue, QuoteString, StringCommand, operation
from pyinfra.facts.files import File, Sha256File

from operations import upload
from operations.render import sha256
from operations.storage import fact_mode

STAGED_SUFFIX = ".nixcache-new"
# An in-place check keeps the previous version here (a hard link) until the check passed.
PREVIOUS_SUFFIX = ".nixcache-old"
DEFAULT_FIX = "fix the host data or template that renders it, then rerun the deploy"


def _text(content: str | HiddenValue) -> str:
    return content.unmask() if isinstance(content, HiddenValue) else content


def differs(path: str, content: str | HiddenValue) -> bool:
    """True when the host's `path` does not hold exactly `content` (absent included)."""
    return host.get_fact(Sha256File, path=path) != sha256(_text(content))


def _rejected(path: str, check: str, fix: str, restore: StringCommand) -> StringCommand:
    """The `else` branch of a check: undo (`restore`), one line on stderr, fail the step."""
    return StringCommand(
        "else",
        restore,
        "; printf '%s: %s: not installed, %s rejected it: %s; the previous version is unchanged; %s\\n'",
        QuoteString(host.name),
        QuoteString(path),
        QuoteString(f"`{check}`"),
        # The check's own output, on one line (it says what is wrong with the file).
        '"$(printf %s "$out" | tr "\\n" " ")"',
        QuoteString(fix),
        ">&2; exit 1; fi",
    )


def _install(path: str, staged: str, check: str | None, check_in_place: bool, fix: str) -> StringCommand:
    """The command that moves `staged` over `path`, after `check` approved it."""
    target, new = QuoteString(path), QuoteString(staged)
    if check is None:
        return StringCommand("mv -f", new, target)
    if not check_in_place:
        command = check.replace("{path}", shlex.quote(staged))
        return StringCommand(
            "if out=$( {", command, "; } 2>&1); then mv -f", new, target, ";",
            _rejected(path, command, fix, StringCommand("rm -f", new)),
        )  # fmt: skip
    # The checker reads the whole configuration from where it lives (sshd -t, nginx -t): the new
    # file goes into place, the previous one is kept as a hard link and renamed back on failure.
    previous = QuoteString(f"{path}{PREVIOUS_SUFFIX}")
    command = check.replace("{path}", shlex.quote(path))
    restore = StringCommand(
        "if [ -e", previous, "]; then mv -f", previous, target, "; else rm -f", target, "; fi"
    )  # fmt: skip
    return StringCommand(
        "rm -f", previous, "; if [ -e", target, "]; then ln -f", target, previous, "; fi; mv -f", new, target,
        "; if out=$( {", command, "; } 2>&1); then rm -f", previous, ";",
        _rejected(path, command, fix, restore),
    )  # fmt: skip


@operation()
def put(
    path: str,
    content: str | HiddenValue,
    user: str = "root",
    group: str = "root",
    mode: str = "0644",
    check: str | None = None,
    check_in_place: bool = False,
    fix: str = DEFAULT_FIX,
):
    """`path` holds exactly `content`, owned `user:group` with `mode`, approved by `check` first.

    + path: the file on the host (its directory is created, root 0755, when the file is new)
    + content: the whole file; a ``HiddenValue`` for secrets (never printed, never on a command line)
    + user: owner
    + group: group
    + mode: octal permissions, e.g. ``"0600"``
    + check: a shell command that must succeed before the new version replaces the old one;
      ``{path}`` in it is the staged new file (``visudo -cqf {path}``, ``nft -c -f {path}``)
    + check_in_place: run ``check`` with the new file at ``path`` (for checkers that read a whole
      configuration: ``sshd -t``, ``nginx -t``); the previous version comes back when it fails
    + fix: what to do when ``check`` fails, ending the step's error line

    A rejected file fails the step with
    ``<host>: <path>: not installed, `<check>` rejected it: <its output>; the previous version is
    unchanged; <fix>``, and nothing else changed. Use ``hostfile.differs`` before composing to
    decide on a reload or restart (content changed, not only owner or mode).

    **Examples:**

    .. code:: python

        hostfile.put(
            name="/etc/nixcache/config.toml",
            path="/etc/nixcache/config.toml",
            content=config_text,
            group="nixcache",
            mode="0640",
        )

        hostfile.put(
            name="Signing key",
            path="/etc/nixcache/signing-key",
            content=signing_key,  # a HiddenValue
            user="nixcache",
            group="nixcache",
            mode="0600",
        )

        hostfile.put(
            name="sudo for admin users",
            path="/etc/sudoers.d/60-nixcache-admins",
            content=render_sudoers(users),
            mode="0440",
            check="visudo -cqf {path}",
        )
    """
    text = _text(content)
    current = host.get_fact(File, path=path)
    if current and not differs(path, text):
        if (current["user"], current["group"], current["mode"]) != (user, group, fact_mode(mode)):
            yield StringCommand("chown", QuoteString(f"{user}:{group}"), QuoteString(path))
            yield StringCommand("chmod", mode, QuoteString(path))
            return
        host.noop(f"{path} is up to date")
        return
    if current is None:
        yield StringCommand("mkdir -p", QuoteString(posixpath.dirname(path) or "/"))
    staged = f"{path}{STAGED_SUFFIX}"
    yield from upload.staged_upload(io.StringIO(text), staged, user, group, mode)
    yield _install(path, staged, check, check_in_place, fix)
