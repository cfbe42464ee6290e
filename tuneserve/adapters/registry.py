"""The adapter registry: tenants' LoRA adapters on disk, validated, versioned, atomic.

Layout under `<data_dir>/adapters/`:

    <tenant>/<name>/v<N>/       adapter_config.json, adapter_model.safetensors (what
                                vLLM loads), adapter.gguf (what llama.cpp loads),
                                manifest.json
    <tenant>/<name>/current     "v<N>": the version served, replaced atomically
    <tenant>/.removed.json      last version of each removed adapter, so that a
                                re-added name never reuses a version number
    .lock                       serialises writers (flock), across processes too

Engine names (`<tenant>--<name>--v<N>--<uid>`) carry a random id per version: a tenant
deleted and created again restarts at v1, and its adapters must never be served from
what engines still hold of the old tenant's.

Readers take no lock: every change they can see is a rename. An upload is unpacked,
validated and converted in a private temp dir under the data dir; only a fully
built version dir is renamed into place, so a rejection leaves nothing behind.

With `adapters.s3.bucket` set, each version is also uploaded (object_store.py) from its
staged dir, before it is renamed into place and made current: a replica asked for a
version's engine name finds it in the bucket, and a failed upload publishes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from pydantic import BaseModel, ConfigDict, computed_field

from tuneserve.adapters.archive import unpack
from tuneserve.adapters.object_store import AdapterObjectStore, ObjectStoreError, S3Location
from tuneserve.adapters.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tuneserve.adapters.validation import (
    AdapterRejected,
    BaseModules,
    check_name,
    check_new_name,
    validate_adapter,
)
from tuneserve.config import Settings
from tuneserve.errors import TuneserveError
from tuneserve.fsutil import owned_temp_dir, staged_dir, write_atomic
from tuneserve.gguf.lora import AdapterConversionError, convert_lora_to_gguf
from tuneserve.names import is_valid_name

GGUF_FILE = "adapter.gguf"
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "current"
REMOVED_FILE = ".removed.json"
UPLOAD_PREFIX = ".adapter-upload-"
log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"v([1-9][0-9]*)")


class AdapterStoreUnavailable(TuneserveError):
    """The object store (adapters.s3) refused or could not take a version: nothing of
    it was published (HTTP 503, retryable)."""


class AdapterNotFound(TuneserveError):
    """The tenant has no adapter of that name (HTTP 404)."""


class AdapterManifest(BaseModel):
    """manifest.json of one version: what was validated, written before the rename."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: str
    name: str
    version: int
    rank: int
    alpha: float
    target_modules: list[str]
    base: str  # model.name of the base it was validated against
    sha256: str  # of adapter_model.safetensors
    size_bytes: int  # of adapter_model.safetensors
    created_at: datetime
    uid: str | None = None  # absent in versions stored before engine names carried it


class AdapterRecord(BaseModel):
    """One stored adapter version, as the gateway and the CLI see it."""

    model_config = ConfigDict(frozen=True)

    tenant: str
    name: str
    version: int
    path: Path  # the version dir: a PEFT adapter dir for vLLM
    gguf_path: Path  # the GGUF LoRA for llama.cpp
    rank: int
    alpha: float
    target_modules: list[str]
    sha256: str
    size_bytes: int
    created_at: datetime
    uid: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def engine_name(self) -> str:
        """Unique per stored version, so no version is ever served from engine-side
        state of another (an older version, or a deleted tenant's of the same name)."""
        versioned = f"{self.tenant}--{self.name}--v{self.version}"
        return f"{versioned}--{self.uid}" if self.uid else versioned


def owner_of(engine_name: str) -> tuple[str, str] | None:
    """(tenant, adapter) an engine name belongs to; None if it is not one of ours.
    Unambiguous because names never contain '--' (tuneserve/names.py)."""
    parts = engine_name.split("--")
    if len(parts) not in (3, 4) or not (is_valid_name(parts[0]) and is_valid_name(parts[1])):
        return None
    return parts[0], parts[1]


class AddedVersion(NamedTuple):
    record: AdapterRecord
    replaced: AdapterRecord | None  # the version that was current until this one


class TenantRemoved(NamedTuple):
    tenant: str
    adapters: list[AdapterRecord]  # current versions that were removed with it


