"""Base, monitoring, nginx front and client deploy on lab hosts, checked from outside.

Runs after tests/deploy (same shared lab). Tests that change a host's data deploy with
`--limit` to one host and converge it back to the lab's defaults before they finish.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import require
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from deploy.conftest import Run, deploy, hosts, on_host, pyinfra
from support import nixbuild
from support.webhook import Receiver

from nixcache import nixenv
from nixcache.keys import SecretKey
from nixcache.lab import Lab
from nixcache.lab.state import load
from operations.hardening import NETWORK_SYSCTLS
from operations.nginx import WORKER_FILES

pytestmark = pytest.mark.lab


def converged(run: Run) -> None:
    assert run.returncode == 0, run.output[-5000:]
    assert run.totals()["error"] == 0


# Operation names of this module's parts (tests/deploy checks the whole deploy's rerun).
PARTS = ("nixcache base", "nixcache monitoring", "nixcache nginx front")


def parts_changed(run: Run) -> list[str]:
    """Operations of the base, monitoring and nginx parts that the run changed."""
    return [name for name in run.changed_operations() if name.startswith(PARTS)]


def build_path(tmp_path: Path) -> str:
    """A fresh store path on the controller (salted: never in any cache yet)."""
    salt = uuid.uuid4().hex
    return nixbuild.build(
        f'derivation {{ name = "d2-lab-{salt[:8]}"; system = builtins.currentSystem; builder = "/bin/sh";'
        f' args = [ "-c" "echo d2 {salt} > $out" ]; }}',
        tmp_path / "build",
    )


def nix(args: list[str], home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return nixenv.run(["nix", *args], home, env=env)


def push(lab_dir: Path, tmp_path: Path, url: str, machine: str, path: str, env=None) -> None:
    token = (lab_dir / "secrets" / "push-token").read_text().strip()
    netrc = tmp_path / "push-netrc"
    netrc.write_text(f"machine {machine}\nlogin ci\npassword {token}\n")
    netrc.chmod(0o600)
    pushed = nix(
        ["copy", "--to", url, path, "--option", "netrc-file", str(netrc)], tmp_path / "home-push", env
    )
    assert pushed.returncode == 0, pushed.stderr


def wait_for_cache(url: str, seconds: float = 20) -> None:
    """Until the cache answers (earlier tests converge hosts back, which may restart it)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/nix-cache-info", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} does not answer after {seconds:g} s"
        time.sleep(0.5)


# --- base ------------------------------------------------------------------------------------


def test_sshd_keys_only_and_sysctls_recorded_with_reasons(deployed: Run, lab_dir: Path) -> None:
    for host in hosts(lab_dir):
        effective = on_host(lab_dir, host.name, "sshd -T")
        assert "passwordauthentication no" in effective
        assert "kbdinteractiveauthentication no" in effective
        assert "permitrootlogin without-password" in effective  # = prohibit-password
        conf = on_host(lab_dir, host.name, "cat /etc/sysctl.d/60-nixcache.conf")
        for key, (value, why) in NETWORK_SYSCTLS.items():
            assert f"# {why}\n" in conf
            assert re.search(rf"^(# )?{re.escape(key)} = {re.escape(value)}$", conf, re.M), key
        # Every parameter applied here holds its value; the others say why they are skipped.
        for line in conf.splitlines():
            if line and not line.startswith("#"):
                key, value = (part.strip() for part in line.split("=", 1))
                live = on_host(lab_dir, host.name, f"sysctl -n {key}")
                assert " ".join(live.split()) == value, key
        assert conf.count("# skipped, ") == len(
            [k for k in NETWORK_SYSCTLS if not re.search(rf"^{re.escape(k)} = ", conf, re.M)]
        )
        limits = on_host(lab_dir, host.name, "cat /etc/security/limits.d/60-nixcache.conf")
        assert "*    hard nofile 1048576" in limits


def admin_key(tmp_path: Path) -> tuple[Path, str]:
    """A fresh ed25519 key pair for alice: the private key file and the public key line."""
    key = Ed25519PrivateKey.generate()
    private = tmp_path / "alice"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    private.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode() + " alice@test"


