"""`nixcache serve` start-up: defaults, config file, flags, and one-line errors."""

from __future__ import annotations

import os
import socket
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest

from nixcache.server import config as configmod
from server.helpers import SERVE, start_server, write_key


def serve_fails(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data")}
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=30, env=env)


def test_serve_without_arguments(tmp_path: Path) -> None:
    """Defaults: 127.0.0.1:5000, a store and a generated key under the user's data dir."""
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no owner
    try:
        probe.bind(("127.0.0.1", 5000))
    except OSError:
        probe.close()
        # Someone else holds 5000 here: then the one-line port error is what a user sees.
        out = serve_fails([], tmp_path)
        assert out.returncode != 0 and "cannot listen on 127.0.0.1:5000" in out.stderr
        return
    probe.close()
    server = start_server([], home=tmp_path, log=tmp_path / "log")
    try:
        assert server.url == "http://127.0.0.1:5000"
        assert httpx.get(server.url + "/nix-cache-info").status_code == 200
        key = tmp_path / "data" / "nixcache" / "signing-key.secret"
        assert key.stat().st_mode & 0o777 == 0o600
        public = (tmp_path / "data" / "nixcache" / "signing-key.public").read_text().strip()
        assert httpx.get(server.url + "/pubkey").text.strip() == public
        assert (tmp_path / "data" / "nixcache" / "store" / "narinfo").is_dir()
    finally:
        server.stop()


def test_config_file_with_flag_overrides(tmp_path: Path) -> None:
    key_file, key = write_key(tmp_path)
    config = configmod.ServerConfig(
        listen="127.0.0.1:0", store=tmp_path / "store", signing_key_files=[key_file], priority=50
    )
    (tmp_path / "config.toml").write_text(configmod.dump(config))
    server = start_server(
        ["--config", str(tmp_path / "config.toml"), "--priority", "10"], tmp_path, tmp_path / "log"
    )
    try:
        info = httpx.get(server.url + "/nix-cache-info").text
        assert "Priority: 10\n" in info
        assert httpx.get(server.url + "/pubkey").text == f"{key.public()}\n"
    finally:
        server.stop()


def test_dump_load_round_trip_through_tomli_w_and_tomllib(tmp_path: Path) -> None:
    config = configmod.ServerConfig(
        listen="0.0.0.0:5000",
        store=Path('/var/lib/nixcache/"odd" \\ store'),  # quotes and a backslash: escaped by tomli-w
        signing_key_files=[Path("/etc/nixcache/a.secret"), Path("/etc/nixcache/b.secret")],
        push_token_file=Path("/etc/nixcache/push-token"),
        priority=20,
        max_upload_size=2 * 1024**3,
        accel_redirect_prefix="/_nar",
        gc_max_size=50 * 1024**3,
        gc_older_than=30 * 86400.0,
        gc_min_free=10 * 1024**3,
        gc_max_free=25 * 1024**3,
        nix_store=configmod.NixStoreConfig(serve_nix_store=True, state_dir=Path("/srv/nix/var/nix")),
    )
    text = configmod.dump(config)
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert configmod.load(path) == config
    data = tomllib.loads(text)
    # Sizes and durations are written as people write them, and read back exactly.
    assert (data["max_upload_size"], data["gc_max_size"], data["gc_older_than"]) == ("2G", "50G", "30d")
    assert data["store"] == '/var/lib/nixcache/"odd" \\ store'
    # Unset optional keys and tables are left out; the header points at the documentation.
    assert "read_token_file" not in data and "origin" not in data
    assert data["nix_store"]["state_dir"] == "/srv/nix/var/nix"
    assert text.startswith("# nixcache server configuration") and "docs/settings.md" in text
    # defaults round-trip too
    path.write_text(configmod.dump(configmod.ServerConfig()))
    assert configmod.load(path) == configmod.ServerConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('lisen = "127.0.0.1:5000"', "unknown key 'lisen'; did you mean 'listen'?"),
        ('listen = "localhost"', "'listen' is 'localhost'; give HOST:PORT"),
        ('listen = "127.0.0.1:\u00b2"', "give HOST:PORT"),
        ('priority = "high"', "'priority' is 'high'; give a whole number"),
        ('max_upload_size = "big"', "'max_upload_size' is 'big'; give a size such as 10G"),
        ("keepalive_timeout = 'forever'", "'keepalive_timeout' is 'forever'; give a duration such as 30d"),
        ('signing_key_files = "/etc/key"', "'signing_key_files' is '/etc/key'; give a list of file paths"),
        ('log_level = "loud"', "'log_level' is 'loud'; give one of debug, info, warning, error"),
        ("[nix_store]\nserve = true", "unknown key 'nix_store.serve'"),
        ('[nix_store]\nserve_nix_store = "yes"', "'nix_store.serve_nix_store' is 'yes'; give true or false"),
        ("listen = ", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text + "\n")
    with pytest.raises(configmod.ConfigError, match=message):
        configmod.load(path)
    out = serve_fails(["--config", str(path)], tmp_path)
    assert out.returncode == 1
    assert message in out.stderr and str(path) in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unreadable_signing_key_is_a_one_line_error(tmp_path: Path) -> None:
    out = serve_fails(
        ["--listen", "127.0.0.1:0", "--store", str(tmp_path / "s"), "--signing-key", "/nonexistent/k"],
        tmp_path,
    )
    assert out.returncode == 1
    assert "cannot read signing key /nonexistent/k" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_malformed_signing_key_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.secret"
    bad.write_text("name:not-base64!")
    out = serve_fails(
        ["--listen", "127.0.0.1:0", "--store", str(tmp_path / "s"), "--signing-key", str(bad)], tmp_path
    )
    assert out.returncode == 1
    assert f"signing key {bad} is malformed" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_port_taken_is_a_one_line_error(tmp_path: Path) -> None:
    key_file, _ = write_key(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = serve_fails(
            ["--listen", f"127.0.0.1:{port}", "--store", str(tmp_path / "s"), "--signing-key", str(key_file)],
            tmp_path,
        )
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "in use" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_missing_push_token_file_is_a_one_line_error(tmp_path: Path) -> None:
    key_file, _ = write_key(tmp_path)
    out = serve_fails(
        ["--listen", "127.0.0.1:0", "--store", str(tmp_path / "s"), "--signing-key", str(key_file),
         "--push-token-file", str(tmp_path / "nope")],
        tmp_path,
    )  # fmt: skip
    assert out.returncode == 1 and "push token file" in out.stderr
