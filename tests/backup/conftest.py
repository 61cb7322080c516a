"""Fixtures for backup tests: a real restic repository and configuration in a temp directory."""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import require
from prometheus_client.parser import text_string_to_metric_families

from nixcache.backup.config import BackupConfig, dump
from nixcache.cli import main


@dataclass
class BackupEnv:
    root: Path
    config: BackupConfig
    config_path: Path
    password: str

    def write_config(self, **changes) -> BackupConfig:
        """Re-render the config file with some values changed (through the one renderer, dump)."""
        self.config = BackupConfig(**{**self.config.__dict__, **changes})
        self.config_path.write_text(dump(self.config))
        return self.config

    def cli(self, *args: str) -> Result:
        result = CliRunner().invoke(main, ["backup", *args, "--config", str(self.config_path)])
        # The repository password must never be shown, whatever the command does.
        assert self.password not in result.output
        return result

    def metrics(self) -> dict[str, float]:
        text = Path(self.config.metrics_file).read_text()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@pytest.fixture
def backup_env(tmp_path: Path) -> BackupEnv:
    require(shutil.which("restic") is not None, "restic is not installed (apt-get install restic)")
    etc = tmp_path / "etc" / "nixcache"
    etc.mkdir(parents=True)
    (etc / "signing-key").write_text("cache-1:" + secrets.token_urlsafe(40))
    (etc / "config.toml").write_text('listen = "127.0.0.1:5000"\n')
    password = "pw-" + secrets.token_hex(16)
    password_file = tmp_path / "backup.password"
    password_file.write_text(password)
    password_file.chmod(0o600)
    config = BackupConfig(
        repository=str(tmp_path / "repo"),
        password_file=str(password_file),
        host="cache-test-1",
        config_dir=str(etc),
        store_dir=str(tmp_path / "store"),
        metrics_file=str(tmp_path / "textfile" / "nixcache_backup.prom"),
        state_file=str(tmp_path / "state" / "state.json"),
        cache_dir=str(tmp_path / "cache"),
        progress_seconds=1,
    )
    config_path = tmp_path / "backup.toml"
    config_path.write_text(dump(config))
    return BackupEnv(tmp_path, config, config_path, password)