def test_admin_user_logs_in_with_key_and_uses_sudo(deployed: Run, lab_dir: Path, tmp_path: Path) -> None:
    host = hosts(lab_dir)[-1]
    private, public = admin_key(tmp_path)
    extra = tmp_path / "group_data"
    extra.mkdir()
    users = [{"name": "alice", "ssh_keys": [public], "sudo": True}]
    (extra / "lab.py").write_text(f"admin_users = {users!r}\n")
    try:
        run = deploy(lab_dir, "--limit", host.name, "--group-data", str(extra))
        converged(run)
        again = deploy(lab_dir, "--limit", host.name, "--group-data", str(extra))
        converged(again)
        assert parts_changed(again) == []
        login = subprocess.run(
            [
                "ssh", "-i", str(private), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", f"alice@{host.address}",
                "id -un; sudo -n id -un",
            ],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert login.returncode == 0, login.stderr
        assert login.stdout.split() == ["alice", "root"]
        assert (
            on_host(lab_dir, host.name, "stat -c '%a %U' /etc/sudoers.d/60-nixcache-admins").strip()
            == "440 root"
        )
    finally:
        converged(deploy(lab_dir, "--limit", host.name))
    # Without admin_users the sudo grant is gone (the account stays: its files are the admin's).
    code, _ = Lab(lab_dir).run(host.name, ["test", "-e", "/etc/sudoers.d/60-nixcache-admins"])
    assert code != 0


def test_rejected_sshd_and_sudoers_files_never_take_effect(
    deployed: Run, lab_dir: Path, tmp_path: Path
) -> None:
    host = hosts(lab_dir)[-1]
    dropin, sudoers = "/etc/ssh/sshd_config.d/61-test.conf", "/etc/sudoers.d/61-test"

    def apply(sshd_text: str, sudoers_text: str) -> Run:
        deploy_file = tmp_path / f"files-{uuid.uuid4().hex[:6]}.py"
        deploy_file.write_text(
            "from operations import hostfile\n"
            f"hostfile.put(name='sshd drop-in', path={dropin!r}, content={sshd_text!r},"
            " check='sshd -t', check_in_place=True)\n"
            f"hostfile.put(name='sudoers', path={sudoers!r}, content={sudoers_text!r},"
            " check='visudo -cqf {path}', mode='0440')\n"
        )
        return pyinfra(lab_dir, "-y", "--limit", host.name, "inventories/lab.py", str(deploy_file))

    try:
        converged(apply("X11Forwarding no\n", "Defaults:root !lecture\n"))
        bad_sshd = apply("NoSuchOption yes\n", "Defaults:root !lecture\n")
        assert bad_sshd.returncode != 0
        assert f"{host.name}: {dropin}: not installed, `sshd -t` rejected it: " in bad_sshd.output
        assert "NoSuchOption" in bad_sshd.output  # what sshd said, on the same line
        assert "the previous version is unchanged" in bad_sshd.output
        assert on_host(lab_dir, host.name, f"cat {dropin}").strip() == "X11Forwarding no"
        on_host(lab_dir, host.name, "sshd -t")  # the running configuration is intact, and we still log in
        bad_sudo = apply("X11Forwarding no\n", "root ALL=(ALL) NOT VALID\n")
        assert bad_sudo.returncode != 0
        assert f"{host.name}: {sudoers}: not installed, `visudo -cqf {sudoers}.nixcache-new` rejected it" in (
            bad_sudo.output
        )
        assert on_host(lab_dir, host.name, f"cat {sudoers}").strip() == "Defaults:root !lecture"
        assert on_host(lab_dir, host.name, f"ls {dropin}* {sudoers}*").split() == [dropin, sudoers]
    finally:
        on_host(lab_dir, host.name, f"rm -f {dropin}* {sudoers}* && systemctl reload ssh.service")


# --- monitoring ------------------------------------------------------------------------------


def metrics(address: str) -> str:
    response = httpx.get(f"http://{address}:9100/metrics", timeout=5)
    assert response.status_code == 200
    return response.text


def test_node_exporter_textfile_metrics_and_persistent_journal(deployed: Run, lab_dir: Path) -> None:
    host = hosts(lab_dir)[0]
    assert on_host(lab_dir, host.name, "systemctl is-enabled nixcache-disk-alert.timer").strip() == "enabled"
    assert on_host(lab_dir, host.name, "systemctl is-active nixcache-disk-alert.timer").strip() == "active"
    on_host(lab_dir, host.name, "systemctl start nixcache-disk-alert.service")
    text = metrics(host.address)
    assert 'nixcache_disk_alert{path="/var/lib/nixcache/store"} 0' in text
    ratio = float(re.search(r'^nixcache_disk_usage_ratio\{path="[^"]+"\} (\S+)$', text, re.M).group(1))
    assert 0 < ratio < 1
    assert 'node_systemd_unit_state{name="nixcache.service",state="active",type="simple"} 1' in text
    journald = on_host(lab_dir, host.name, "systemd-analyze cat-config systemd/journald.conf")
    assert "Storage=persistent" in journald and "MaxRetentionSec=2week" in journald
    assert on_host(lab_dir, host.name, "ls /var/log/journal/*/system.journal").strip()
    for unit in ("nixcache-disk-alert.service", "prometheus-node-exporter.service"):
        score = on_host(lab_dir, host.name, f"systemd-analyze security --no-pager {unit} | tail -1")
        assert float(re.search(r"exposure level for \S+: ([0-9.]+)", score).group(1)) <= 2.0, score


def test_disk_alert_over_threshold_warns_in_journal_metric_and_webhook(
    deployed: Run, lab_dir: Path, tmp_path: Path
) -> None:
    host = hosts(lab_dir)[0]
    receiver = Receiver(load(lab_dir).gateway)
    secret = uuid.uuid4().hex
    url_file = tmp_path / "webhook-url"
    url_file.write_text(f"http://{load(lab_dir).gateway}:{receiver.port}/hook/{secret}\n")
    try:
        run = pyinfra(
            lab_dir, "-y", "-vvv", "--limit", host.name,
            "--data", "disk_alert_threshold_percent=1", "--data", f"alert_webhook_ref=file://{url_file}",
            "inventories/lab.py", "deploys/cache.py",
        )  # fmt: skip
        converged(run)
        assert secret not in run.output  # the URL never shows, even at -vvv
        stat = on_host(lab_dir, host.name, "stat -c '%a %U' /etc/nixcache/alert-webhook").strip()
        assert stat == "600 root"
        # The restarted timer elapses on its own within a minute (OnBootSec is long past): stop it,
        # so that the one alert counted below is the one started here.
        on_host(lab_dir, host.name, "systemctl stop nixcache-disk-alert.timer")
        receiver.bodies.clear()
        code, _ = Lab(lab_dir).run(host.name, ["systemctl", "start", "nixcache-disk-alert.service"])
        assert code != 0  # over the threshold: the unit fails on purpose
        for _ in range(50):
            if receiver.bodies:
                break
            time.sleep(0.2)
        assert len(receiver.bodies) == 1
        body = receiver.bodies[0]
        assert body["threshold_percent"] == 1 and body["path"] == "/var/lib/nixcache/store"
        assert f"{body['usage_percent']}% full" in body["text"]
        journal = on_host(
            lab_dir, host.name, "journalctl -u nixcache-disk-alert.service -p warning --no-pager -n 5"
        )
        assert "% full (threshold 1%" in journal
        assert 'nixcache_disk_alert{path="/var/lib/nixcache/store"} 1' in metrics(host.address)
    finally:
        receiver.close()
        converged(deploy(lab_dir, "--limit", host.name))
    code, _ = Lab(lab_dir).run(host.name, ["test", "-e", "/etc/nixcache/alert-webhook"])
    assert code != 0  # alert_webhook_ref unset: the file is gone


# --- nginx front -----------------------------------------------------------------------------


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=20
    )


