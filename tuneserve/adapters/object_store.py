"""Adapter versions in S3-compatible object storage (boto3), for replicas without the volume.

Keys: `<prefix>/<tenant>/<name>/v<N>/<file>`, the version dir's layout (registry.py).
The manifest is written last and read first: a reader that finds a version's manifest
finds its other files, and a version whose upload failed halfway has none.

Imported by the registry (uploads) and by the vLLM resolver plugin (downloads), so it
takes plain values, not the gateway's Settings; boto3 is imported only where S3 is on.
Credentials are boto3's standard chain (AWS_ACCESS_KEY_ID, a profile, an IAM role).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tuneserve.errors import TuneserveError

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"  # registry.MANIFEST_FILE (not imported: the plugin imports this module)
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
# S3 itself checks each upload against this digest, so a body damaged on the way is refused
# there; what a reader trusts is still the manifest's sha256, checked after the download.
_UPLOAD_ARGS = {"ChecksumAlgorithm": "SHA256"}


class ObjectStoreError(TuneserveError):
    """The object store refused or could not be reached; the message says which and where."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"


class AdapterObjectStore:
    """Uploads, finds, downloads and deletes adapter versions under one bucket prefix."""

    def __init__(self, location: S3Location) -> None:
        self.location = location
        self._prefix = location.prefix.strip("/")
        self._client: Any = None
        self._client_lock = threading.Lock()

    # ------------------------------------------------------------ keys

    def version_prefix(self, tenant: str, name: str | None = None, version: int | None = None) -> str:
        parts = [self._prefix, tenant, name, f"v{version}" if version is not None else None]
        return "/".join(p for p in parts if p) + "/"

    def key(self, tenant: str, name: str, version: int, filename: str) -> str:
        return self.version_prefix(tenant, name, version) + filename

    # ------------------------------------------------------------ writing

    def upload_version(self, version_dir: Path, tenant: str, name: str, version: int) -> None:
        """Upload every file of `version_dir`, the manifest last. On failure, what was
        uploaded of this version is deleted (best effort) and ObjectStoreError raised."""
        files = sorted(p for p in version_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        files.sort(key=lambda p: p.name == MANIFEST_FILE)  # stable: the manifest moves last
        if not any(p.name == MANIFEST_FILE for p in files):
            raise ObjectStoreError(f"{version_dir} has no {MANIFEST_FILE}")
        try:
            for path in files:
                key = self.key(tenant, name, version, path.name)
                self._call(f"upload {self.location.url(key)}", self.client.upload_file,
                           str(path), self.location.bucket, key, ExtraArgs=_UPLOAD_ARGS)
        except ObjectStoreError:
            self._delete_quietly(self.version_prefix(tenant, name, version))
            raise

    def delete(self, tenant: str, name: str | None = None) -> None:
        """Delete every version of `tenant`/`name` (of the whole tenant without a name),
        manifests first, so no reader finds a version that is losing its files."""
        prefix = self.version_prefix(tenant, name)
        keys = self._keys_under(prefix)
        keys.sort(key=lambda k: not k.endswith("/" + MANIFEST_FILE))
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            answer = self._call(f"delete under {self.location.url(prefix)}", self.client.delete_objects,
                                Bucket=self.location.bucket, Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise ObjectStoreError(
                    f"cannot delete {self.location.url(first.get('Key', ''))}: {first.get('Code')} {first.get('Message')}"
                )

    # ------------------------------------------------------------ reading

    def has_version(self, tenant: str, name: str, version: int) -> bool:
        """Whether the version's manifest is in the bucket; ObjectStoreError if unknown."""
        key = self.key(tenant, name, version, MANIFEST_FILE)
        try:
            self.client.head_object(Bucket=self.location.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return False
            raise ObjectStoreError(f"cannot read {self.location.url(key)}: {exc}") from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise ObjectStoreError(f"cannot read {self.location.url(key)}: {exc}") from exc
        return True

    def download_file(self, tenant: str, name: str, version: int, filename: str, dest: Path) -> bool:
        """Download one file of a version to `dest`; False if the bucket has no such object."""
        key = self.key(tenant, name, version, filename)
        try:
            self.client.download_file(self.location.bucket, key, str(dest))
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return False
            raise ObjectStoreError(f"cannot download {self.location.url(key)}: {exc}") from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise ObjectStoreError(f"cannot download {self.location.url(key)}: {exc}") from exc
        return True

    # ------------------------------------------------------------ internals

    @property
    def client(self) -> Any:
        # One client per store: boto3 clients are thread-safe (sessions are not), and
        # making one reads the credential chain, which is not free.
        with self._client_lock:
            if self._client is None:
                config = Config(
                    connect_timeout=5,
                    read_timeout=60,
                    retries={"max_attempts": 3, "mode": "standard"},
                    # S3-compatible servers answer path-style requests; virtual-hosted
                    # ones need a DNS name per bucket, which MinIO in a cluster lacks.
                    s3={"addressing_style": "path" if self.location.endpoint_url else "auto"},
                )
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.location.endpoint_url, region_name=self.location.region, config=config
                )
            return self._client

    def _call(self, what: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise ObjectStoreError(f"cannot {what}: {exc}") from exc

    def _keys_under(self, prefix: str) -> list[str]:
        keys: list[str] = []
        pages = self._call(f"list {self.location.url(prefix)}", self.client.get_paginator("list_objects_v2").paginate,
                           Bucket=self.location.bucket, Prefix=prefix)
        try:
            for page in pages:
                keys.extend(item["Key"] for item in page.get("Contents", ()))
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise ObjectStoreError(f"cannot list {self.location.url(prefix)}: {exc}") from exc
        return keys

    def _delete_quietly(self, prefix: str) -> None:
        try:
            self._delete_keys(self._keys_under(prefix))
        except ObjectStoreError as exc:
            # Harmless: without its manifest, no reader takes a version for stored.
            log.warning("could not clean up the partial upload under %s: %s", self.location.url(prefix), exc)

    def _delete_keys(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._call(f"delete {self.location.url(key)}", self.client.delete_object, Bucket=self.location.bucket, Key=key)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
