"""Backups, recovery and key rotation end to end on the shared lab, seen from outside.

lab1 is the cache, lab2 the backup repository host (deploys/backup.py with backup_store: an
append-only restic REST server, one credential per cache host) and, for the rotation, a Nix
client. The tests run in file order on one history: back up, find that lab1 can neither read
another host's repository nor delete its own snapshots, prune on lab2, restore, lose lab1 and
try to recover it from a repository of another host's snapshots and with the repository host
down (both must stop), recover it, rotate its key. Every deploy is the real `pyinfra` CLI.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import nixbuild

from nixcache import nixenv
from nixcache.backup.config import dump, parse
from nixcache.drill import CLOSURE_EXPR
from nixcache.keys import SecretKey

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
NIXCACHE = "/opt/nixcache/venv/bin/nixcache"
METRICS = "/var/lib/prometheus/node-exporter/nixcache_backup.prom"
CACHE, STORE_HOST = "lab1", "lab2"
STORE_PORT = 8000  # backup_store_port's default
ENV_FILE = "/etc/nixcache/backup.env"


class Ctx:
    """What the module's tests share: the lab, its addresses, secret refs and the pushed path."""

    def __init__(self, lab) -> None:
        self.lab = lab
        self.hosts = {h.name: h for h in lab.status()}
        self.secrets = Path(lab.state_dir) / "recovery-secrets"
        self.secrets.mkdir(mode=0o700, exist_ok=True)
        self.work = Path(lab.state_dir) / "recovery-work"
        self.work.mkdir(exist_ok=True)
        self.store_path = ""

    def ref(self, name: str) -> str:
        return f"file://{self.secrets / name}"

    def addr(self, name: str) -> str:
        return self.hosts[name].address

    def url(self) -> str:
        return f"http://{self.addr(CACHE)}:5000"

    def data(self, **extra: str) -> list[str]:
        values = {
            "signing_key_ref": self.ref("signing-key"),
            "signing_key_generate": "true",
            "push_token_ref": self.ref("push-token"),
            "push_token_generate": "true",
            "backup_repository": self.repository(),
            "backup_password_ref": self.ref("backup-password"),
            "backup_password_generate": "true",
            # One credential per host: "{host}" becomes the inventory name.
            "backup_credential_ref": self.ref("backup-credential-{host}"),
            "backup_credential_generate": "true",
            **extra,
        }
        return [arg for key, value in values.items() for arg in ("--data", f"{key}={value}")]

    def run_pyinfra(self, deploy: str, limit: str, **extra: str) -> tuple[int, str]:
        """The real `pyinfra` CLI with the module's data: (exit code, stdout and stderr)."""
        argv = [sys.executable, "-m", "pyinfra", "-y", "inventories/lab.py", deploy, "--limit", limit]
        done = subprocess.run(
            [*argv, *self.data(**extra)],
            cwd=REPO,
            env=self.lab.environ(),
            capture_output=True,
            text=True,
            timeout=900,
        )
        return done.returncode, done.stdout + done.stderr

    def pyinfra(self, deploy: str, limit: str, **extra: str) -> str:
        code, output = self.run_pyinfra(deploy, limit, **extra)
        assert code == 0, f"pyinfra {deploy} on {limit} failed:\n{output[-4000:]}"
        return output

    def repository(self, below: str = "", user: str = CACHE) -> str:
        """`user`'s repository on the repository host, or one `below` it (lab1 opens only /lab1/...)."""
        return f"rest:http://{self.addr(STORE_HOST)}:{STORE_PORT}/{user}/{below}"

    def env_for(self, repository: str, path: str, user: str = CACHE) -> None:
        """On lab1, an env file at `path` naming `repository` with lab1's credential as `user`.

        Made on the host from lab1's own backup.env, so the credential never crosses a command line.
        """
        location = repository.split("://", 1)[1].split("/", 1)[1]
        self.sh(
            CACHE,
            rf"sed 's|^RESTIC_REPOSITORY=rest:http://[^:]*:\([^@]*\)@\([^/]*\)/.*$"
            rf"|RESTIC_REPOSITORY=rest:http://{user}:\1@\2/{location}|' {ENV_FILE} > {path}"
            f" && chmod 600 {path}",
        )

    def restic_as_cache(self, env_file: str, args: str) -> tuple[int, str]:
        """Plain restic on lab1 with `env_file`'s repository and lab1's repository password."""
        command = (
            f"set -a && . {env_file} && set +a && RESTIC_PASSWORD_FILE=/etc/nixcache/backup.password"
            f" restic {args} 2>&1"
        )
        return self.lab.run(CACHE, ["sh", "-c", command], timeout=300)

    def credential(self, name: str = CACHE) -> str:
        return (self.secrets / f"backup-credential-{name}").read_text().strip()

    def backup_as(self, other: str, repository: str, *, store: bool) -> None:
        """On lab1, one snapshot recorded under another host's name `other`, into `repository`.

        lab1's backup.toml with host, repository and what it holds changed (through the one
        renderer, nixcache.backup.config.dump); its own run history and metrics are left alone.
        """
        config = dataclasses.replace(
            parse(self.sh(CACHE, "cat /etc/nixcache/backup.toml")),
            host=other,
            repository=repository,
            include_store=store,
            state_file=f"/root/{other}/state.json",
            metrics_file=f"/root/{other}/backup.prom",
        )
        path = f"/root/{other}.toml"
        env = f"/root/{other}-{abs(hash(repository))}.env"
        self.env_for(repository, env)
        config = dataclasses.replace(config, env_file=env)
        run = f"{NIXCACHE} backup run --config {path}"
        self.sh(CACHE, f"cat > {path} <<'EOF'\n{dump(config)}EOF\n{run}")

    def backup_timer(self) -> str:
        """The backup timer's LoadState on lab1: "not-found" when it was never installed."""
        return self.sh(CACHE, "systemctl show nixcache-backup.timer --property=LoadState").partition("=")[2]

    def stop(self, name: str, timeout: float = 90) -> None:
        """Power host `name` off; its root stays, so `lab.up` boots it again as a machine reboots."""
        self.lab.run(name, ["systemctl", "poweroff"], timeout=15)  # the session may end with it
        deadline = time.monotonic() + timeout
        while self.lab.host(name).state != "stopped":
            assert time.monotonic() < deadline, f"{name} still runs {timeout} s after poweroff"
            time.sleep(0.5)

    def sh(self, name: str, command: str, timeout: float = 600) -> str:
        code, out = self.lab.run(name, ["sh", "-c", command], timeout=timeout)
        assert code == 0, f"{name}: {command} exited {code}: {out}"
        return out

    def backup_now(self) -> None:
        """Start the timer's service through systemd, as the timer does; the journal on failure."""
        code, out = self.lab.run(CACHE, ["systemctl", "start", "nixcache-backup.service"], timeout=600)
        if code != 0:
            journal = self.lab.run(CACHE, ["journalctl", "-u", "nixcache-backup", "--no-pager", "-n25"])[1]
            pytest.fail(f"nixcache-backup.service failed on {CACHE}: {out}\n{journal}")

    def snapshot_ids(self) -> list[str]:
        """lab1's snapshots in its own repository, as its `nixcache backup list --json` reads them."""
        listing = json.loads(self.sh(CACHE, f"{NIXCACHE} backup list --json"))
        return [row["id"] for row in listing]

    def metrics(self) -> dict[str, float]:
        text = self.sh(CACHE, f"cat {METRICS}") + "\n"
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    def nix(self, args: list[str], home: str) -> subprocess.CompletedProcess[str]:
        return nixenv.run(["nix", *args], self.work / home)

    def fetch(self, trusted: str, name: str) -> subprocess.CompletedProcess[str]:
        """`nix copy --from` the cache into a fresh store, trusting only `trusted`."""
        return self.nix(
            ["copy", "--from", self.url(), "--to", str(self.work / name), self.store_path,
             "--option", "require-sigs", "true",
             "--option", "trusted-public-keys", trusted,
             "--option", "substituters", ""],
            home=f"home-{name}",
        )  # fmt: skip

    def public_key(self, ref_name: str) -> str:
        return str(SecretKey.parse((self.secrets / ref_name).read_text()).public())


