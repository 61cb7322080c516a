"""docs/runbook.md executed on a lab of its own: every step run as written, its output checked.

The lab: lab1 a cache (group `caches`; later also the building host, group `builders`), lab2
the append-only backup repository host, the SeaweedFS origin, a Nix client and later the remote
builder, lab3 the region that "Adding a region" adds (group `eu_west`). One main deploy, one
pushed closure and one backup are shared by every section; the sections run in the runbook's
order, each on what the ones before it left (as an operator's day would). Before some steps the
test causes the incident the procedure is for (lab1 replaced by a blank host, a key lost from
the secret store, a flipped bit in a stored NAR, the origin stopped, the fleet on the previous
release); after Key rotation it points the key placeholders at the new key. Those are the only
things it does itself, besides checking Key rotation's phases from outside (the keys lab1 serves,
what the client's Nix trusts and substitutes, reruns that change nothing, the main deploy
refusing the client).

Commands run as written, with only the placeholders of PLACEHOLDERS substituted: controller
steps through `sh -e` from the checkout's root with `$INV` set, the checkout's `nixcache` first
on PATH and the project's Nix settings (nixcache.nixenv) plus the push token's netrc (the
controller is also the CI runner); host steps through `sh -e` over SSH. Either way stdout and
stderr are one stream, in the order printed.
The last test proves every step was executed, or is marked `Not executed` in the runbook.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from deploy.conftest import Run, lab_group_data
from support import nixbuild
from support.runbook import Step, check, parse, substitute, uncovered

from nixcache import nixenv
from nixcache.drill import CLOSURE_EXPR
from nixcache.keys import SecretKey
from nixcache.secrets.lifecycle import ensure_signing_key, ensure_token

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = REPO / "docs" / "runbook.md"
STEPS = parse(RUNBOOK.read_text())
SECTIONS = list(dict.fromkeys(step.section for step in STEPS))
STEP_TIMEOUT = 900

# Every placeholder the runbook's executed steps use, and what the lab puts in its place.
PLACEHOLDERS = {
    "host": "lab1, the cache",
    "addr": "lab1's address",
    "caches": "the inventory group of the caches: caches",
    "client": "lab2, a Nix client",
    "client addr": "lab2's address",
    "origin host": "lab2, which runs SeaweedFS",
    "signing_key_ref": "the caches' key, file://<lab>/secrets/signing-key (after Key rotation: the new one)",
    "key name": "nixcache-lab-1 (after Key rotation: nixcache-lab-2)",
    "public key": "that key's public key",
    "new signing_key_ref": "file://<work>/secrets/next-signing-key, where Key rotation puts the next key",
    "new key name": "nixcache-lab-2, the name the rotation gives it",
    "store path": "the top path of the closure pushed to lab1 in the setup",
    "hash": "its hash part",
    "missing hash": "a hash no tier has",
    "passphrase file": "a 0600 file with the export passphrase, at the same path on controller and lab1",
    "export file": "signing-key.export in the test's work directory",
    "max size": "1K",
    "region host": "lab3",
    "region addr": "lab3's address",
    "region backup_repository": "rest:http://<lab2>:8000/lab3/, its own repository on lab2",
    "backup store host": "lab2, the append-only backup repository host",
    "region signing_key_ref": "file://<work>/secrets/eu-west-signing-key",
    "region key name": "nixcache-eu-west-1",
    "region push_token_ref": "file://<work>/secrets/eu-west-push-token",
    "region backup_password_ref": "file://<work>/secrets/eu-west-backup-password",
    "origin_access_key_ref": "the lab's origin access key reference",
    "origin_secret_key_ref": "the lab's origin secret key reference",
    "upstream url": "http://<controller>:<port>: a binary cache directory served from the controller",
    "upstream public key": "the public key that cache's narinfos are signed with",
    "upstream name": "<controller>:<port>, the upstream's name in the metrics",
    "upstream hash": "the hash of a path only that upstream has",
    "build": "the build the checkout installs (lab1's nixcache-build after the main deploy)",
    "previous build": "the build of <previous release>, read from lab1 once it runs it",
    "previous release": "the parent of the last commit that changed the nixcache package",
    "rollback dir": "rollback/ in the test's work directory",
    "other hosts": "lab3",
    "builder": "lab2, the remote builder (a Nix client, no cache)",
    "builder addr": "lab2's address",
    "builder host key": "lab2's ed25519 host key, as the lab pinned it (what ssh-keyscan prints)",
    "nix_builder_ssh_key_ref": "the lab's remote-build key reference, file://<lab>/secrets/nix-builder-ssh-key",
}

INVENTORY = """\
# The runbook test's fleet (tests/runbook/test_runbook_lab.py); the runbook's edits are appended.
caches = [("lab1", {{"ssh_hostname": "{a1}", "backup_repository": "{repo1}"}})]
support = [
    ("lab2", {{"ssh_hostname": "{a2}", "backup_store": True, "backup_store_allowed_sources": {sources!r}}}),
]
origin = ["lab2"]  # deploys/origin.py runs SeaweedFS there (the firewall opens S3 in this group only)
"""

ALL_DATA = """\
# The lab's own settings (inventories/group_data/lab.py, evaluated for this lab), then what
# every host of this fleet shares.
{lab_values}
ssh_user = "root"
ssh_port = {port}
ssh_key = {key!r}
ssh_known_hosts_file = {known_hosts!r}
ssh_strict_host_key_checking = "no"
backup_password_ref = {backup_password!r}
backup_password_generate = True
backup_credential_ref = {backup_credential!r}
backup_credential_generate = True
"""


NIXCACHE_SHIM = """\
#!{python}
# The checkout's nixcache command, as `pip install -e .` would put it on PATH.
import sys
sys.path.insert(0, {repo!r})
from nixcache.cli import main
sys.argv[0] = "nixcache"
main()
"""


class Book:
    """The runbook's lab, the placeholder values, and what has been executed."""

    def __init__(self, lab, work: Path) -> None:
        self.lab = lab
        self.work = work
        self.hosts = {h.name: h for h in lab.status()}
        self.inventory = work / "inventory" / "fleet.py"
        self.values: dict[str, str] = {}
        self.executed: set[str] = set()
        self.log = work / "runbook.log"
        self.home = work / "controller-home"
        self.passphrase = work / "export-passphrase"
        self.processes: list[subprocess.Popen] = []  # what the test started on the controller

    def addr(self, name: str) -> str:
        return self.hosts[name].address

    def ref(self, name: str) -> str:
        return f"file://{Path(self.lab.state_dir) / 'secrets' / name}"

    # -- running -----------------------------------------------------------------------------

    def environ(self) -> dict[str, str]:
        # The controller is also the CI runner: its Nix has the push token for lab1 (netrc).
        env = nixenv.environ(self.home, {"netrc-file": str(self.work / "netrc")})
        env.update(
            INV=str(self.inventory),
            NIXCACHE_LAB_DIR=str(self.lab.state_dir),
            PATH=f"{self.work / 'bin'}:{os.environ['PATH']}",
            PYTHONUNBUFFERED="1",  # stdout and stderr in the order written, as on a terminal
        )
        return env

    def controller(self, script: str, cwd: Path = REPO) -> tuple[int, str]:
        done = subprocess.run(
            ["sh", "-ec", script],
            cwd=cwd,
            env=self.environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one stream, in the order printed, as an operator sees it
            text=True,
            timeout=STEP_TIMEOUT,
        )
        return done.returncode, done.stdout

    def on(self, name: str, script: str) -> tuple[int, str]:
        """`script` through `sh -e` on host `name`, its stdout and stderr as one stream."""
        both = ["sh", "-c", 'PYTHONUNBUFFERED=1 sh -ec "$1" 2>&1', "sh", script]
        return self.lab.run(name, both, timeout=STEP_TIMEOUT)

    def sh(self, name: str, script: str) -> str:
        code, output = self.on(name, script)
        assert code == 0, f"{name}: {script} exited {code}: {output}"
        return output

    def pyinfra(self, *args: str, cwd: Path = REPO, pythonpath: bool = False) -> str:
        """A deploy the test makes for its own setup (not a runbook step)."""
        prefix = "PYTHONPATH=. " if pythonpath else ""
        code, output = self.controller(f"{prefix}{sys.executable} -m pyinfra -y {' '.join(args)}", cwd=cwd)
        assert code == 0, f"pyinfra {' '.join(args)} failed:\n{output[-4000:]}"
        return output

    def record(self, step: Step, script: str, code: int, output: str, seconds: float) -> None:
        with self.log.open("a") as log:
            log.write(f"=== {step.id} (line {step.line}, {step.where}, {seconds:.1f} s, exit {code})\n")
            log.write(f"$ {script}\n{output}\n")

    def run(self, step: Step) -> None:
        """Execute one step as written; fail with what it printed when its Expect line is not met."""
        what = f"runbook step {step.id} (line {step.line})"
        if step.kind == "edit":
            target = substitute(step.target, self.values, what)
            path = self.inventory if target == "$INV" else self.inventory.parent / target
            with path.open("a") as handle:
                handle.write("\n" + substitute(step.script, self.values, what) + "\n")
            self.executed.add(step.id)
            return
        script = substitute(step.script, self.values, what)
        start = time.monotonic()
        if step.where == "controller":
            code, output = self.controller(script)
        else:
            code, output = self.on(substitute(step.where, self.values, what), script)
        self.record(step, script, code, output, time.monotonic() - start)
        problems = check(step.expect, self.values, code, output, what)
        if problems and step.id in DIAGNOSE:
            host, command = DIAGNOSE[step.id]
            output += f"\n--- diagnosis on {host}: {command}\n" + self.on(host, command)[1]
        assert not problems, f"{what}: {'; '.join(problems)}\n$ {script}\n{output[-4000:]}"
        self.executed.add(step.id)