def restart_cache(lab_dir: Path, name: str, base: str, tls: tuple[str, ...]) -> None:
    """Restart nixcache on `name` and wait (bounded) until it answers through the front."""
    on_host(lab_dir, name, "systemctl restart nixcache")
    deadline = time.monotonic() + 20
    while curl(*tls, "-o", "/dev/null", "-w", "%{http_code}", f"{base}/healthz").stdout != "200":
        assert time.monotonic() < deadline, f"{name}: nixcache does not answer after a restart"
        time.sleep(0.5)


def test_nginx_front_tls_http2_and_nar_bytes_from_disk(deployed: Run, lab_dir: Path, tmp_path: Path) -> None:
    """The front with a read token: HTTP/2 over TLS, signed narinfos and NARs (and Ranges of
    them) from disk, the token checked by nginx's map (never in pyinfra's output), the store's
    other files unreachable, hits nginx served recorded by the server, a real Nix client."""
    require(shutil.which("curl") is not None, "curl missing (apt-get install curl)")
    host = hosts(lab_dir)[0]
    base = f"https://{host.address}"
    store = "/var/lib/nixcache/store"
    data = (
        "--data", "cache_nginx_front=true",
        "--data", f"read_token_ref=file://{lab_dir / 'secrets' / 'read-token'}",
        "--data", "read_token_generate=true",
    )  # fmt: skip
    try:
        first = deploy(lab_dir, "-vvv", "--limit", host.name, *data)
        converged(first)
        read_token = (lab_dir / "secrets" / "read-token").read_text().strip()
        assert read_token and read_token not in first.output  # not even at -vvv
        basic = base64.b64encode(f"nixcache:{read_token}".encode()).decode()
        assert basic not in first.output
        again = deploy(lab_dir, "--limit", host.name, *data)
        converged(again)
        assert parts_changed(again) == []
        # The map of accepted Authorization values is root's only; nginx's master reads it.
        assert on_host(lab_dir, host.name, "stat -c %a:%U:%G /etc/nginx/nixcache-readers.conf").strip() == (
            "600:root:root"
        )
        # Room for the site's open_file_cache: Debian's nginx.conf included the deploy's
        # main-context file, and the reload gave the workers its limit (systemd's is 1,024).
        workers = "for p in $(pgrep -u www-data -x nginx); do grep 'open files' /proc/$p/limits; done"
        limits = [line.split()[3:5] for line in on_host(lab_dir, host.name, workers).splitlines() if line]
        assert limits and all(limit == [str(WORKER_FILES)] * 2 for limit in limits), limits

        cert = tmp_path / "cert.pem"
        cert.write_text(on_host(lab_dir, host.name, "cat /etc/nginx/nixcache-tls/cert.pem"))
        tls = ("--cacert", str(cert))
        auth = ("-H", f"Authorization: Basic {basic}")
        info = curl("--http2", *tls, *auth, "-w", "\n%{http_version}", f"{base}/nix-cache-info")
        assert info.returncode == 0, info.stderr  # the self-signed certificate names the host's address
        assert "StoreDir: /nix/store" in info.stdout and info.stdout.endswith("\n2")

        path = build_path(tmp_path)
        ssl = {"NIX_SSL_CERT_FILE": str(cert)}
        push(lab_dir, tmp_path, base, host.address, path, ssl)
        hash_part = Path(path).name[:32]
        narinfo = curl(*tls, *auth, f"{base}/{hash_part}.narinfo").stdout
        nar_url = re.search(r"^URL: (\S+)$", narinfo, re.M).group(1)
        size = int(re.search(r"^FileSize: (\d+)$", narinfo, re.M).group(1))
        # The sandboxed service (UMask=0027 behind the front) writes the store group-readable.
        modes = on_host(
            lab_dir, host.name, f"stat -c %a:%G {store}/narinfo/{hash_part}.narinfo {store}/{nar_url}"
        )
        assert modes.split() == ["640:nixcache", "640:nixcache"]
        # signed/<hash>.narinfo as the server answers (another branch makes the server write it).
        on_host(
            lab_dir,
            host.name,
            f"install -d -o nixcache -g nixcache -m 0750 {store}/signed && "
            f"echo {base64.b64encode(narinfo.encode()).decode()} | base64 -d "
            f"> {store}/signed/{hash_part}.narinfo && "
            f"chown nixcache:nixcache {store}/signed/{hash_part}.narinfo && "
            f"chmod 0640 {store}/signed/{hash_part}.narinfo",
        )

        got = curl("--http2", *tls, *auth, "-D", "-", f"{base}/{hash_part}.narinfo")
        head, _, body = got.stdout.partition("\n\n")  # text mode: curl's CRLFs read as \n
        assert head.lower().startswith("http/2 200"), got.stdout
        # nginx's static file handler answered (ETag, Last-Modified), not the app.
        assert "etag:" in head.lower() and "content-type: text/x-nix-narinfo" in head.lower()
        assert body == narinfo
        refused = curl("--http2", *tls, "-D", "-", "-o", "/dev/null", f"{base}/{hash_part}.narinfo")
        assert refused.stdout.lower().startswith("http/2 401"), refused.stdout
        assert 'www-authenticate: basic realm="nixcache"' in refused.stdout.lower()

        nar = curl("--http2", *tls, *auth, "-D", "-", "-o", str(tmp_path / "nar"), f"{base}/{nar_url}")
        headers = nar.stdout.lower()
        assert headers.startswith("http/2 200"), nar.stdout
        assert "etag:" in headers and "last-modified:" in headers and "accept-ranges: bytes" in headers
        assert "content-type: application/x-nix-nar" in headers
        assert (tmp_path / "nar").stat().st_size == size
        part = curl(
            "--http2",
            *tls,
            *auth,
            "-r",
            "10-19",
            "-D",
            "-",
            "-o",
            str(tmp_path / "part"),
            f"{base}/{nar_url}",
        )
        assert part.stdout.lower().startswith("http/2 206"), part.stdout
        assert f"content-range: bytes 10-19/{size}" in part.stdout.lower()
        assert (tmp_path / "part").read_bytes() == (tmp_path / "nar").read_bytes()[10:20]

        # Only signed/ and nar/ are served from disk; the store's other files never are.
        nar_file = nar_url.removeprefix("nar/")
        for hidden in (
            f"/_nixcache_store/{nar_file}",  # internal: only reachable through X-Accel-Redirect
            f"/narinfo/{hash_part}.narinfo",
            f"/nar-meta/{nar_file}",
            f"/signed/{hash_part}.narinfo",
            f"/nar/../narinfo/{hash_part}.narinfo",
            f"/nar/..%2Fnar-meta%2F{nar_file}",
        ):
            code = curl("--path-as-is", *tls, *auth, "-o", "/dev/null", "-w", "%{http_code}", base + hidden)
            assert code.stdout in ("400", "404"), (hidden, code.stdout)

        # The server read nginx's hits log: counted, and recorded as served at its next flush.
        deadline = time.monotonic() + 15
        hit = 'nixcache_front_requests_total{method="GET",route="narinfo",status="200"}'
        while hit not in curl(*tls, f"{base}/metrics").stdout:
            assert time.monotonic() < deadline, curl(*tls, f"{base}/metrics").stdout[-3000:]
            time.sleep(0.5)
        # Last served: only nginx serves this path from here on (the server's own pending marks
        # are flushed by a restart first), so only the hits log can make its atime recent again.
        restart_cache(lab_dir, host.name, base, tls)
        on_host(lab_dir, host.name, f"touch -a -d '10 days ago' {store}/narinfo/{hash_part}.narinfo")
        again_hit = curl(
            "--http2", *tls, *auth, "-o", "/dev/null", "-w", "%{http_code}", f"{base}/{hash_part}.narinfo"
        )
        assert again_hit.stdout == "200"
        time.sleep(2.5)  # nginx flushes its log, and the server reads it, every second
        restart_cache(lab_dir, host.name, base, tls)  # flushes last-served times on stop
        served = float(on_host(lab_dir, host.name, f"stat -c %X {store}/narinfo/{hash_part}.narinfo"))
        assert served > time.time() - 3600, "a hit nginx served did not count as served"

        netrc = tmp_path / "read-netrc"
        netrc.write_text(f"machine {host.address}\nlogin nixcache\npassword {read_token}\n")
        netrc.chmod(0o600)
        public = str(SecretKey.parse((lab_dir / "secrets" / "signing-key").read_text()).public())
        fetched = nix(
            [
                "copy", "--from", base, "--to", str(tmp_path / "fresh"), path,
                "--option", "require-sigs", "true", "--option", "trusted-public-keys", public,
                "--option", "substituters", "", "--option", "netrc-file", str(netrc),
            ],
            tmp_path / "home-fetch", ssl,
        )  # fmt: skip
        assert fetched.returncode == 0, fetched.stderr
        assert (tmp_path / "fresh" / "nix" / "store" / Path(path).name).read_text() == Path(path).read_text()
    finally:
        converged(deploy(lab_dir, "--limit", host.name))
    code, _ = Lab(lab_dir).run(host.name, ["test", "-e", "/etc/nginx/conf.d/nixcache.conf"])
    assert code != 0  # front off again: the site is gone