@pytest.fixture(scope="module")
def ctx(lab) -> Ctx:
    """lab1 deployed with backups to lab2, a closure pushed to it with the real nix client."""
    c = Ctx(lab)
    c.pyinfra("deploys/backup.py", STORE_HOST, backup_store="true", backup_repository="")
    c.pyinfra("deploys/cache.py", CACHE)
    # the drill's two-path closure
    c.store_path = nixbuild.build(CLOSURE_EXPR.format(marker=uuid.uuid4().hex), c.work / "build")
    netrc = c.work / "netrc"
    token = (c.secrets / "push-token").read_text().strip()
    netrc.write_text(f"machine {c.addr(CACHE)} login ci password {token}\n")
    netrc.chmod(0o600)
    push = ["copy", "--to", c.url(), c.store_path, "--option", "netrc-file", str(netrc)]
    pushed = c.nix(push, home="home-push")
    assert pushed.returncode == 0, pushed.stderr
    return c


def test_timer_service_started_by_systemd_records_a_successful_backup(ctx: Ctx) -> None:
    timer = "nixcache-backup.timer"
    assert ctx.sh(CACHE, f"systemctl is-enabled {timer}; systemctl is-active {timer}") == "enabled\nactive"
    started = time.time()
    ctx.backup_now()
    metrics = ctx.metrics()
    assert metrics["nixcache_backup_last_run_success"] == 1.0
    assert metrics["nixcache_backup_last_success_timestamp_seconds"] >= started - 5
    assert metrics["nixcache_backup_snapshots"] >= 1
    assert metrics["nixcache_backup_bytes_added"] > 0
    journal = ctx.sh(CACHE, "journalctl -u nixcache-backup.service --no-pager -n 20")
    assert "nixcache backup ok" in journal


