"""`nixcache drill`: a disaster-recovery drill on the lab that proves backups and recovery work.

Phases, each timed:
  up        two lab hosts: the cache, and the backup repository host (append-only REST server)
  deploy    deploys/backup.py on the repository host, deploys/cache.py on the cache
  push      build a small closure with the real `nix` and `nix copy --to` it (push token in a netrc)
  backup    `systemctl start nixcache-backup.service` on the cache, then its metric file
  reset     `nixcache lab reset` of the cache host: a blank Debian in its place
  recover   deploys/recover.py on the replacement
  verify    `nix copy --from` into a fresh store with require-sigs and the original public key
The last line is `recovery time: <seconds> s`, from the reset to verified service.
Exit status: 0 when every phase passed, 1 naming the failed phase otherwise.

`--scenario region-loss` (issue 12): the second host also runs the environment's S3 origin
(deploys/origin.py), the cache writes pushes through to it, and the backup holds only keys and
configuration (backup_include_store=false). After the reset and deploys/recover.py the region's
store is empty, so the verified path is pulled through from the origin (its /metrics must show
the origin hit).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
from prometheus_client.parser import text_string_to_metric_families

from nixcache import nixenv
from nixcache.keys import SecretKey
from nixcache.lab import state as lab_state
from nixcache.lab.ssh import ssh_argv
from nixcache.secrets import resolve

REPO_ROOT = Path(__file__).resolve().parent.parent
METRICS_FILE = "/var/lib/prometheus/node-exporter/nixcache_backup.prom"
SUCCESS_METRIC = "nixcache_backup_last_success_timestamp_seconds"
SCENARIOS = ("host-loss", "region-loss")


class PhaseError(Exception):
    """A phase failed; the message says what was expected and what was seen."""


@dataclass
class Phase:
    name: str
    run: Callable[[], None]
    seconds: float | None = None


@dataclass
class PhaseRunner:
    """Runs phases in order, timing each; stops at the first failure."""

    echo: Callable[[str], None] = print
    phases: list[Phase] = field(default_factory=list)
    failed: str | None = None

    def add(self, name: str, run: Callable[[], None]) -> None:
        self.phases.append(Phase(name, run))

    def run(self) -> bool:
        """True when every phase passed; each phase's duration is printed as it ends."""
        for phase in self.phases:
            start = time.monotonic()
            try:
                phase.run()
            except (PhaseError, subprocess.SubprocessError, OSError) as error:
                phase.seconds = time.monotonic() - start
                self.failed = phase.name
                self.echo(f"phase {phase.name}: FAILED after {phase.seconds:.1f} s: {error}")
                return False
            phase.seconds = time.monotonic() - start
            self.echo(f"phase {phase.name}: {phase.seconds:.1f} s")
        return True

    def seconds(self, *names: str) -> float:
        """The summed duration of the named phases."""
        return sum(p.seconds or 0.0 for p in self.phases if p.name in names)


