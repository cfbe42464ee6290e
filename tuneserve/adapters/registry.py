"""The adapter registry: tenants' LoRA adapters on disk, validated, versioned, atomic.

Layout under `<data_dir>/adapters/`:

    <tenant>/<name>/v<N>/       adapter_config.json, adapter_model.safetensors (what
                                vLLM loads), adapter.gguf (what llama.cpp loads),
                                manifest.json
    <tenant>/<name>/current     "v<N>": the version served, replaced atomically
    <tenant>/.removed.json      last version of each removed adapter, so that a
                                re-added name never reuses a version number
    .lock                       serialises writers (flock), across processes too

The last three are the embedded default's index; with `store.url` on PostgreSQL the
current versions, used numbers and manifests live in the database instead, and
writers lock there (registry_index.py): several machines then share one registry.

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

import builtins
import contextlib
import logging
import os
import shutil
import threading
import uuid
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Callable, NamedTuple, overload

from pydantic import BaseModel, ConfigDict, computed_field

from tuneserve.adapters.archive import unpack
from tuneserve.adapters.object_store import AdapterObjectStore, ObjectStoreError, S3Location
from tuneserve.adapters.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tuneserve.adapters.registry_index import (
    MANIFEST_FILE,
    AdapterManifest,
    DatabaseIndex,
    index_for,
    names_in,
    versions_in,
)
from tuneserve.adapters.validation import (
    AdapterRejected,
    BaseModules,
    check_name,
    check_new_name,
    file_sha256,
    validate_adapter,
)
from tuneserve.config import Settings
from tuneserve.db import Store, is_shared, open_store
from tuneserve.errors import TuneserveError
from tuneserve.fsutil import owned_temp_dir, staged_dir
from tuneserve.gguf.lora import AdapterConversionError, convert_lora_to_gguf
from tuneserve.names import is_valid_name

GGUF_FILE = "adapter.gguf"
UPLOAD_PREFIX = ".adapter-upload-"
log = logging.getLogger(__name__)


class AdapterStoreUnavailable(TuneserveError):
    """The object store (adapters.s3) refused or could not take a version: nothing of
    it was published (HTTP 503, retryable)."""


class AdapterNotFound(TuneserveError):
    """The tenant has no adapter of that name (HTTP 404)."""


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

    `store` is the tenants' database (the gateway passes the one it has open); on
    PostgreSQL it holds the registry's index. Without one, the configured store is
    opened when it is PostgreSQL, and closed by close().
    """

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.root = self.data_dir / "adapters"
        self._owned_store: Store | None = None
        if store is None and is_shared(settings):
            store = self._owned_store = open_store(settings)
        self.index = index_for(store, self.root)
        self._fetching = threading.Lock()  # one download at a time: they are rare
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
            with self.index.writing(tenant) as index:
                if owner_exists is not None:
                    owner_exists()
                replaced = self._as_record(index.current(tenant, name))
                version = index.next_version(tenant, name)
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
                index.publish(manifest)
            return AddedVersion(self._record(final, manifest), replaced)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def remove(self, tenant: str, name: str) -> AdapterRecord:
        """Delete every version of `tenant`/`name`; return the version that was current."""
        check_name(tenant, "tenant")
        check_name(name, "adapter")
        if self.get(tenant, name) is None:  # checked before the lock, which creates files
            raise AdapterNotFound(f"tenant {tenant!r} has no adapter {name!r}")
        with self.index.writing(tenant) as index:
            record = self._as_record(index.current(tenant, name))
            if record is None:  # removed meanwhile
                raise AdapterNotFound(f"tenant {tenant!r} has no adapter {name!r}")
            index.remove(tenant, name)
            self._discard(self._name_dir(tenant, name))
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
        with self.index.writing(tenant) as index:
            while_locked()  # first: it says what is wrong with the name in its own words
            check_name(tenant, "tenant")
            records = self.list(tenant)
            index.remove_tenant(tenant)
            self._discard(self.root / tenant)
            self._delete_uploaded(tenant)
        return TenantRemoved(tenant, records)

    # ------------------------------------------------------------ reading

    def get(self, tenant: str, name: str) -> AdapterRecord | None:
        """The current version of `tenant`/`name`, or None (also for names nothing could
        be stored under: a lookup from a request's `model` is not an error)."""
        if not (is_valid_name(tenant) and is_valid_name(name)):
            return None
        return self._as_record(self.index.current(tenant, name))

    async def aget(self, tenant: str, name: str) -> AdapterRecord | None:
        """get() for the gateway's event loop: it resolves every adapter request's model."""
        if not (is_valid_name(tenant) and is_valid_name(name)):
            return None
        return self._as_record(await self.index.acurrent(tenant, name))

    def list(self, tenant: str | None = None) -> list[AdapterRecord]:
        """Current versions of every adapter (of `tenant`, if given), by tenant and name."""
        if tenant is not None and not is_valid_name(tenant):
            return []
        return [self._as_record(manifest) for manifest in self.index.list_current(tenant)]

    def fetch_local(self, record: AdapterRecord) -> bool:
        """Download `record`'s version dir from the object store when this machine's disk
        lacks it (published through a gateway elsewhere, with no shared volume), so the
        llama.cpp fallback has its GGUF. Checked against the record the database holds:
        uid and weights' sha256. False when there is nothing to fetch it from or it does
        not verify (the caller serves what it can); ObjectStoreError if unreachable."""
        store = self.object_store
        if record.path.is_dir() or store is None:
            return record.path.is_dir()
        with self._fetching:
            if record.path.is_dir():  # fetched by another request while this one waited
                return True
            try:
                with staged_dir(record.path) as staged:
                    for filename in (MANIFEST_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS, GGUF_FILE):
                        if not store.download_file(record.tenant, record.name, record.version,
                                                   filename, staged / filename):
                            log.warning("adapter %s: %s is missing from the object store", record.engine_name, filename)
                            raise _NotFetched()
                    if _uid_in(staged) != record.uid or file_sha256(staged / ADAPTER_WEIGHTS) != record.sha256:
                        log.error("adapter %s in the object store does not match the database", record.engine_name)
                        raise _NotFetched()
            except _NotFetched:
                return False
        log.info("adapter %s fetched from the object store", record.engine_name)
        return True

    def sweep_local(self) -> builtins.list[Path]:
        """With the index in the database, remove the version dirs on this machine's disk
        that it no longer stores (or stores under another uid): what another machine
        removed, or a publish whose commit failed. Returns what was removed. The file
        index needs no sweep: there the dirs are the truth, removed with the entry."""
        if not isinstance(self.index, DatabaseIndex):
            return []
        swept: builtins.list[Path] = []
        for tenant, candidates in self._unstored_dirs(self.index.stored_uids()).items():
            # Checked again under the tenant's writer lock: a writer renames its version
            # dir into place before its commit, and holds the lock from one to the other,
            # so what is unstored here is stale, not about to be published.
            with self.index.writing(tenant):
                stale = set(self._unstored_dirs(self.index.stored_uids(tenant)).get(tenant, []))
                for version_dir in candidates:
                    if version_dir in stale:
                        self._discard(version_dir)
                        swept.append(version_dir)
                for name_dir in {d.parent for d in candidates}:  # emptied ones go too
                    with contextlib.suppress(OSError):
                        name_dir.rmdir()
                with contextlib.suppress(OSError):
                    (self.root / tenant).rmdir()
        return swept

    def _unstored_dirs(self, stored: dict[tuple[str, str, int], str | None]) -> dict[str, builtins.list[Path]]:
        found: dict[str, builtins.list[Path]] = {}
        for tenant in names_in(self.root):
            for name in names_in(self.root / tenant):
                for version in versions_in(self.root / tenant / name):
                    version_dir = self.root / tenant / name / f"v{version}"
                    key = (tenant, name, version)
                    if key not in stored or _uid_in(version_dir) != stored[key]:
                        found.setdefault(tenant, []).append(version_dir)
        return found

    async def aclose(self) -> None:
        """Release what aget() opened on the running event loop (a store of our own)."""
        if self._owned_store is not None:
            await self._owned_store.aclose()

    def close(self) -> None:
        if self._owned_store is not None:
            self._owned_store.close()

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
        # One rename takes it all away; readers never see half a dir. Absent is fine:
        # with the index in the database, a gateway may never have held the files.
        trash = self.root / ".trash"
        trash.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
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

    @overload
    def _as_record(self, manifest: AdapterManifest) -> AdapterRecord: ...

    @overload
    def _as_record(self, manifest: None) -> None: ...

    @overload
    def _as_record(self, manifest: AdapterManifest | None) -> AdapterRecord | None: ...

    def _as_record(self, manifest: AdapterManifest | None) -> AdapterRecord | None:
        if manifest is None:
            return None
        return self._record(self._name_dir(manifest.tenant, manifest.name) / f"v{manifest.version}", manifest)


def _uid_in(version_dir: Path) -> str | None:
    """The uid of the version a dir holds; "" when its manifest cannot be read (a dir
    being removed, or not one of ours), which matches no stored uid."""
    try:
        return AdapterManifest.model_validate_json((version_dir / MANIFEST_FILE).read_text()).uid
    except (OSError, ValueError):
        return ""


class _NotFetched(Exception):
    """Leaves fetch_local's staged dir unrenamed: nothing half-fetched is kept."""