def test_failed_run_keeps_the_last_success_time(ctx: Ctx) -> None:
    before = ctx.metrics()["nixcache_backup_last_success_timestamp_seconds"]
    # The repository server is down for a moment: the run must fail visibly.
    ctx.sh(STORE_HOST, "systemctl stop nixcache-backup-store.service")
    try:
        code, _ = ctx.lab.run(CACHE, ["systemctl", "start", "nixcache-backup.service"], timeout=300)
    finally:
        ctx.sh(STORE_HOST, "systemctl start nixcache-backup-store.service")
    assert code != 0
    metrics = ctx.metrics()
    assert metrics["nixcache_backup_last_run_success"] == 0.0
    assert metrics["nixcache_backup_last_success_timestamp_seconds"] == before
    assert "FAILED" in ctx.sh(CACHE, "journalctl -u nixcache-backup.service --no-pager -n 5")


def test_the_credential_is_in_no_unit_log_or_output(ctx: Ctx) -> None:
    credential = ctx.credential()
    assert len(credential) >= 32
    assert ctx.sh(CACHE, f"stat -c '%a %U' {ENV_FILE}") == "600 root"
    assert "backup.env" in ctx.sh(CACHE, "grep env_file /etc/nixcache/backup.toml")
    for name in (CACHE, STORE_HOST):
        seen = ctx.sh(name, "journalctl --no-pager -o cat; systemctl cat 'nixcache-backup*'; ps -eo args")
        assert credential not in seen, f"{name} shows lab1's backup credential"
    # On the repository host only its hash, readable by the repository account alone.
    htpasswd = "/etc/nixcache-backup-store/htpasswd"
    assert ctx.sh(STORE_HOST, f"stat -c '%a %U' {htpasswd}") == "600 nixcache-backup"
    assert ctx.sh(STORE_HOST, f"grep -c '^{CACHE}:{{SHA}}' {htpasswd}") == "1"
    # Bound to the lab address only, reachable from the lab's hosts only.
    listening = ctx.sh(STORE_HOST, f"ss -Htln 'sport = :{STORE_PORT}' | awk '{{print $4}}'")
    assert listening == f"{ctx.addr(STORE_HOST)}:{STORE_PORT}"
    rules = ctx.sh(STORE_HOST, "nft list ruleset")
    assert f"{ctx.addr(CACHE)}" in rules and f"dport {STORE_PORT} accept" in rules