def _previous_release() -> str:
    """The parent of the last commit that changed what goes into the nixcache wheel."""
    package = ["nixcache", "setup.cfg", "pyproject.toml", "README.md"]

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)

    last = git("log", "-1", "--format=%H", "--", *package).stdout.strip()
    if not last or git("rev-parse", "--verify", "--quiet", f"{last}^{{commit}}^").returncode != 0:
        pytest.fail(
            f"{REPO} has no commit before the package's last change to roll back to (a shallow "
            "clone?); fetch the history with `git fetch --unshallow` and rerun",
            pytrace=False,
        )
    return f"{last}^"


def _host_key(book: Book, name: str) -> str:
    """`name`'s ed25519 host key (`ssh-ed25519 AAAA…`), from the known hosts the lab wrote."""
    for line in book.lab.known_hosts.read_text().splitlines():
        fields = line.split()
        if fields[:2] == [book.addr(name), "ssh-ed25519"]:
            return f"{fields[1]} {fields[2]}"
    raise AssertionError(f"no ed25519 key of {name} in {book.lab.known_hosts}")


def _repository(book: Book, name: str) -> str:
    """The host's own repository on lab2's append-only REST server (backup_store_port 8000)."""
    return f"rest:http://{book.addr('lab2')}:8000/{name}/"


