"""The origin: one S3-compatible bucket per environment, in the Nix binary cache layout.

    nix-cache-info              written once, by the first push through this server
    <hash>.narinfo              as pushed (normalised, the pusher's Sig lines kept)
    nar/<filehash>.nar[.xz|.zst|.bz2|.br|.lz4]

so plain Nix tooling and any HTTP front can read the bucket, and a lost region is rebuilt from it.
The client is minio (docs/decisions/0007-tiers-and-s3-client.md: it adds ~6 MiB to the server
where boto3 adds ~24 MiB). Credentials are read from the files the config names; they never
reach argv or the log.
"""

from __future__ import annotations

import http.client
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import minio
import urllib3
from minio.error import MinioException, S3Error

from nixcache.server import narinfo
from nixcache.server.config import ConfigError, OriginConfig
from nixcache.server.narinfo import NarInfo, NarInfoError
from nixcache.server.tiers.errors import TierError, TierRefused, TierUnavailable

_ABSENT = ("NoSuchKey", "NoSuchObject", "ResourceNotFound")
_DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
PART_SIZE = 8 * 1024 * 1024  # minio holds one part in memory: multipart above this bounds it
_POOL_SIZE = 32  # connections per client: concurrent misses and pushes share them


@dataclass(frozen=True)
class ObjectStat:
    key: str
    size: int
    modified: datetime