def test_a_cache_host_cannot_read_another_hosts_repository(ctx: Ctx) -> None:
    """lab9's repository sits beside lab1's, even under lab1's password: the server keeps lab1 out."""
    lab9 = "/srv/nixcache-backup/lab9"
    as_owner = (
        "runuser -u nixcache-backup -- env RESTIC_PASSWORD_FILE=/etc/nixcache-backup-store/lab1.password"
    )
    ctx.sh(STORE_HOST, f"rm -rf {lab9} && {as_owner} restic -q -r {lab9} init"
                       f" && {as_owner} restic -q -r {lab9} backup --host lab9 /etc/hostname")  # fmt: skip

    ctx.env_for(ctx.repository(user="lab9"), "/root/lab9.env")
    code, output = ctx.restic_as_cache("/root/lab9.env", "snapshots --no-lock")
    assert code != 0, output
    assert "403 Forbidden" in output, output
    # lab1's credential does not log in as lab9 either.
    ctx.env_for(ctx.repository(user="lab9"), "/root/as-lab9.env", user="lab9")
    code, output = ctx.restic_as_cache("/root/as-lab9.env", "snapshots --no-lock")
    assert code != 0 and "401 Unauthorized" in output, output

    # What an operator sees from nixcache: one line naming the cause and the fix.
    config = dataclasses.replace(
        parse(ctx.sh(CACHE, "cat /etc/nixcache/backup.toml")),
        repository=ctx.repository(user="lab9"),
        env_file="/root/lab9.env",
    )
    ctx.sh(CACHE, f"cat > /root/lab9.toml <<'EOF'\n{dump(config)}EOF")
    code, output = ctx.lab.run(CACHE, ["sh", "-c", f"{NIXCACHE} backup list --config /root/lab9.toml 2>&1"])
    assert code == 1, output
    assert "the repository server forbids this host to list snapshots there (HTTP 403)" in output, output
    ctx.sh(STORE_HOST, f"rm -rf {lab9}")


def test_a_cache_host_cannot_delete_or_rewrite_its_own_snapshots(ctx: Ctx) -> None:
    before = ctx.snapshot_ids()
    assert before
    code, output = ctx.restic_as_cache(ENV_FILE, f"forget {before[0]}")
    assert code != 0, output
    assert "403 Forbidden" in output, output
    # Nor overwrite one: the server refuses a write to an existing file.
    curlrc = "/root/curlrc"
    ctx.sh(
        CACHE,
        rf"sed -n 's|^RESTIC_REPOSITORY=rest:http://\([^@]*\)@.*|user = \"\1\"|p' {ENV_FILE} > {curlrc}",
    )
    url = f"{ctx.repository()}snapshots/{before[0]}".removeprefix("rest:")
    status = ctx.sh(
        CACHE, f"curl -s -o /dev/null -w '%{{http_code}}' -K {curlrc} --data-binary @/etc/hostname {url}"
    )
    ctx.sh(CACHE, f"rm -f {curlrc}")
    assert status == "403"
    assert ctx.snapshot_ids() == before
    # And its backups still go through (the previous test's failed run is behind us).
    ctx.backup_now()
    assert len(ctx.snapshot_ids()) == len(before) + 1


