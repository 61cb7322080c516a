"""Quick checks of the recovery pieces that need no lab: key rotation rules, the proof, the drill runner."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import require

from nixcache.drill import PhaseError, PhaseRunner
from nixcache.keys import SecretKey, fingerprint
from nixcache.secrets import resolve
from operations import rotation
from operations.backup import empty_start
from operations.recovery import check_served
from operations.settings import SettingsError, from_data

CUR, NXT = "file:///k/current", "file:///k/next"


@pytest.mark.parametrize(
    ("data", "refs", "files"),
    [
        ({"signing_key_ref": CUR}, [CUR], ["/etc/nixcache/signing-key"]),
        (
            {"signing_key_ref": CUR, "signing_key_next_ref": NXT},
            [CUR, NXT],
            ["/etc/nixcache/signing-key", "/etc/nixcache/signing-key.next"],
        ),
        (
            {"signing_key_ref": CUR, "signing_key_next_ref": NXT, "rotate_phase": "retire"},
            [NXT],
            ["/etc/nixcache/signing-key.next"],
        ),
    ],
)
def test_rotation_phases_name_keys_and_files(data, refs, files) -> None:
    settings = from_data("cache-1", data)
    assert rotation.signing_refs(data) == refs
    assert rotation.key_files(settings) == files


def test_rotation_rejects_unknown_phase() -> None:
    with pytest.raises(SettingsError, match="rotate_phase"):
        rotation.phase({"signing_key_next_ref": NXT, "rotate_phase": "swap"})


def test_next_name_bumps_generation() -> None:
    assert rotation.next_name("cache-eu-1") == "cache-eu-2"
    assert rotation.next_name("lab1-9") == "lab1-10"
    assert rotation.next_name("mykey") == "mykey-2"


def test_trusted_keys_follow_phase(tmp_path) -> None:
    old, new = SecretKey.generate("c-1"), SecretKey.generate("c-2")
    (tmp_path / "current").write_text(old.serialize())
    (tmp_path / "next").write_text(new.serialize() + "\n")
    both = {
        "signing_key_ref": f"file://{tmp_path}/current",
        "signing_key_next_ref": f"file://{tmp_path}/next",
    }
    assert rotation.trusted_public_keys("c", both, resolve) == [str(old.public()), str(new.public())]
    retired = dict(both, rotate_phase="retire")
    assert rotation.trusted_public_keys("c", retired, resolve) == [str(new.public())]


def test_a_client_prepared_before_its_cache_creates_the_next_key_the_cache_then_signs_with(tmp_path) -> None:
    """pyinfra prepares hosts in parallel: the client may ask for the next key before the cache made it."""
    (tmp_path / "current").write_text(SecretKey.generate("cache-eu-1").serialize())
    data = {
        "signing_key_ref": f"file://{tmp_path}/current",
        "signing_key_name": "cache-eu-1",
        "signing_key_next_ref": f"file://{tmp_path}/next",
    }
    trusted = rotation.trusted_public_keys("cache-eu.fleet.example", data, resolve)
    stored = SecretKey.parse((tmp_path / "next").read_text())
    assert stored.name == "cache-eu-2"  # the cache's own name rule, not the client's
    assert trusted[1] == str(stored.public())
    # The cache's deploy, prepared afterwards, installs that same key.
    installed = rotation.next_key(from_data("cache-eu.fleet.example", data), "cache-eu.fleet.example")
    assert installed.unmask() == (tmp_path / "next").read_text()


def _serve(routes: dict[str, str]):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = routes.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write((body or "not found").encode())

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _narinfo(key: SecretKey, hash_part: str) -> str:
    path = f"/nix/store/{hash_part}-hello"
    nar_hash = "sha256:" + "1" * 52
    sig = key.sign(fingerprint(path, nar_hash, 120, []))
    return (
        f"StorePath: {path}\nURL: nar/x.nar\nCompression: none\nNarHash: {nar_hash}\n"
        f"NarSize: 120\nReferences: \nSig: {sig}\n"
    )


def test_proof_accepts_the_stored_key_and_rejects_another() -> None:
    key, other = SecretKey.generate("cache-1"), SecretKey.generate("cache-1")
    hash_part = "0" * 32
    server, url = _serve({"/pubkey": f"{key.public()}\n", f"/{hash_part}.narinfo": _narinfo(key, hash_part)})
    try:
        assert check_served(url, str(key.public()), hash_part) is None
        assert "does not list the stored key" in check_served(url, str(other.public()), hash_part)
        assert "answers HTTP 404" in check_served(url, str(key.public()), "1" * 32)
    finally:
        server.shutdown()


def test_proof_rejects_a_signature_by_another_key_of_the_same_name() -> None:
    key, impostor = SecretKey.generate("cache-1"), SecretKey.generate("cache-1")
    hash_part = "2" * 32
    routes = {"/pubkey": f"{key.public()}\n", f"/{hash_part}.narinfo": _narinfo(impostor, hash_part)}
    server, url = _serve(routes)
    try:
        assert "without a valid Sig by cache-1" in check_served(url, str(key.public()), hash_part)
    finally:
        server.shutdown()


def test_phase_runner_times_phases_and_stops_at_the_failed_one() -> None:
    lines: list[str] = []
    ran: list[str] = []

    def fail() -> None:
        raise PhaseError("restic said no")

    runner = PhaseRunner(echo=lines.append)
    runner.add("up", lambda: ran.append("up"))
    runner.add("backup", fail)
    runner.add("verify", lambda: ran.append("verify"))
    assert runner.run() is False
    assert ran == ["up"]
    assert runner.failed == "backup"
    assert lines[0].startswith("phase up: ") and lines[0].endswith(" s")
    assert lines[1].startswith("phase backup: FAILED after ") and "restic said no" in lines[1]


def test_sftp_host_of_repository_urls() -> None:
    from deploys.parts.backup import sftp_host

    assert sftp_host("sftp:nixcache-backup@10.231.3.12:/srv/nixcache-backup/lab1") == "10.231.3.12"
    assert sftp_host("sftp://backup@store.example.org:2222//srv/restic") == "store.example.org"
    assert sftp_host("sftp:store:/srv") == "store"
    assert sftp_host("/var/backups/restic") is None
    assert sftp_host("s3:s3.example.org/bucket") is None


def test_backup_ssh_key_is_stored_once_and_accepted_by_openssh(tmp_path) -> None:
    import shutil
    import subprocess

    from deploys.parts.backup import public_key
    from nixcache.secrets import SecretNotFound, ensure_ssh_key

    ref = f"file://{tmp_path / 'backup-ssh-key'}"
    with pytest.raises(SecretNotFound):
        ensure_ssh_key(ref, generate=False)
    first = ensure_ssh_key(ref, generate=True)
    assert ensure_ssh_key(ref, generate=True) == first  # never replaced
    require(shutil.which("ssh-keygen") is not None, "ssh-keygen missing (apt-get install openssh-client)")
    # What the deploy installs: the stored key with its final newline (OpenSSH insists on it).
    key_file = tmp_path / "id"
    key_file.write_text(first.rstrip("\n") + "\n")
    key_file.chmod(0o600)
    argv = ["ssh-keygen", "-y", "-f", str(key_file)]
    derived = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert derived.stdout.split()[:2] == public_key(first).split()[:2]


def test_an_unanswered_repository_question_is_never_an_empty_start() -> None:
    """No answer at all (nixcache missing while the deploy runs) stops the host, key or not."""
    allowed, message = empty_start("cache-1", "sftp:backup@10.0.0.3:/srv/cache-1", None, None, True)
    assert not allowed
    assert message.startswith(
        "cache-1: recover stopped before the restore: backup repository sftp:backup@10.0.0.3:/srv/cache-1"
        " cannot be read: the host's nixcache command, which reads it, is not installed;"
    )