def run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    what: str,
    log: Path | None = None,
) -> str:
    """Run a command; PhaseError with its last output lines when it fails. `log` keeps its output."""
    try:
        done = subprocess.run(
            argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise PhaseError(f"{what} did not finish within {timeout:.0f} s: {shlex.join(argv[:4])} …") from None
    if log is not None:
        with log.open("a") as handle:
            handle.write(f"$ {shlex.join(argv)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise PhaseError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


CLOSURE_EXPR = """\
let
  dep = derivation {{
    name = "nixcache-drill-dep";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo {marker} > $out" ];
  }};
in derivation {{
  name = "nixcache-drill";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo ${{dep}} {marker} > $out" ];
}}
"""


class Drill:
    """The drill's state between phases."""

    def __init__(self, lab_dir: Path, echo: Callable[[str], None], scenario: str = "host-loss") -> None:
        self.scenario = scenario
        self.lab_dir = lab_dir
        self.work = lab_dir / "drill"
        self.echo = echo
        self.env = dict(os.environ, NIXCACHE_LAB_DIR=str(lab_dir))
        self.secrets = lab_dir / "drill-secrets"
        self.hosts: list[dict] = []
        self.store_path = ""
        self.public_key = ""

    # --- the lab's hosts, the drill's secrets, commands -----------------------------------
    @property
    def cache(self) -> dict:
        return self.hosts[0]

    @property
    def repo_host(self) -> dict:
        return self.hosts[1]

    def url(self) -> str:
        return f"http://{self.cache['address']}:5000"

    def ref(self, name: str) -> str:
        return f"file://{self.secrets / name}"

    def data(self) -> list[str]:
        """Host data of the drill's deploys: its own secrets, the append-only repository on host 2."""
        # "{host}" becomes each host's inventory name (deploys/parts/backup.py).
        repo = f"rest:http://{self.repo_host['address']}:8000/{{host}}/"
        values = {
            "signing_key_ref": self.ref("signing-key"),
            "signing_key_generate": "true",
            "push_token_ref": self.ref("push-token"),
            "push_token_generate": "true",
            "backup_repository": repo,
            "backup_password_ref": self.ref("backup-password"),
            "backup_password_generate": "true",
            "backup_credential_ref": self.ref("backup-credential-{host}"),
            "backup_credential_generate": "true",
            "backup_include_store": "true",
        }
        if self.scenario == "region-loss":
            # The origin on the repository host ($NIXCACHE_LAB_ORIGIN, set in `up`: the lab's
            # group data points the cache at it); the backup keeps keys and config only.
            values["backup_include_store"] = "false"
            if self.store_path:
                values["recover_probe_path"] = self.store_path
        argv: list[str] = []
        for key, value in values.items():
            argv += ["--data", f"{key}={value}"]
        return argv

    def pyinfra(self, deploy: str, limit: str, *extra: str, timeout: float = 900) -> None:
        argv = ["pyinfra", "-y", "inventories/lab.py", deploy, "--limit", limit, *self.data(), *extra]
        log = self.work / f"pyinfra-{Path(deploy).stem}-{limit}.log"
        run(argv, env=self.env, timeout=timeout, what=f"pyinfra {deploy} on {limit} (log: {log})", log=log)

    def ssh(self, host: dict, command: str, timeout: float = 600) -> str:
        # The host keys change with the reset phase: trust none from an earlier phase.
        login = ssh_argv(
            Path(host["ssh_key"]), host["address"], host["ssh_port"], Path("/dev/null"), host["ssh_user"]
        )
        return run([*login, "--", command], timeout=timeout, what=f"ssh {host['name']}: {command}")

    def lab_status(self) -> None:
        argv = ["nixcache", "lab", "status", "--json"]
        self.hosts = json.loads(run(argv, env=self.env, timeout=60, what="nixcache lab status"))

    # --- phases ---------------------------------------------------------------------------
    def up(self) -> None:
        self.secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.work.mkdir(parents=True, exist_ok=True)
        run(["nixcache", "lab", "up", "--hosts", "2"], env=self.env, timeout=900, what="nixcache lab up")
        self.lab_status()
        if len(self.hosts) < 2:
            raise PhaseError(f"the lab has {len(self.hosts)} host(s), the drill needs 2")
        # Which host the lab's inventory puts in group `origin`: none for host-loss (the store
        # comes back from the backup), the repository host for region-loss (it survives).
        self.env[lab_state.ORIGIN_ENV] = self.repo_host["name"] if self.scenario == "region-loss" else ""
        for host in self.hosts:
            self.wait_for_ssh(host)

    def wait_for_ssh(self, host: dict, attempts: int = 30) -> None:
        """sshd of a just-booted host may accept connections before it answers them: retry briefly."""
        for attempt in range(attempts):
            try:
                self.ssh(host, "true", timeout=15)
                return
            except PhaseError:
                if attempt == attempts - 1:
                    raise
                time.sleep(1)

    def deploy(self) -> None:
        # The repository host only receives backups (no backup_repository of its own).
        store = ("--data", "backup_store=true", "--data", "backup_repository=")
        self.pyinfra("deploys/backup.py", self.repo_host["name"], *store)
        if self.scenario == "region-loss":
            self.pyinfra("deploys/origin.py", self.repo_host["name"], *store)
        self.pyinfra("deploys/cache.py", self.cache["name"])
        self.public_key = str(SecretKey.parse(resolve(self.ref("signing-key"))).public())
        self.echo(f"  cache {self.cache['name']} at {self.url()} signs as {self.public_key.split(':')[0]}")

    def push(self) -> None:
        try:
            self.store_path = nixenv.build(CLOSURE_EXPR.format(marker=uuid.uuid4().hex), self.work)
        except nixenv.BuildError as error:
            raise PhaseError(f"{error}; check that nix-bin is installed (apt-get install nix-bin)") from None
        netrc = self.work / "netrc"
        fd = os.open(netrc, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            token = resolve(self.ref("push-token"))
            handle.write(f"machine {self.cache['address']} login nixcache password {token}\n")
        self.nix(
            ["copy", "--to", self.url(), self.store_path, "--option", "netrc-file", str(netrc)],
            home="home-push",
            what=f"nix copy --to {self.url()}",
        )
        self.echo(f"  pushed {self.store_path} and its dependency")

    def backup(self) -> None:
        try:
            self.ssh(self.cache, "systemctl start nixcache-backup.service", timeout=600)
        except PhaseError:
            # One retry, said out loud: a dropped connection fails a run, the next one resumes.
            self.echo("  backup run failed (journalctl -u nixcache-backup on the cache); retrying once")
            self.ssh(self.cache, "systemctl start nixcache-backup.service", timeout=600)
        metrics = self.ssh(self.cache, f"cat {METRICS_FILE}")
        values = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
        success = values.get(SUCCESS_METRIC, 0)
        if time.time() - success > 600:
            raise PhaseError(f"{METRICS_FILE} on {self.cache['name']} shows no success in the last 10 min")
        self.echo(f"  backup done, {SUCCESS_METRIC} = {success:.0f}")

    def reset(self) -> None:
        argv = ["nixcache", "lab", "reset", self.cache["name"]]
        run(argv, env=self.env, timeout=600, what="nixcache lab reset")
        self.lab_status()
        self.wait_for_ssh(self.cache)

    def recover(self) -> None:
        self.pyinfra("deploys/recover.py", self.cache["name"])

    def nix(self, args: list[str], home: str, what: str) -> None:
        """Run `nix` with its own HOME: Nix caches narinfos per user, and the narinfo cached while
        pushing (unsigned) would otherwise stand in for the one the server now serves."""
        run(["nix", *args], env=nixenv.environ(self.work / home), timeout=300, what=what)

    def verify(self) -> None:
        fresh = Path(tempfile.mkdtemp(prefix="store-", dir=self.work))
        self.nix(
            ["copy", "--from", self.url(), "--to", str(fresh), self.store_path,
             "--option", "require-sigs", "true",
             "--option", "trusted-public-keys", self.public_key,
             "--option", "substituters", ""],
            home=f"home-{fresh.name}",
            what=f"nix copy --from {self.url()} with require-sigs and the original key",
        )  # fmt: skip
        copied = fresh / self.store_path.lstrip("/")
        if not copied.exists():
            raise PhaseError(f"nix copy reported success but {copied} is missing")
        if self.scenario == "region-loss":
            # A scrape counts every worker's requests answered before it (metrics.py).
            if (hits := self.origin_hits()) < 1:
                raise PhaseError(
                    f"{self.url()}/metrics shows no origin hit: the path did not come from the origin"
                )
            self.echo(f"  pulled through from the origin ({hits:.0f} origin hits in /metrics)")
        self.echo(f"  {self.store_path} served by the replacement, signed by {self.public_key.split(':')[0]}")

    def origin_hits(self) -> float:
        """The cache's origin hits, from its /metrics."""
        metrics = run(["curl", "-sS", "--fail", f"{self.url()}/metrics"], timeout=30, what="GET /metrics")
        return sum(
            sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "nixcache_tier_lookups_total"
            and sample.labels.get("tier") == "origin"
            and sample.labels.get("result") == "hit"
        )

    def down(self) -> None:
        run(["nixcache", "lab", "down"], env=self.env, timeout=300, what="nixcache lab down")


@click.command()
@click.option(
    "--lab-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="State directory for the drill's own lab (default: a new temp dir; never $NIXCACHE_LAB_DIR).",
)
@click.option("--keep", is_flag=True, help="Leave the lab running (inspect it, then `nixcache lab down`).")
@click.option(
    "--scenario",
    type=click.Choice(SCENARIOS),
    default="host-loss",
    show_default=True,
    help="host-loss: the store comes back from the backup; region-loss: from the S3 origin.",
)
def drill(lab_dir: Path | None, keep: bool, scenario: str) -> None:
    """Deploy, push, back up, destroy and recover a lab cache; print the recovery time."""
    own_dir = lab_dir is None
    if lab_dir is None:
        # Never $NIXCACHE_LAB_DIR: the drill resets and tears down its lab, which must not be yours.
        lab_dir = Path(tempfile.mkdtemp(prefix="nixcache-drill-"))
    lab_dir = lab_dir.resolve()
    existing = lab_state.load(lab_dir) if not own_dir else None
    if existing is not None and existing.hosts:
        raise click.BadParameter(
            f"{lab_dir} holds a lab ({', '.join(h.name for h in existing.hosts)}), and the drill resets and "
            f"removes its lab's hosts; give a new directory, or first run "
            f"NIXCACHE_LAB_DIR={lab_dir} nixcache lab down",
            param_hint="--lab-dir",
        )
    echo = click.echo
    state = Drill(lab_dir, echo, scenario)
    runner = PhaseRunner(echo=echo)
    for name in ("up", "deploy", "push", "backup", "reset", "recover", "verify"):
        runner.add(name, getattr(state, name))
    echo(f"drill lab: {lab_dir} (scenario {scenario})")
    ok = runner.run()
    if not keep:
        try:
            state.down()
        except PhaseError as error:
            echo(f"lab down failed: {error}; run NIXCACHE_LAB_DIR={lab_dir} nixcache lab down")
    if not ok:
        echo(f"drill failed in phase {runner.failed}; logs and throwaway secrets in {lab_dir}")
        sys.exit(1)
    if own_dir and not keep:
        shutil.rmtree(lab_dir, ignore_errors=True)  # throwaway keys and tokens of a passed drill
    echo(f"recovery time: {runner.seconds('reset', 'recover', 'verify'):.1f} s")