class Source:
    """A NAR being read from a tier (a urllib3 response): `read(n)`, `size` (None when unknown),
    `close()`."""

    def __init__(self, response: Any, size: int | None):
        self._response = response
        self.size = size

    def read(self, amount: int) -> bytes:
        try:
            return self._response.read(amount, decode_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise OSError(f"reading the NAR failed: {error}") from None

    def readinto(self, buffer: memoryview) -> int:
        """Receive into `buffer` (the store's one reused buffer), with no copy through urllib3:
        its `readinto` reads a new bytes object and copies it (urllib3 2.x). The response's
        http.client reader stops at Content-Length and raises on a short body, as `read` does."""
        try:
            return self._response._fp.readinto(buffer)
        except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as error:
            raise OSError(f"reading the NAR failed: {error}") from None

    def close(self) -> None:
        self._response.close()
        self._response.release_conn()


def _read_secret(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as error:
        raise ConfigError(
            f"cannot read origin.{what} {path}: {error.strerror}; check the path and that the "
            "service user may read it"
        ) from None
    if not value:
        raise ConfigError(f"origin.{what} {path} is empty; deploy the S3 credential into it")
    return value


class Origin:
    """The environment's bucket. Methods raise TierUnavailable when it cannot be reached."""

    name = "origin"
    serves_bare_nars = True  # our own pushes: a NAR may be fetched without a narinfo in hand

    def __init__(self, config: OriginConfig, store_dir: str = "/nix/store"):
        self.config = config
        self.bucket = config.bucket
        self.store_dir = store_dir
        self.narinfo_deadline = config.narinfo_deadline
        self.nar_deadline = config.nar_deadline
        self.where = f"origin {config.endpoint}/{config.bucket}"
        parts = urlsplit(config.endpoint)
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError(
                f"origin.endpoint = {config.endpoint!r} must be scheme://host[:port] only; "
                "the bucket goes in origin.bucket"
            )
        access = _read_secret(config.access_key_file, "access_key_file")
        secret = _read_secret(config.secret_key_file, "secret_key_file")
        # Reads fail fast (a deadline turns them into a 404); writes may take longer. No urllib3
        # retries: the deadline, not a retry loop, decides how long a client waits.
        self._read = self._client(parts, access, secret, config.nar_deadline)
        self._write = self._client(parts, access, secret, config.write_timeout)

    def _client(self, parts: Any, access: str, secret: str, timeout: float) -> minio.Minio:
        pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout, 5.0), read=timeout),
            retries=False,
            maxsize=_POOL_SIZE,
            block=False,
        )
        client = minio.Minio(
            parts.netloc,
            access_key=access,
            secret_key=secret,
            secure=parts.scheme == "https",
            region=self.config.region,
            http_client=pool,
        )
        if self.config.addressing == "virtual":
            client.enable_virtual_style_endpoint()
        else:
            client.disable_virtual_style_endpoint()
        return client

    def _failed(self, doing: str, error: Exception) -> TierError:
        if isinstance(error, S3Error) and error.code in _DENIED:
            return TierUnavailable(
                f"{self.where}: {doing}: {error.code}; check origin.access_key_file/secret_key_file",
                "denied",
            )
        if isinstance(error, S3Error) and error.code == "NoSuchBucket":
            return TierUnavailable(f"{self.where}: bucket does not exist; create it", "no_bucket")
        detail = getattr(error, "code", None) or type(error).__name__
        return TierUnavailable(f"{self.where}: {doing}: {detail}")

    # -- reads ------------------------------------------------------------------------------------

    def get_bytes(self, key: str, limit: int = 4 * 1024 * 1024) -> bytes | None:
        """The object's bytes (small objects only), None when absent."""
        try:
            response = self._read.get_object(self.bucket, key)
        except S3Error as error:
            if error.code in _ABSENT:
                return None
            raise self._failed(f"GET {key}", error) from None
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._failed(f"GET {key}", error) from None
        try:
            data = response.read(limit + 1)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise self._failed(f"GET {key}", error) from None
        finally:
            response.close()
            response.release_conn()
        if len(data) > limit:
            raise TierRefused(f"{self.where}: {key} is larger than {limit} bytes", "malformed")
        return data

    def get_narinfo(self, hash_part: str) -> NarInfo | None:
        data = self.get_bytes(f"{hash_part}.narinfo")
        if data is None:
            return None
        try:
            info = narinfo.parse(data.decode("utf-8"), self.store_dir)
        except (UnicodeDecodeError, NarInfoError) as error:
            reason = f"{self.where}: {hash_part}.narinfo is malformed: {error}"
            raise TierRefused(reason, "malformed") from None
        if info.hash_part != hash_part:
            raise TierRefused(f"{self.where}: {hash_part}.narinfo names {info.store_path}", "malformed")
        return info

    def open_nar(self, name: str) -> Source | None:
        try:
            response = self._read.get_object(self.bucket, f"nar/{name}")
        except S3Error as error:
            if error.code in _ABSENT:
                return None
            raise self._failed(f"GET nar/{name}", error) from None
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._failed(f"GET nar/{name}", error) from None
        length = response.headers.get("Content-Length")
        return Source(response, int(length) if length and length.isdigit() else None)

    def stat(self, key: str) -> ObjectStat | None:
        try:
            found = self._write.stat_object(self.bucket, key)
        except S3Error as error:
            if error.code in _ABSENT:
                return None
            raise self._failed(f"HEAD {key}", error) from None
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._failed(f"HEAD {key}", error) from None
        return ObjectStat(key, found.size or 0, found.last_modified)  # type: ignore[arg-type]

    def list(self, prefix: str = "", recursive: bool = False) -> Iterator[ObjectStat]:
        """Objects under `prefix` (not recursive: the bucket's top level, i.e. the narinfos)."""
        try:
            for found in self._write.list_objects(self.bucket, prefix=prefix or None, recursive=recursive):
                if not found.is_dir:
                    yield ObjectStat(found.object_name, found.size or 0, found.last_modified)  # type: ignore[arg-type]
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._failed(f"LIST {prefix or '/'}", error) from None

    # -- writes -----------------------------------------------------------------------------------

    def put_file(self, key: str, path: Path, content_type: str) -> int:
        """Upload a local file (multipart above PART_SIZE); its size."""
        try:
            with open(path, "rb") as handle:
                size = handle.seek(0, io.SEEK_END)
                handle.seek(0)
                self._write.put_object(
                    self.bucket,
                    key,
                    handle,
                    size,
                    content_type=content_type,
                    part_size=PART_SIZE,
                    num_parallel_uploads=1,
                )
        except (MinioException, urllib3.exceptions.HTTPError) as error:
            raise self._failed(f"PUT {key}", error) from None
        except OSError as error:
            if error.filename is not None:
                raise  # the local file, not the network
            raise self._failed(f"PUT {key}", error) from None
        return size

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self._write.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._failed(f"PUT {key}", error) from None

    def delete(self, key: str) -> None:
        try:
            self._write.remove_object(self.bucket, key)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._failed(f"DELETE {key}", error) from None