def _write_fleet(book: Book) -> None:
    lab_secrets = Path(book.lab.state_dir) / "secrets"
    lab_secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
    (book.work / "secrets").mkdir(mode=0o700)
    inventory = book.inventory.parent
    (inventory / "group_data").mkdir(parents=True)
    book.inventory.write_text(
        INVENTORY.format(
            a1=book.addr("lab1"),
            a2=book.addr("lab2"),
            repo1=_repository(book, "lab1"),
            # lab3 joins in "Adding a region": its address is admitted from the start.
            sources=[f"{book.addr(name)}/32" for name in ("lab1", "lab3")],
        )
    )
    host = book.hosts["lab1"]
    (inventory / "group_data" / "all.py").write_text(
        ALL_DATA.format(
            lab_values=lab_group_data(Path(book.lab.state_dir)),
            port=host.ssh_port,
            key=host.ssh_key,
            known_hosts=str(book.lab.known_hosts),
            backup_password=book.ref("backup-password"),
            backup_credential=book.ref("backup-credential-{host}"),
        )
    )
    (inventory / "group_data" / "caches.py").write_text(
        f'"""The caches of the runbook test: behind lab2\'s origin."""\n\n'
        f'origin_endpoint = "http://{book.addr("lab2")}:8333"\n'
    )
    # The controller's ssh (scp in "Lost or leaked key") reaches lab hosts as root with the lab key.
    ssh = book.home / ".ssh"
    ssh.mkdir(parents=True, mode=0o700)
    (ssh / "config").write_text(
        f"Host {' '.join(h.address for h in book.hosts.values())}\n"
        f"  User root\n  IdentityFile {host.ssh_key}\n"
        f"  UserKnownHostsFile {book.lab.known_hosts}\n  StrictHostKeyChecking yes\n"
    )
    # The wheelhouse cache is the controller's (operations/install.py): one build per checkout.
    cache = book.home / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    real = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nixcache"
    real.mkdir(parents=True, exist_ok=True)
    (cache / "nixcache").symlink_to(real)
    shim = book.work / "bin" / "nixcache"
    shim.parent.mkdir()
    shim.write_text(NIXCACHE_SHIM.format(python=sys.executable, repo=str(REPO)))
    shim.chmod(0o755)
    # OpenSSH reads the config of the passwd home, not $HOME: ssh and scp get it with -F.
    for tool in ("ssh", "scp"):
        wrapper = book.work / "bin" / tool
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/{tool} -F {ssh / "config"} "$@"\n')
        wrapper.chmod(0o755)
    # Secrets the parallel first deploys would otherwise both create.
    ensure_signing_key(book.ref("signing-key"), "nixcache-lab-1", generate=True)
    for name in ("push-token", "origin-access-key", "origin-secret-key", "backup-password"):
        ensure_token(book.ref(name), generate=True)
    for name in ("lab1", "lab3"):
        ensure_token(book.ref(f"backup-credential-{name}"), generate=True)