class AdapterRegistry:
    """Stores and finds tenants' adapters under `<data_dir>/adapters/`.

    The tenant is taken as a string: whether it exists is for the caller (the tenants
    module) to check first; names are only checked for shape here.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.root = self.data_dir / "adapters"
        s3 = settings.adapters.s3
        self.object_store = (
            AdapterObjectStore(S3Location(s3.bucket, s3.prefix, s3.endpoint_url, s3.region)) if s3.bucket else None
        )

    @cached_property
    def _base(self) -> BaseModules:
        return BaseModules.from_hf_dir(self.settings.resolved_hf_path())

    # ------------------------------------------------------------ writing

    def add(self, tenant: str, name: str, source: Path) -> AdapterRecord:
        """Validate the adapter at `source` (a PEFT dir, .tar.gz or .zip), convert it to
        GGUF and store it as the next version of `tenant`/`name`, which becomes current.

        Raises AdapterRejected, leaving the data dir as it was.
        """
        return self.add_version(tenant, name, source).record

    def add_version(
        self, tenant: str, name: str, source: Path, owner_exists: Callable[[], object] | None = None
    ) -> AddedVersion:
        """`add`, also returning the version it replaced, as seen under the writers'
        lock (so two concurrent uploads each free the one they really replaced).

        `owner_exists` runs under the lock just before publishing and raises if the
        tenant is gone: a tenant deleted during a long upload gets nothing stored."""
        check_name(tenant, "tenant")
        check_new_name(name, "adapter")
        limits = self.settings.adapters
        # Under the data dir, so the files built here move into place by rename.
        work = owned_temp_dir(self.data_dir, UPLOAD_PREFIX)
        try:
            upload = work / "upload"
            upload.mkdir()
            unpack(Path(source), upload, max_bytes=limits.max_bytes, max_files=limits.max_files)
            adapter = validate_adapter(upload, self.settings, self._base)
            # Only the validated files are kept; READMEs and tokenizer copies are not.
            built = work / "version"
            built.mkdir()
            for filename in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                os.replace(adapter.root / filename, built / filename)
                (built / filename).chmod(0o644)
            try:
                convert_lora_to_gguf(built, self.settings.resolved_hf_path(), built / GGUF_FILE)
            except AdapterConversionError as exc:
                if isinstance(exc.__cause__, OSError):  # writing the GGUF, reading the base: ours
                    raise TuneserveError(f"cannot convert the adapter for llama.cpp: {exc}") from exc
                why = self._without_server_paths(str(exc), built)
                raise AdapterRejected(
                    "conversion_failed", f"the adapter cannot be converted for llama.cpp: {why}"
                ) from exc
            with self._lock():
                if owner_exists is not None:
                    owner_exists()
                replaced = self.get(tenant, name)
                version = self._next_version(tenant, name)
                manifest = AdapterManifest(
                    tenant=tenant,
                    name=name,
                    version=version,
                    rank=adapter.rank,
                    alpha=adapter.alpha,
                    target_modules=list(adapter.target_modules),
                    base=self.settings.model.name,
                    sha256=adapter.sha256,
                    size_bytes=adapter.size_bytes,
                    created_at=datetime.now(timezone.utc),
                    uid=uuid.uuid4().hex[:12],
                )
                (built / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
                final = self._name_dir(tenant, name) / f"v{version}"
                try:
                    with staged_dir(final) as staged:
                        for file in built.iterdir():
                            os.replace(file, staged / file.name)
                        self._upload(staged, manifest)
                except BaseException:
                    with contextlib.suppress(OSError):
                        final.parent.rmdir()  # made for a first version that was not stored
                    raise
                write_atomic(final.parent / CURRENT_FILE, f"v{version}\n", durable=True)
            return AddedVersion(self._record(final, manifest), replaced)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def remove(self, tenant: str, name: str) -> AdapterRecord:
        """Delete every version of `tenant`/`name`; return the version that was current."""
        check_name(tenant, "tenant")
        check_name(name, "adapter")
        if self.get(tenant, name) is None:  # checked before the lock, which creates files
            raise AdapterNotFound(f"tenant {tenant!r} has no adapter {name!r}")
        with self._lock():
            record = self.get(tenant, name)
            if record is None:  # removed meanwhile
                raise AdapterNotFound(f"tenant {tenant!r} has no adapter {name!r}")
            name_dir = self._name_dir(tenant, name)
            last = max([record.version, *_versions_in(name_dir)])
            removed = self._removed(tenant)
            removed[name] = max(last, removed.get(name, 0))
            write_atomic(name_dir.parent / REMOVED_FILE, json.dumps(removed, indent=2) + "\n", durable=True)
            self._discard(name_dir)
            self._delete_uploaded(tenant, name)
        return record

    def remove_tenant(self, tenant: str, while_locked: Callable[[], object] = lambda: None) -> TenantRemoved:
        """Delete every adapter of `tenant`, and its version counters with them.

        `while_locked` (the tenants-table change: deleting the row, or creating a new
        tenant of that name) runs first under the writers' lock, and if it raises
        nothing is removed. An upload checks its owner under the same lock, so it
        either finishes before and is removed here, or runs after and finds no owner.
        `tenants create` calls this too: a new tenant never finds anything an old one
        of its name left (data dirs from before tenant deletion removed adapters).
        """
        with self._lock():
            while_locked()  # first: it says what is wrong with the name in its own words
            check_name(tenant, "tenant")
            records = self.list(tenant)
            tenant_dir = self.root / tenant
            if tenant_dir.exists():
                self._discard(tenant_dir)
            self._delete_uploaded(tenant)
        return TenantRemoved(tenant, records)

    # ------------------------------------------------------------ reading

    def get(self, tenant: str, name: str) -> AdapterRecord | None:
        """The current version of `tenant`/`name`, or None (also for names nothing could
        be stored under: a lookup from a request's `model` is not an error)."""
        if not (is_valid_name(tenant) and is_valid_name(name)):
            return None
        name_dir = self._name_dir(tenant, name)
        try:
            current = (name_dir / CURRENT_FILE).read_text().strip()
            if not _VERSION_DIR.fullmatch(current):
                raise TuneserveError(f"{name_dir / CURRENT_FILE} is corrupt: {current!r}")
            version_dir = name_dir / current
            manifest = AdapterManifest.model_validate_json((version_dir / MANIFEST_FILE).read_text())
        except FileNotFoundError:  # never added, or removed while we read
            return None
        return self._record(version_dir, manifest)

    def list(self, tenant: str | None = None) -> list[AdapterRecord]:
        """Current versions of every adapter (of `tenant`, if given), by tenant and name."""
        if tenant is not None:
            tenants = [tenant] if is_valid_name(tenant) else []
        else:
            tenants = _names_in(self.root)
        records = []
        for owner in tenants:
            for name in _names_in(self.root / owner):
                record = self.get(owner, name)
                if record is not None:
                    records.append(record)
        return records

    # ------------------------------------------------------------ internals

    def _upload(self, staged: Path, manifest: AdapterManifest) -> None:
        if self.object_store is None:
            return
        try:
            self.object_store.upload_version(staged, manifest.tenant, manifest.name, manifest.version)
        except ObjectStoreError as exc:
            # The staged dir goes with the exception: nothing of this version is stored.
            raise AdapterStoreUnavailable(
                f"cannot store adapter version {manifest.version} in the object store: {exc}"
            ) from exc

    def _delete_uploaded(self, tenant: str, name: str | None = None) -> None:
        if self.object_store is None:
            return
        try:
            self.object_store.delete(tenant, name)
        except ObjectStoreError as exc:
            # Removed here, which is what the gateways serve from; what stays in the
            # bucket is addressable by its old engine names only, which nobody is given.
            log.error("adapter %s removed, but its versions stay in the object store: %s",
                      f"{tenant}/{name}" if name else f"tenant {tenant}", exc)

    def _discard(self, directory: Path) -> None:
        # One rename takes it all away; readers never see half a dir.
        trash = self.root / ".trash"
        trash.mkdir(exist_ok=True)
        os.rename(directory, trash / f"{directory.name}--{uuid.uuid4().hex}")
        shutil.rmtree(trash, ignore_errors=True)  # also what an interrupted remove left

    def _without_server_paths(self, message: str, built: Path) -> str:
        """A converter message as a tenant may read it: the paths in it are server details."""
        shown = [(f"{built}/", ""), (str(built), "the adapter"),
                 (str(self.settings.resolved_hf_path()), "the base model"), (str(self.data_dir), "<data_dir>")]
        for path, replacement in shown:
            message = message.replace(path, replacement)
        return message

    def _name_dir(self, tenant: str, name: str) -> Path:
        return self.root / tenant / name

    def _record(self, version_dir: Path, manifest: AdapterManifest) -> AdapterRecord:
        fields = manifest.model_dump(exclude={"base"})
        return AdapterRecord(**fields, path=version_dir, gguf_path=version_dir / GGUF_FILE)

    def _removed(self, tenant: str) -> dict[str, int]:
        try:
            return json.loads((self.root / tenant / REMOVED_FILE).read_text())
        except FileNotFoundError:
            return {}

    def _next_version(self, tenant: str, name: str) -> int:
        # Numbers are never reused, even after a remove: engines key cached state on
        # engine_name, and a re-added adapter must not be served from the old one's.
        existing = _versions_in(self._name_dir(tenant, name))
        return max([0, *existing, self._removed(tenant).get(name, 0)]) + 1

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _versions_in(name_dir: Path) -> list[int]:
    if not name_dir.is_dir():
        return []
    return [int(m[1]) for p in name_dir.iterdir() if (m := _VERSION_DIR.fullmatch(p.name))]


def _names_in(directory: Path) -> list[str]:
    """Sub-dirs that are tenant or adapter names (skips .lock, .trash, temp dirs)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and is_valid_name(p.name))