def test_retention_runs_on_the_repository_host(ctx: Ctx) -> None:
    keep = {"backup_keep_daily": "1", "backup_keep_weekly": "0", "backup_keep_monthly": "0"}
    store = {"backup_store": "true", "backup_repository": ""}
    ctx.pyinfra("deploys/backup.py", STORE_HOST, **store, **keep)
    assert "keep_daily = 1" in ctx.sh(STORE_HOST, "cat /etc/nixcache-backup-store/lab1.toml")
    ctx.backup_now()
    # The cache host removed nothing: it cannot, and its runs no longer try.
    assert len(ctx.snapshot_ids()) >= 2
    assert "retention by the repository host" in ctx.sh(
        CACHE, "journalctl -u nixcache-backup.service --no-pager -n 5 -o cat"
    )
    ctx.sh(STORE_HOST, "systemctl start nixcache-backup-prune.service")
    # One snapshot per day is kept: all of today's runs collapse into the newest.
    assert len(ctx.snapshot_ids()) == 1
    journal = ctx.sh(STORE_HOST, "journalctl -u nixcache-backup-prune.service --no-pager -o cat -n 5")
    assert re.search(r"host lab1: [1-9]\d* snapshots removed, 1 kept", journal), journal
    ctx.pyinfra("deploys/backup.py", STORE_HOST, **store)  # back to the defaults
    assert "keep_daily = 7" in ctx.sh(STORE_HOST, "cat /etc/nixcache-backup-store/lab1.toml")
    again = ctx.pyinfra("deploys/backup.py", STORE_HOST, **store)
    assert re.search(r"Grand total\s+\d+\s+-\s+-\s+\d+", again), again[-2000:]  # nothing changed
    assert ctx.sh(STORE_HOST, "systemctl is-enabled nixcache-backup-prune.timer") == "enabled"


def test_restore_into_a_directory_gives_back_key_and_store(ctx: Ctx) -> None:
    ctx.sh(CACHE, f"rm -rf /tmp/restored && {NIXCACHE} backup restore --target /tmp/restored")
    key = "/etc/nixcache/signing-key"
    same_key = ctx.sh(CACHE, f"cmp {key} /tmp/restored{key} && echo same")
    assert same_key == "same"
    hash_part = Path(ctx.store_path).name[:32]
    ctx.sh(CACHE, f"test -s /tmp/restored/var/lib/nixcache/store/narinfo/{hash_part}.narinfo")


def test_recover_from_other_hosts_snapshots_only_starts_empty_only_with_the_data_key(ctx: Ctx) -> None:
    shared = ctx.repository("shared/")
    ctx.backup_as("lab9", shared, store=True)
    # For the next tests: lab1's own repository's newest snapshot is another host's, without store.
    ctx.backup_as("lab9", ctx.repository(), store=False)
    ctx.lab.reset(CACHE)

    code, output = ctx.run_pyinfra(
        "deploys/recover.py", CACHE, signing_key_generate="false", backup_repository=shared
    )
    assert code != 0, output[-3000:]
    refusal = (
        f"{CACHE}: recover stopped before the restore: backup repository {shared} holds no snapshot"
        f" of {CACHE}, only of lab9; fix backup_repository"
    )
    assert refusal in output, output[-3000:]
    assert "set recover_allow_empty = True in its host data" in output
    assert ctx.backup_timer() == "not-found"

    output = ctx.pyinfra(
        "deploys/recover.py",
        CACHE,
        signing_key_generate="false",
        backup_repository=shared,
        recover_allow_empty="true",
    )
    assert "starting with an empty store, as recover_allow_empty = True says" in output, output[-3000:]
    hash_part = Path(ctx.store_path).name[:32]
    assert ctx.sh(CACHE, f"curl -s -o /dev/null -w '%{{http_code}}' {ctx.url()}/{hash_part}.narinfo") == "404"
    assert ctx.sh(CACHE, f"curl -s {ctx.url()}/pubkey").split() == [ctx.public_key("signing-key")]
    assert ctx.backup_timer() == "loaded"


def test_recover_with_the_repository_host_stopped_fails_and_installs_no_timer(ctx: Ctx) -> None:
    ctx.lab.reset(CACHE)
    ctx.stop(STORE_HOST)
    try:
        code, output = ctx.run_pyinfra("deploys/recover.py", CACHE, signing_key_generate="false")
    finally:
        ctx.lab.up(len(ctx.hosts))
    assert code != 0, output[-3000:]
    failure = (
        f"{CACHE}: recover stopped before the restore: backup repository {ctx.repository()} cannot be read: "
    )
    assert failure in output, output[-3000:]
    line = next(line for line in output.splitlines() if failure in line)
    assert "cannot be read: cannot reach it (" in line, line
    assert "then run deploys/recover.py again; nothing was restored and no backup timer was installed" in line
    assert (ctx.secrets / "backup-password").read_text().strip() not in output
    assert ctx.credential() not in output
    assert ctx.backup_timer() == "not-found"
    assert ctx.sh(CACHE, "ls -A /var/lib/nixcache/store/narinfo 2>/dev/null | wc -l") == "0"


