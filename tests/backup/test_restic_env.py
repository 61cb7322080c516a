"""What restic is given: the configured repository and password file only, credentials never shown."""

from __future__ import annotations

import socket

from nixcache.backup.config import BackupConfig
from nixcache.backup.restic import Restic, read_env_file


def test_inherited_restic_variables_cannot_redirect_the_backup(backup_env, monkeypatch, tmp_path):
    monkeypatch.setenv("RESTIC_PASSWORD", "an-operator's-shell-password")
    monkeypatch.setenv("RESTIC_REPOSITORY", str(tmp_path / "elsewhere"))
    result = backup_env.cli("run")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "elsewhere").exists()
    monkeypatch.delenv("RESTIC_PASSWORD")
    monkeypatch.delenv("RESTIC_REPOSITORY")
    assert len(Restic(backup_env.config).snapshots()) == 1


def test_credentials_in_a_rest_url_are_never_printed(backup_env):
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backup_env.write_config(repository=f"rest:http://backup:s3cr3t-rest@127.0.0.1:{port}/cache")
    result = backup_env.cli("run")
    assert result.exit_code == 1
    assert "s3cr3t-rest" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert f"backup repository rest:http://backup:***@127.0.0.1:{port}/cache: cannot reach it" in last
    assert "connection refused" in last


def test_a_broken_env_file_is_named_without_its_values(backup_env):
    env_file = backup_env.root / "backup.env"
    env_file.write_text("AWS_ACCESS_KEY_ID=AKIAEXAMPLE\nAWS_SECRET_ACCESS_KEY wJalrXUtnFEMIK7MDENG\n")
    env_file.chmod(0o600)
    backup_env.write_config(env_file=str(env_file))
    result = backup_env.cli("run")
    assert result.exit_code == 1
    assert f"env file {env_file} line 2 is not KEY=VALUE" in result.stderr
    assert "wJalrXUtnFEMIK7MDENG" not in result.output and "AKIAEXAMPLE" not in result.output
    assert backup_env.metrics()["nixcache_backup_last_run_success"] == 0


def test_env_file_syntax(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text(
        "# s3 credentials\n\nexport AWS_ACCESS_KEY_ID=AKIA1\n"
        "AWS_SECRET_ACCESS_KEY='a b=c'\nAWS_DEFAULT_REGION=\"eu\"\n"
    )
    assert read_env_file(env_file) == {
        "AWS_ACCESS_KEY_ID": "AKIA1",
        "AWS_SECRET_ACCESS_KEY": "a b=c",
        "AWS_DEFAULT_REGION": "eu",
    }


def test_ssh_failures_of_an_sftp_repository_say_what_to_fix():
    restic = Restic(BackupConfig(repository="sftp:backup@10.231.9.2:/srv/nixcache-backup/cache-1"))
    # restic 0.14's words when ssh cannot get in.
    stderr = (
        "subprocess ssh: backup@10.231.9.2: Permission denied (publickey).\n"
        "Fatal: unable to open repository at sftp:backup@10.231.9.2:/srv/nixcache-backup/cache-1:"
        " unable to start the sftp session, error: EOF\n"
    )
    error = restic.explain(stderr, 1, "open the repository")
    assert str(error) == (
        "backup repository sftp:backup@10.231.9.2:/srv/nixcache-backup/cache-1: ssh to the repository host"
        " failed (backup@10.231.9.2: Permission denied (publickey).);"
        " install root's ssh public key for that user on the repository host"
    )
    error = restic.explain("subprocess ssh: Host key verification failed.\nFatal: unable to open", 1, "x")
    assert "add the repository host's key to root's known_hosts" in str(error)
