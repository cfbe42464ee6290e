"""The adapter registry: tenants' LoRA adapters on disk, validated, versioned, atomic.

Layout under `<data_dir>/adapters/`:

    <tenant>/<name>/v<N>/       adapter_config.json, adapter_model.safetensors (what
                                vLLM loads), adapter.gguf (what llama.cpp loads),
                                manifest.json
    <tenant>/<name>/current     "v<N>": the version served, replaced atomically
    <tenant>/.removed.json      last version of each removed adapter, so that a
                                re-added name never reuses an engine name
    .lock                       serialises writers (flock), across processes too

Readers take no lock: every change they can see is a rename. An upload is unpacked,
validated and converted in a private temp dir under the data dir; only a fully
built version dir is renamed into place, so a rejection leaves nothing behind.
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
from typing import Iterator

from pydantic import BaseModel, ConfigDict, computed_field

from tuneserve.adapters.archive import unpack
from tuneserve.adapters.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tuneserve.adapters.validation import (
    AdapterRejected,
    BaseModules,
    check_name,
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

    @computed_field  # type: ignore[prop-decorator]
    @property
    def engine_name(self) -> str:
        """Versioned, so a new version never reuses engine-side state of an old one."""
        return f"{self.tenant}--{self.name}--v{self.version}"


class AdapterRegistry:
    """Stores and finds tenants' adapters under `<data_dir>/adapters/`.

    The tenant is taken as a string: whether it exists is for the caller (the tenants
    module) to check first; names are only checked for shape here.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.root = self.data_dir / "adapters"

    @cached_property
    def _base(self) -> BaseModules:
        return BaseModules.from_hf_dir(self.settings.resolved_hf_path())

    # ------------------------------------------------------------ writing

    def add(self, tenant: str, name: str, source: Path) -> AdapterRecord:
        """Validate the adapter at `source` (a PEFT dir, .tar.gz or .zip), convert it to
        GGUF and store it as the next version of `tenant`/`name`, which becomes current.

        Raises AdapterRejected, leaving the data dir as it was.
        """
        check_name(tenant, "tenant")
        check_name(name, "adapter")
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
                why = str(exc).replace(f"{built}/", "")  # the temp dir is a server detail
                raise AdapterRejected(
                    "conversion_failed", f"the adapter cannot be converted for llama.cpp: {why}"
                ) from exc
            with self._lock():
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
                )
                (built / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
                final = self._name_dir(tenant, name) / f"v{version}"
                with staged_dir(final) as staged:
                    for file in built.iterdir():
                        os.replace(file, staged / file.name)
                write_atomic(final.parent / CURRENT_FILE, f"v{version}\n", durable=True)
            return self._record(final, manifest)
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
            # One rename takes the whole adapter away; readers never see half a dir.
            trash = self.root / ".trash"
            trash.mkdir(exist_ok=True)
            os.rename(name_dir, trash / f"{tenant}--{name}--{uuid.uuid4().hex}")
            shutil.rmtree(trash, ignore_errors=True)  # also what an interrupted remove left
        return record

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

