"""A cache host against the repository host's server: real restic and a real `rclone serve restic`.

The server runs on loopback exactly as the repository host's unit runs it (append-only, private
repositories, the htpasswd the deploy renders); each host's credential reaches restic only
through its env file. What a host sees: its own backups work, another host's repository and
deleting its own snapshots do not, and the retention runs where the repositories lie.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import require

from nixcache.backup.config import BackupConfig, dump, parse
from nixcache.backup.restic import Restic
from nixcache.cli import main
from operations.backup import render_htpasswd, rest_url_with_credential


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, root: Path, credentials: dict[str, str]) -> None:
        self.credentials = credentials
        self.data = root / "repositories"
        self.data.mkdir()
        htpasswd = root / "htpasswd"
        htpasswd.write_text(render_htpasswd(credentials))
        self.port = _free_port()
        self.url = f"rest:http://127.0.0.1:{self.port}"
        argv = ["rclone", "serve", "restic", "--config", "/dev/null", "--addr", f"127.0.0.1:{self.port}",
                "--append-only", "--private-repos", "--htpasswd", str(htpasswd), "--cache-objects=false",
                str(self.data)]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "rclone serve restic did not start listening"
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    require(shutil.which("rclone") is not None, "rclone is not installed (apt-get install rclone)")
    require(shutil.which("restic") is not None, "restic is not installed (apt-get install restic)")
    credentials = {name: secrets.token_urlsafe(32) for name in ("cache-1", "cache-2")}
    started = Server(tmp_path, credentials)
    yield started
    started.stop()


def host_config(tmp_path: Path, server: Server, host: str, repository_of: str | None = None) -> Path:
    """`host`'s backup.toml and env file as the deploy writes them (its repository, or another's)."""
    root = tmp_path / host
    etc = root / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "signing-key").write_text(f"{host}:" + secrets.token_urlsafe(40))
    password = root / "backup.password"
    password.write_text("pw-" + host)
    password.chmod(0o600)
    repository = f"{server.url}/{repository_of or host}/"
    env_file = root / "backup.env"
    credentialed = rest_url_with_credential(repository, host, server.credentials[host])
    env_file.write_text(f"RESTIC_REPOSITORY={credentialed}\n")
    env_file.chmod(0o600)
    config = BackupConfig(
        repository=repository,
        password_file=str(password),
        env_file=str(env_file),
        host=host,
        config_dir=str(etc),
        apply_retention=False,
        keep_daily=1,
        keep_weekly=0,
        keep_monthly=0,
        metrics_file=str(root / "textfile" / "nixcache_backup.prom"),
        state_file=str(root / "state" / "state.json"),
        cache_dir=str(root / "cache"),
    )
    path = root / f"backup-{repository_of or host}.toml"
    path.write_text(dump(config))
    return path


def cli(*args: str):
    return CliRunner().invoke(main, ["backup", *args])


def test_a_host_backs_up_to_its_own_repository_and_nothing_else(tmp_path, server) -> None:
    mine = host_config(tmp_path, server, "cache-1")
    for _ in range(2):
        result = cli("run", "--config", str(mine))
        assert result.exit_code == 0, result.output
    assert "2 snapshots (retention by the repository host)" in result.stdout
    assert server.credentials["cache-1"] not in result.output

    host_config(tmp_path, server, "cache-2")
    theirs = host_config(tmp_path, server, "cache-1", repository_of="cache-2")
    result = cli("list", "--config", str(theirs))
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith(
        "the repository server forbids this host to list snapshots there (HTTP 403): a host may open"
        " only its own repository, /<its inventory name>/; point 'repository' at this host's own repository"
    ), last
    assert not (server.data / "cache-2").exists()


def test_a_wrong_credential_is_named_not_shown(tmp_path, server) -> None:
    config = host_config(tmp_path, server, "cache-1")
    env_file = tmp_path / "cache-1" / "backup.env"
    wrong = rest_url_with_credential(f"{server.url}/cache-1/", "cache-1", "x" * 40)
    env_file.write_text(f"RESTIC_REPOSITORY={wrong}\n")
    result = cli("run", "--config", str(config))
    assert result.exit_code == 1
    assert "x" * 40 not in result.output
    assert "the repository server does not accept this host's credential (HTTP 401)" in result.stderr


def test_an_env_file_naming_another_repository_is_refused(tmp_path, server) -> None:
    config = host_config(tmp_path, server, "cache-1")
    env_file = tmp_path / "cache-1" / "backup.env"
    other = rest_url_with_credential(f"{server.url}/cache-1/other/", "cache-1", server.credentials["cache-1"])
    env_file.write_text(f"RESTIC_REPOSITORY={other}\n")
    result = cli("run", "--config", str(config))
    assert result.exit_code == 1
    assert (
        f"sets RESTIC_REPOSITORY to {server.url}/cache-1/other/, not the configured repository"
        in result.stderr
    )
    assert server.credentials["cache-1"] not in result.output


def test_retention_runs_where_the_repositories_lie(tmp_path, server) -> None:
    config_path = host_config(tmp_path, server, "cache-1")
    assert cli("run", "--config", str(config_path)).exit_code == 0
    config = parse(config_path.read_text())
    restic = Restic(config)
    # An older snapshot, as yesterday's run would have left it.
    yesterday = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 86400))
    restic.backup([config.config_dir], lambda _: None, time=yesterday)
    assert cli("run", "--config", str(config_path)).exit_code == 0
    assert len(restic.snapshots()) == 3

    # (Deleting through the server is refused: tests/recovery/test_recovery_lab.py shows it; restic
    # retries a refused delete for about 45 s, too slow for this file.)
    # The repository host's view: the directory itself, as nixcache-backup-prune runs it.
    local = tmp_path / "prune.toml"
    local.write_text(
        dump(
            BackupConfig(
                **{
                    **config.__dict__,
                    "repository": str(server.data / "cache-1"),
                    "env_file": "",
                    "apply_retention": True,
                }
            )
        )
    )
    missing = tmp_path / "never.toml"
    missing.write_text(
        dump(BackupConfig(**{**config.__dict__, "repository": str(tmp_path / "none"), "env_file": ""}))
    )
    result = cli("forget", "--config", str(local), "--config", str(missing))
    assert result.exit_code == 0, result.output
    assert "host cache-1: 2 snapshots removed, 1 kept" in result.stdout
    assert "no repository yet (host cache-1 never backed up); nothing to do" in result.stdout
    # The server, with no object cache, sees what the retention left.
    assert len(restic.snapshots()) == 1
    assert cli("run", "--config", str(config_path)).exit_code == 0
