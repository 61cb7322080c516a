"""`nixcache keys export|import`: the passphrase-encrypted offline copy of the signing key."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from nixcache.cli import main
from nixcache.keys import PublicKey, SecretKey

PASSPHRASE = "tangerine-orbit-quartz-47"


def keys_cli(*args: str, input: str | None = None):
    return CliRunner().invoke(main, ["keys", *args], input=input)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "signing-key"
    path.write_text(SecretKey.generate("cache-eu-1").serialize())
    path.chmod(0o600)
    return path


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_text(PASSPHRASE + "\n")
    path.chmod(0o600)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def export(key_file: Path, passphrase_file: Path, to: Path) -> None:
    result = keys_cli(
        "export",
        "--secret-key-file",
        str(key_file),
        "--to",
        str(to),
        "--passphrase-file",
        str(passphrase_file),
    )
    assert result.exit_code == 0, result.output


def test_round_trip_with_prompts_gives_back_the_same_key_in_0600_files(tmp_path, key_file):
    exported = tmp_path / "offline" / "key.json"
    exported.parent.mkdir()
    result = keys_cli(
        "export",
        "--secret-key-file",
        str(key_file),
        "--to",
        str(exported),
        input=f"{PASSPHRASE}\n{PASSPHRASE}\n",
    )
    assert result.exit_code == 0, result.output
    assert PASSPHRASE not in result.output  # hidden prompt
    public = str(SecretKey.parse(key_file.read_text()).public())
    assert f"exported key cache-eu-1 ({public})" in result.output
    assert mode(exported) == 0o600
    assert key_file.read_text().split(":")[1] not in exported.read_text()

    restored = tmp_path / "new-host" / "signing-key"
    restored.parent.mkdir()
    result = keys_cli(
        "import", "--from", str(exported), "--secret-key-file", str(restored), input=f"{PASSPHRASE}\n"
    )
    assert result.exit_code == 0, result.output
    assert restored.read_text() == key_file.read_text()
    assert mode(restored) == 0o600
    assert f"imported key cache-eu-1 ({public}) into {restored}" in result.output
    # The restored key still signs what the old public key verifies.
    assert PublicKey.parse(public).verify(SecretKey.parse(restored.read_text()).sign(b"fp"), b"fp")


def test_round_trip_with_a_passphrase_file_and_fresh_salt_each_time(tmp_path, key_file, passphrase_file):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    export(key_file, passphrase_file, first)
    export(key_file, passphrase_file, second)
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["format"] == "nixcache-key-export" and a["version"] == 1 and a["key_name"] == "cache-eu-1"
    assert a["kdf"]["name"] == "argon2id" and a["cipher"]["name"] == "aes-256-gcm"
    assert a["kdf"]["salt"] != b["kdf"]["salt"] and a["cipher"]["nonce"] != b["cipher"]["nonce"]
    assert a["ciphertext"] != b["ciphertext"]

    out = tmp_path / "restored"
    result = keys_cli(
        "import",
        "--from",
        str(second),
        "--secret-key-file",
        str(out),
        "--passphrase-file",
        str(passphrase_file),
    )
    assert result.exit_code == 0, result.output
    assert out.read_text() == key_file.read_text()


def test_wrong_passphrase_is_refused_in_one_line_and_writes_nothing(tmp_path, key_file, passphrase_file):
    exported = tmp_path / "key.json"
    export(key_file, passphrase_file, exported)
    out = tmp_path / "restored"
    result = keys_cli(
        "import", "--from", str(exported), "--secret-key-file", str(out), input="not-the-passphrase\n"
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        f"Error: cannot decrypt {exported}: wrong passphrase, or the file was altered;"
        " retry with the export's passphrase, or use another copy"
    )
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.json", "passphrase", "signing-key"]


def _tamper_ciphertext(envelope: dict) -> None:
    raw = bytearray(base64.b64decode(envelope["ciphertext"]))
    raw[5] ^= 0x01
    envelope["ciphertext"] = base64.b64encode(bytes(raw)).decode()


def _rename_key(envelope: dict) -> None:
    envelope["key_name"] = "attacker-1"


def _swap_public_key(envelope: dict) -> None:
    envelope["public_key"] = str(SecretKey.generate("cache-eu-1").public())


def _weaken_kdf(envelope: dict) -> None:
    envelope["kdf"]["iterations"] = 1


@pytest.mark.parametrize("tamper", [_tamper_ciphertext, _rename_key, _swap_public_key, _weaken_kdf])
def test_a_tampered_file_is_refused(tmp_path, key_file, passphrase_file, tamper):
    exported = tmp_path / "key.json"
    export(key_file, passphrase_file, exported)
    envelope = json.loads(exported.read_text())
    tamper(envelope)
    exported.write_text(json.dumps(envelope))
    out = tmp_path / "restored"
    result = keys_cli(
        "import",
        "--from",
        str(exported),
        "--secret-key-file",
        str(out),
        "--passphrase-file",
        str(passphrase_file),
    )
    assert result.exit_code == 1
    assert "wrong passphrase, or the file was altered" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("not json at all", "not JSON"),
        ('{"format": "something-else"}', "no format 'nixcache-key-export'"),
        ('{"format": "nixcache-key-export", "version": 9}', "version 9, this nixcache reads 1"),
    ],
)
def test_a_file_that_is_not_an_export_is_named_as_such(tmp_path, content, reason):
    bogus = tmp_path / "bogus.json"
    bogus.write_text(content)
    result = keys_cli("import", "--from", str(bogus), "--secret-key-file", str(tmp_path / "k"), input="x\n")
    assert result.exit_code == 1
    assert f"{bogus} is not a usable nixcache key export ({reason})" in result.stderr
    assert "Passphrase" not in result.output  # refused before asking


def test_absurd_kdf_parameters_are_refused_before_deriving(tmp_path, key_file, passphrase_file):
    exported = tmp_path / "key.json"
    export(key_file, passphrase_file, exported)
    envelope = json.loads(exported.read_text())
    envelope["kdf"]["memory_cost_kib"] = 64 * 1024 * 1024  # 64 GiB
    exported.write_text(json.dumps(envelope))
    result = keys_cli(
        "import",
        "--from",
        str(exported),
        "--secret-key-file",
        str(tmp_path / "k"),
        "--passphrase-file",
        str(passphrase_file),
    )
    assert result.exit_code == 1
    assert "kdf memory_cost_kib 67108864 is outside 1..1048576" in result.stderr


def test_nothing_is_overwritten_without_force(tmp_path, key_file, passphrase_file):
    exported = tmp_path / "key.json"
    export(key_file, passphrase_file, exported)
    before = exported.read_text()
    result = keys_cli(
        "export",
        "--secret-key-file",
        str(key_file),
        "--to",
        str(exported),
        "--passphrase-file",
        str(passphrase_file),
    )
    assert result.exit_code == 1
    assert f"{exported} already exists; pass --force to overwrite it" in result.stderr
    assert exported.read_text() == before

    existing = tmp_path / "current-key"
    existing.write_text("keep me")
    args = [
        "import",
        "--from",
        str(exported),
        "--secret-key-file",
        str(existing),
        "--passphrase-file",
        str(passphrase_file),
    ]
    result = keys_cli(*args)
    assert result.exit_code == 1
    assert f"{existing} already exists; pass --force to overwrite it" in result.stderr
    assert existing.read_text() == "keep me"
    assert keys_cli(*args, "--force").exit_code == 0
    assert existing.read_text() == key_file.read_text()
    assert mode(existing) == 0o600


def test_short_passphrase_is_refused(tmp_path, key_file):
    result = keys_cli(
        "export", "--secret-key-file", str(key_file), "--to", str(tmp_path / "k.json"), input="short\nshort\n"
    )
    assert result.exit_code == 1
    assert "use at least 12" in result.stderr
    assert not (tmp_path / "k.json").exists()
