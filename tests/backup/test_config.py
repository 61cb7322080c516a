"""backup.toml: rendered by `dump`, read by `load`, and refused with a clear line when wrong."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest
from click.testing import CliRunner

from nixcache.backup.config import BackupConfig, ConfigError, dump, load, parse
from nixcache.cli import main

FULL = BackupConfig(
    repository='sftp:backup@10.0.0.2:/srv/backups/cache "eu"',
    password_file="/etc/nixcache/backup.password",
    env_file="/etc/nixcache/backup.env",
    host="cache-eu-1",
    include_store=True,
    store_dir="/cas/store",
    extra_paths=["/etc/nginx"],
    exclude=["*.tmp", "/cas/store/.incoming"],
    keep_daily=3,
    keep_weekly=2,
    keep_monthly=0,
    check_every_days=0,
    check_read_data_subset="5%",
)


def test_dump_round_trips_through_tomllib_and_names_its_documentation(tmp_path):
    text = dump(FULL)
    path = tmp_path / "backup.toml"
    path.write_text(text)
    assert load(path) == FULL
    assert tomllib.loads(text)["repository"] == FULL.repository  # quotes escaped by tomli-w
    assert text.startswith("# nixcache backup configuration") and "docs/settings.md" in text
    assert set(tomllib.loads(text)) == {f.name for f in dataclasses.fields(BackupConfig)}


def test_defaults_and_paths():
    config = parse('repository = "/srv/restic"\n')
    assert config.password_file == "/etc/nixcache/backup.password"
    assert config.metrics_file == "/var/lib/prometheus/node-exporter/nixcache_backup.prom"
    assert (config.keep_daily, config.keep_weekly, config.keep_monthly, config.check_every_days) == (
        7,
        4,
        6,
        7,
    )
    assert config.backup_paths() == ["/etc/nixcache"]
    assert FULL.backup_paths() == ["/etc/nixcache", "/cas/store", "/etc/nginx"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "'repository' is required; give an absolute path or an sftp:"),
        ('repository = "/r"\nkeep_dayly = 3\n', "unknown key 'keep_dayly'; did you mean 'keep_daily'?"),
        ('repository = "/r"\nkeep_daily = "3"\n', "'keep_daily' is '3'; give a whole number of at least 0"),
        ('repository = "/r"\ninclude_store = 1\n', "'include_store' is 1; give true or false"),
        ('repository = "relative/repo"\n', "'repository' is 'relative/repo'; give an absolute path or"),
        ('repository = "/r"\npassword_file = "pw"\n', "'password_file' is 'pw'; give an absolute path"),
        (
            'repository = "/r"\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n',
            "are all 0 (restic would keep everything); set at least keep_daily",
        ),
        ("repository = ", "not valid TOML"),
    ],
)
def test_bad_files_are_refused_naming_the_key(text, message):
    with pytest.raises(ConfigError, match=None) as caught:
        parse(text, "/etc/nixcache/backup.toml")
    assert str(caught.value).startswith("/etc/nixcache/backup.toml: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_cli_exits_78_on_a_missing_or_bad_config(tmp_path):
    missing = tmp_path / "absent.toml"
    result = CliRunner().invoke(main, ["backup", "run", "--config", str(missing)])
    assert result.exit_code == 78
    assert (
        result.stderr.strip()
        == f"Error: {missing} does not exist; deploy the backup configuration or pass --config"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('repository = "/r"\nwhat = 1\n')
    result = CliRunner().invoke(main, ["backup", "list", "--config", str(bad)])
    assert result.exit_code == 78
    known = "known keys: apply_retention, cache_dir, check_every_days"
    assert f"bad.toml: unknown key 'what'; {known}" in result.stderr


def test_excludes_always_leave_out_the_store_uploads_signed_narinfos_and_quarantine_once():
    assert FULL.excludes() == [
        "*.tmp",
        "/cas/store/.incoming",
        "/cas/store/tmp",
        "/cas/store/signed",
        "/cas/store/quarantine",
    ]
    deployed = dataclasses.replace(FULL, exclude=["/cas/store/tmp", "/cas/store/signed"])
    assert deployed.excludes() == ["/cas/store/tmp", "/cas/store/signed", "/cas/store/quarantine"]
    assert dataclasses.replace(FULL, include_store=False).excludes() == ["*.tmp", "/cas/store/.incoming"]