def _push_closure(book: Book) -> str:
    path = nixbuild.build(CLOSURE_EXPR.format(marker=uuid.uuid4().hex), book.work / "build")
    netrc = book.work / "netrc"
    token = (Path(book.lab.state_dir) / "secrets" / "push-token").read_text().strip()
    netrc.write_text(f"machine {book.addr('lab1')} login ci password {token}\n")
    netrc.chmod(0o600)
    url = f"http://{book.addr('lab1')}:5000"
    pushed = nixenv.run(
        ["nix", "copy", "--to", url, path, "--option", "netrc-file", str(netrc)], book.work / "push"
    )
    assert pushed.returncode == 0, pushed.stderr
    return path


@pytest.fixture(scope="module")
def book(tmp_path_factory: pytest.TempPathFactory):
    """The runbook's lab, deployed once: caches behind an origin, backups, one pushed closure."""
    from nixcache.lab import Lab

    work = tmp_path_factory.mktemp("runbook")
    lab = Lab(work / "lab")
    try:
        started = time.monotonic()
        lab.up(3)
        b = Book(lab, work)
        _write_fleet(b)
        b.pyinfra(str(b.inventory), "deploys/backup.py", "--limit", "support")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            origin = pool.submit(b.pyinfra, str(b.inventory), "deploys/origin.py", "--limit", "support")
            caches = pool.submit(b.pyinfra, str(b.inventory), "deploys/cache.py", "--limit", "caches")
            origin.result(), caches.result()
        store_path = _push_closure(b)
        b.sh("lab1", "systemctl start nixcache-backup.service")
        secret = (Path(lab.state_dir) / "secrets" / "signing-key").read_text()
        b.passphrase.write_text(uuid.uuid4().hex + "\n")
        b.passphrase.chmod(stat.S_IRUSR | stat.S_IWUSR)
        _send_passphrase(b)
        b.values.update(
            {
                "host": "lab1",
                "addr": b.addr("lab1"),
                "caches": "caches",
                "client": "lab2",
                "client addr": b.addr("lab2"),
                "origin host": "lab2",
                "signing_key_ref": b.ref("signing-key"),
                "key name": "nixcache-lab-1",
                "public key": str(SecretKey.parse(secret).public()),
                "store path": store_path,
                "hash": Path(store_path).name[:32],
                "missing hash": "0" * 32,
                "new signing_key_ref": f"file://{work / 'secrets' / 'next-signing-key'}",
                "new key name": "nixcache-lab-2",
                "passphrase file": str(b.passphrase),
                "export file": str(work / "signing-key.export"),
                "max size": "1K",
                "region host": "lab3",
                "region addr": b.addr("lab3"),
                "region backup_repository": _repository(b, "lab3"),
                "backup store host": "lab2",
                "region signing_key_ref": f"file://{work / 'secrets' / 'eu-west-signing-key'}",
                "region key name": "nixcache-eu-west-1",
                "region push_token_ref": f"file://{work / 'secrets' / 'eu-west-push-token'}",
                "region backup_password_ref": f"file://{work / 'secrets' / 'eu-west-backup-password'}",
                "origin_access_key_ref": b.ref("origin-access-key"),
                "origin_secret_key_ref": b.ref("origin-secret-key"),
                "build": b.sh("lab1", "cat /opt/nixcache/venv/nixcache-build").strip(),
                "previous release": _previous_release(),
                "rollback dir": str(work / "rollback"),
                "other hosts": "lab3",
                "builder": "lab2",
                "builder addr": b.addr("lab2"),
                "builder host key": _host_key(b, "lab2"),
                "nix_builder_ssh_key_ref": b.ref("nix-builder-ssh-key"),
            }
        )
        print(f"\nrunbook lab set up in {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield b
    finally:
        for process in b.processes if "b" in locals() else []:
            process.terminate()
            process.wait(timeout=10)
        lab.down()


# -- the incidents: what the test does itself before a step, so the procedure has work -------


def _send_passphrase(book: Book) -> None:
    """The export passphrase file on lab1 too, sent on stdin (never on a command line)."""
    sent = subprocess.run(
        [
            *book.lab.ssh_command(book.lab.host("lab1")),
            "--",
            f"install -D -m 0600 /dev/stdin {book.passphrase}",
        ],
        input=book.passphrase.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr


def _replace_the_host(book: Book) -> None:
    """lab1 is lost: a blank machine with the same name and address takes its place."""
    book.lab.reset("lab1")
    _send_passphrase(book)


def _lose_the_key(book: Book) -> None:
    """The secret store lost the signing key (the export made by the steps before is offline)."""
    Path(book.values["signing_key_ref"].removeprefix("file://")).unlink()


def _start_an_upstream(book: Book) -> None:
    """A third-party binary cache: a signed `nix copy --to file://` directory, served over HTTP
    from the controller's lab address, holding a path that no tier of the lab has."""
    work = book.work / "upstream"
    keys = nixenv.run(
        ["nix-store", "--generate-binary-cache-key", "upstream-1", str(work / "sk"), str(work / "pk")],
        work / "home",
    )
    assert keys.returncode == 0, keys.stderr
    path = nixbuild.build(CLOSURE_EXPR.format(marker=uuid.uuid4().hex), work / "build")
    cache = work / "cache"
    copied = nixenv.run(
        ["nix", "copy", "--to", f"file://{cache}?secret-key={work / 'sk'}", path], work / "home"
    )
    assert copied.returncode == 0, copied.stderr
    address = book.lab.state().gateway
    with socket.socket() as probe:
        probe.bind((address, 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", address, "--directory", str(cache)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    book.processes.append(server)
    book.values.update(
        {
            "upstream url": f"http://{address}:{port}",
            "upstream public key": (work / "pk").read_text().strip(),
            "upstream name": f"{address}:{port}",
            "upstream hash": Path(path).name[:32],
        }
    )


def _origin(book: Book):
    """A client of lab2's S3 (the origin), with the lab's credentials."""
    from minio import Minio

    def secret(name: str) -> str:
        return Path(book.ref(name).removeprefix("file://")).read_text().strip()

    return Minio(
        f"{book.addr('lab2')}:8333",
        access_key=secret("origin-access-key"),
        secret_key=secret("origin-secret-key"),
        secure=False,
    )


def _damage_a_nar(book: Book) -> None:
    """One bit of the pushed top path's NAR flips on lab1's disk (size and mtime unchanged, as bit
    rot does), and the origin no longer has the path (its retention GC collected it), so nothing
    but a push can repair it."""
    narinfo = f"{book.values['hash']}.narinfo"
    url = book.sh("lab1", f"sed -n 's/^URL: //p' /var/lib/nixcache/store/narinfo/{narinfo}").strip()
    nar = f"/var/lib/nixcache/store/{url}"
    book.sh(
        "lab1",
        f"python3 -c \"import os; f = open('{nar}', 'r+b'); n = os.path.getsize('{nar}') // 2; "
        f'f.seek(n); b = f.read(1); f.seek(n); f.write(bytes([b[0] ^ 1])); f.close()"',
    )
    origin = _origin(book)
    for name in (narinfo, url):
        origin.remove_object("nixcache", name)


def _the_new_key_is_the_key(book: Book) -> None:
    """After Key rotation the caches sign with the new key: the placeholders of the key say so."""
    ref = book.values["new signing_key_ref"]
    secret = Path(ref.removeprefix("file://")).read_text()
    book.values.update(
        {
            "signing_key_ref": ref,
            "key name": book.values["new key name"],
            "public key": str(SecretKey.parse(secret).public()),
        }
    )


def _stop_the_origin(book: Book) -> None:
    book.sh("lab2", "systemctl stop seaweedfs.service")


def _origin_serves_objects(book: Book) -> None:
    """The section before restarted SeaweedFS, and its check lists the bucket; reading objects
    can take a few seconds more (its volume server registers again). Wait for that, bounded,
    reading the origin directly: a region asked during the warm-up would answer 404."""
    client = _origin(book)
    name = f"{book.values['hash']}.narinfo"
    deadline = time.monotonic() + 60
    while True:
        try:
            client.stat_object("nixcache", name)
            return
        except Exception as error:  # any failure means "not yet", until the deadline
            if time.monotonic() > deadline:
                late = f"the origin does not serve {name} 60 s after its restart: {error}"
                raise AssertionError(late) from None
            time.sleep(1)


def _fleet_on_the_previous_release(book: Book) -> None:
    """Every cache runs <previous release>, deployed from an unpacked copy of it."""
    previous = book.work / "previous"
    previous.mkdir()
    code, output = book.controller(f"git archive {book.values['previous release']} | tar -x -C {previous}")
    assert code == 0, output
    book.pyinfra(str(book.inventory), "deploys/cache.py", "--limit", "caches", cwd=previous, pythonpath=True)
    book.values["previous build"] = book.sh("lab1", "cat /opt/nixcache/venv/nixcache-build").strip()
    assert book.values["previous build"] != book.values["build"], "the previous release builds the same wheel"


# -- Key rotation, checked from outside beyond the steps' own Expect lines ---------------------
# (what tests/deploy/test_rotation.py checked on the session lab, which this lab's fleet of a
# cache and a Nix client in one inventory already is)

NEXT_KEY_FILE = "/etc/nixcache/signing-key.next"
CLIENT_CONF = "/etc/nix/nixcache.conf"


def _served_keys(book: Book) -> list[str]:
    response = httpx.get(f"http://{book.addr('lab1')}:5000/pubkey", timeout=10)
    assert response.status_code == 200, response.text
    return response.text.split()


def _trusted_on_the_client(book: Book) -> list[str]:
    """What the client's Nix itself says it trusts (not only what its file says)."""
    shown = book.sh("lab2", "nix --extra-experimental-features nix-command show-config")
    line = next(line for line in shown.splitlines() if line.startswith("trusted-public-keys = "))
    return line.split(" = ", 1)[1].split()


def _the_client_substitutes_a_new_push(book: Book) -> None:
    """A fresh path pushed to lab1 is substituted by the client's Nix from lab1."""
    salt = uuid.uuid4().hex
    path = nixbuild.build(
        f'derivation {{ name = "rot-{salt[:8]}"; system = builtins.currentSystem; builder = "/bin/sh";'
        f' args = [ "-c" "echo {salt} > $out" ]; }}',
        book.work / f"rotation-{salt[:8]}",
    )
    url = f"http://{book.addr('lab1')}:5000"
    pushed = nixenv.run(
        ["nix", "copy", "--to", url, path, "--option", "netrc-file", str(book.work / "netrc")],
        book.work / f"rotation-{salt[:8]}" / "home",
    )
    assert pushed.returncode == 0, pushed.stderr
    realised = book.sh("lab2", f"nix-store --realise {path} 2>&1 && cat {path}")
    assert f"from '{url}'" in realised, realised
    assert realised.strip().endswith(salt), realised


def _rotate_again_changes_nothing(book: Book) -> None:
    """The runbook's "running the same command again reports no changes", run."""
    code, output = book.controller("pyinfra -y $INV deploys/rotate_key.py")
    again = Run(code, output, 0)
    assert code == 0 and again.totals()["error"] == 0, output[-4000:]
    assert again.totals()["changed"] == 0, again.changed_operations()


def _the_next_key(book: Book) -> str:
    secret = Path(book.values["new signing_key_ref"].removeprefix("file://")).read_text()
    assert SecretKey.parse(secret).name == book.values["new key name"]
    return str(SecretKey.parse(secret).public())


def _the_main_deploy_refuses_the_client(book: Book) -> None:
    """With a client in $INV, deploys/cache.py without --limit refuses it in one line naming it
    and the fix, instead of making it a cache."""
    code, output = book.controller("pyinfra -y $INV deploys/cache.py")
    assert code != 0, output[-4000:]
    assert "lab2: is a Nix client of the caches" in output, output[-4000:]
    assert "--limit <the caches' group>" in output, output[-4000:]


def _introduced(book: Book) -> None:
    old, new = book.values["public key"], _the_next_key(book)
    assert _served_keys(book) == [old, new]
    assert _trusted_on_the_client(book) == [old, new]
    _the_client_substitutes_a_new_push(book)
    _rotate_again_changes_nothing(book)


def _retired(book: Book) -> None:
    new = _the_next_key(book)
    assert _served_keys(book) == [new]
    assert _trusted_on_the_client(book) == [new]


def _made_permanent(book: Book) -> None:
    new = _the_next_key(book)
    assert _served_keys(book) == [new]
    assert book.sh("lab1", f"ls {NEXT_KEY_FILE} 2>&1 || true").strip().endswith("No such file or directory")
    installed = book.sh("lab1", "cat /etc/nixcache/signing-key").strip()
    assert installed == Path(book.values["new signing_key_ref"].removeprefix("file://")).read_text().strip()
    assert book.sh("lab2", f"test ! -e {NEXT_KEY_FILE} && echo none").strip() == "none"
    assert _trusted_on_the_client(book) == [new]
    assert re.search(rf"trusted-public-keys = {re.escape(new)}\n", book.sh("lab2", f"cat {CLIENT_CONF}"))
    _the_client_substitutes_a_new_push(book)
    _rotate_again_changes_nothing(book)


# What the test shows beside a failed step's output, to say why.
DIAGNOSE = {
    "Rebuilding a region from the origin #1": (
        "lab3",
        "curl -s localhost:5000/metrics | grep tier; grep -B2 -A8 origin /etc/nixcache/config.toml; "
        "journalctl -u nixcache -n 30 --no-pager",
    ),
}

BEFORE = {
    "Adding an upstream #1": _start_an_upstream,
    "Lost host (hardware gone, disk dead, instance deleted) #1": _replace_the_host,
    "Lost or leaked key #3": _lose_the_key,
    "Corrupted store #1": _damage_a_nar,
    "Origin outage (the environment's S3 bucket does not answer) #1": _stop_the_origin,
    "Rebuilding a region from the origin #1": _origin_serves_objects,
    "Upgrading nixcache on the fleet, one host at a time #1": _fleet_on_the_previous_release,
    "Key rotation #1": _the_main_deploy_refuses_the_client,
}


# What the test does after a step: checks from outside (Key rotation), and placeholders that
# keep naming what the fleet now has.
AFTER = {
    "Key rotation #2": _introduced,
    "Key rotation #4": _retired,
    "Key rotation #6": _made_permanent,
    "Key rotation #7": _the_new_key_is_the_key,
}


@pytest.mark.parametrize("section", SECTIONS)
def test_runbook_section(book: Book, section: str) -> None:
    steps = [s for s in STEPS if s.section == section]
    if all(s.not_executed for s in steps):
        pytest.skip(f"marked in the runbook: {steps[0].not_executed}")
    for step in steps:
        if step.not_executed:
            continue
        if step.id in BEFORE:
            BEFORE[step.id](book)
        book.run(step)
        if step.id in AFTER:
            AFTER[step.id](book)


def test_every_step_is_executed_or_marked(book: Book) -> None:
    problems = uncovered(STEPS, book.executed)
    assert not problems, "\n".join(problems)
    marked = [s for s in STEPS if s.not_executed]
    print(
        f"\nrunbook: {len(book.executed)} steps executed, {len(marked)} marked not executed "
        f"({len(STEPS)} in all); log in {book.log}",
        file=sys.stderr,
    )
    assert all(re.search(r"\w{4,}", s.not_executed) for s in marked)