def test_recover_after_lab_reset_serves_the_closure_with_the_same_key(ctx: Ctx) -> None:
    """Restores lab1's own latest snapshot, not the newer one recorded under lab9 (which has no store)."""
    original = ctx.public_key("signing-key")
    ctx.lab.reset(CACHE)
    code, _ = ctx.lab.run(CACHE, ["test", "-e", "/etc/nixcache"])
    assert code != 0, "lab reset left /etc/nixcache behind"
    output = ctx.pyinfra("deploys/recover.py", CACHE, signing_key_generate="false")
    restored = r"Restore /etc/nixcache and the store from the latest snapshot\s+1\s+1\s"
    assert re.search(restored, output), output[-3000:]
    fetched = ctx.fetch(original, "after-recovery")
    assert fetched.returncode == 0, fetched.stderr
    assert (ctx.work / "after-recovery" / ctx.store_path.lstrip("/")).exists()
    wrong = ctx.fetch(str(SecretKey.generate(original.split(":")[0]).public()), "wrong-key")
    assert wrong.returncode != 0 and "signature" in wrong.stderr


def test_recover_refuses_to_mint_a_key_the_store_does_not_hold(ctx: Ctx) -> None:
    code, output = ctx.run_pyinfra("deploys/recover.py", CACHE, signing_key_ref=ctx.ref("no-such-key"))
    assert code != 0
    assert "recover, step key" in output
    assert not (ctx.secrets / "no-such-key").exists()


def test_one_full_rotation(ctx: Ctx) -> None:
    old, hash_part = ctx.public_key("signing-key"), Path(ctx.store_path).name[:32]
    rotation = {"signing_key_next_ref": ctx.ref("signing-key-next")}
    client = {"client_cache_group": "lab", **rotation}
    conf = "grep trusted-public-keys /etc/nix/nixcache.conf"

    ctx.pyinfra("deploys/rotate_key.py", CACHE, **rotation)
    new = ctx.public_key("signing-key-next")
    ctx.pyinfra("deploys/rotate_key.py", STORE_HOST, **client)
    served = ctx.sh(CACHE, f"curl -s {ctx.url()}/pubkey").split()
    assert served == [old, new]
    narinfo = ctx.sh(CACHE, f"curl -s {ctx.url()}/{hash_part}.narinfo")
    assert [line.split(":")[1].strip() for line in narinfo.splitlines() if line.startswith("Sig:")] == [
        old.split(":")[0],
        new.split(":")[0],
    ]
    assert ctx.sh(STORE_HOST, conf).split()[2:] == [old, new]
    again = ctx.pyinfra("deploys/rotate_key.py", CACHE, **rotation)
    assert re.search(r"Grand total\s+\d+\s+-\s+-\s+\d+", again), again[-2000:]

    ctx.pyinfra("deploys/rotate_key.py", CACHE, rotate_phase="retire", **rotation)
    ctx.pyinfra("deploys/rotate_key.py", STORE_HOST, rotate_phase="retire", **client)
    assert ctx.sh(CACHE, f"curl -s {ctx.url()}/pubkey").split() == [new]
    narinfo = ctx.sh(CACHE, f"curl -s {ctx.url()}/{hash_part}.narinfo")
    sigs = [line for line in narinfo.splitlines() if line.startswith("Sig:")]
    assert len(sigs) == 1
    assert sigs[0].startswith(f"Sig: {new.split(':')[0]}:")
    assert ctx.sh(STORE_HOST, conf).split()[2:] == [new]
    assert ctx.fetch(new, "new-key").returncode == 0
    only_old = ctx.fetch(old, "old-key")
    assert only_old.returncode != 0 and "signature" in only_old.stderr