# --- client ----------------------------------------------------------------------------------


def test_client_deploy_makes_nix_substitute_from_the_lab_cache(
    deployed: Run, lab_dir: Path, tmp_path: Path
) -> None:
    lab_hosts = hosts(lab_dir)
    cache, client = lab_hosts[0], lab_hosts[-1]
    args = (
        "-y",
        "--limit",
        client.name,
        "--data",
        "client_cache_group=lab",
        "inventories/lab.py",
        "deploys/client.py",
    )
    converged(pyinfra(lab_dir, *args))
    again = pyinfra(lab_dir, *args)
    converged(again)
    assert again.totals()["changed"] == 0, again.changed_operations()
    conf = on_host(lab_dir, client.name, "cat /etc/nix/nixcache.conf")
    urls = " ".join(f"http://{h.address}:5000" for h in lab_hosts)
    assert f"substituters = {urls}\n" in conf
    public = str(SecretKey.parse((lab_dir / "secrets" / "signing-key").read_text()).public())
    assert public in conf

    path = build_path(tmp_path)
    wait_for_cache(f"http://{cache.address}:5000")
    push(lab_dir, tmp_path, f"http://{cache.address}:5000", cache.address, path)
    realised = on_host(lab_dir, client.name, f"nix-store --realise {path} 2>&1 && cat {path}")
    assert f"from 'http://{cache.address}:5000'" in realised
    assert realised.strip().endswith(Path(path).read_text().strip())
