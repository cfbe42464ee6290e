"""Where the adapter registry keeps its truth: which version of each adapter is current,
which numbers were used, and each version's manifest.

Two places, one interface, chosen by the store (`index_for`):
- `FileIndex`, the embedded default: pointer files beside the version dirs
  (`<tenant>/<name>/current`, `<tenant>/.removed.json`) and one `flock` for writers.
  Right for one machine; not across machines (flock over NFS is unreliable).
- `DatabaseIndex` when `store.url` is PostgreSQL: tables `adapters` and
  `adapter_versions` (migration 4), writers serialised per tenant by a transaction-scoped
  advisory lock, so gateways on several machines publish and remove without a shared
  lock file, and every gateway sees a new current version on its next lookup. The
  version dirs stay files (a shared volume, or each gateway's disk plus S3); only the
  metadata moves.

A writer works inside `writing(tenant)`: what it reads there is what it changes, and no
other writer of that tenant runs until it ends. Readers take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
from abc import ABC, abstractmethod
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

from pydantic import BaseModel, ConfigDict

from tuneserve.db.base import Row, Store, Tx
from tuneserve.errors import TuneserveError
from tuneserve.fsutil import write_atomic
from tuneserve.names import is_valid_name

MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "current"
REMOVED_FILE = ".removed.json"
_VERSION_DIR = re.compile(r"v([1-9][0-9]*)")


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


class IndexWriter(ABC):
    """What a writer may do while it holds a tenant's write lock."""

    @abstractmethod
    def current(self, tenant: str, name: str) -> AdapterManifest | None: ...

    @abstractmethod
    def next_version(self, tenant: str, name: str) -> int:
        """One above every number `tenant`/`name` ever had: engines key state on engine
        names, and a re-added adapter must not be served from an old one's."""

    @abstractmethod
    def publish(self, manifest: AdapterManifest) -> None:
        """Make the stored version (its dir already in place) the current one."""

    @abstractmethod
    def remove(self, tenant: str, name: str) -> None:
        """Forget every version of `tenant`/`name`, keeping its numbers used."""

    @abstractmethod
    def remove_tenant(self, tenant: str) -> None:
        """Forget every adapter of `tenant`, numbers included (new tenant, new uids)."""


class RegistryIndex(ABC):
    @abstractmethod
    def writing(self, tenant: str) -> contextlib.AbstractContextManager[IndexWriter]: ...

    @abstractmethod
    def current(self, tenant: str, name: str) -> AdapterManifest | None: ...

    @abstractmethod
    async def acurrent(self, tenant: str, name: str) -> AdapterManifest | None:
        """current() for the gateway's event loop (the lookup of every adapter request)."""

    @abstractmethod
    def list_current(self, tenant: str | None = None) -> list[AdapterManifest]:
        """Current versions (of `tenant`, if given), by tenant and name."""


def versions_in(name_dir: Path) -> list[int]:
    if not name_dir.is_dir():
        return []
    return [int(m[1]) for p in name_dir.iterdir() if (m := _VERSION_DIR.fullmatch(p.name))]


def names_in(directory: Path) -> list[str]:
    """Sub-dirs that are tenant or adapter names (skips .lock, .trash, temp dirs)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and is_valid_name(p.name))


# ---------------------------------------------------------------- files (embedded default)


class FileIndex(RegistryIndex):
    def __init__(self, root: Path) -> None:
        self.root = root

    @contextlib.contextmanager
    def writing(self, tenant: str) -> Iterator[IndexWriter]:
        # One lock for all tenants: writes are rare, and tenant removal renames dirs
        # that another tenant's writer never touches anyway.
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield _FileWriter(self)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def current(self, tenant: str, name: str) -> AdapterManifest | None:
        name_dir = self.root / tenant / name
        try:
            current = (name_dir / CURRENT_FILE).read_text().strip()
            if not _VERSION_DIR.fullmatch(current):
                raise TuneserveError(f"{name_dir / CURRENT_FILE} is corrupt: {current!r}")
            return AdapterManifest.model_validate_json((name_dir / current / MANIFEST_FILE).read_text())
        except FileNotFoundError:  # never added, or removed while we read
            return None

    async def acurrent(self, tenant: str, name: str) -> AdapterManifest | None:
        # Two small reads of the local page cache: cheaper than a thread hop.
        return self.current(tenant, name)

    def list_current(self, tenant: str | None = None) -> list[AdapterManifest]:
        tenants = ([tenant] if is_valid_name(tenant) else []) if tenant is not None else names_in(self.root)
        found = (self.current(owner, name) for owner in tenants for name in names_in(self.root / owner))
        return [manifest for manifest in found if manifest is not None]

    def removed(self, tenant: str) -> dict[str, int]:
        try:
            return json.loads((self.root / tenant / REMOVED_FILE).read_text())
        except FileNotFoundError:
            return {}


class _FileWriter(IndexWriter):
    def __init__(self, index: FileIndex) -> None:
        self.index = index

    def current(self, tenant: str, name: str) -> AdapterManifest | None:
        return self.index.current(tenant, name)

    def next_version(self, tenant: str, name: str) -> int:
        existing = versions_in(self.index.root / tenant / name)
        return max([0, *existing, self.index.removed(tenant).get(name, 0)]) + 1

    def publish(self, manifest: AdapterManifest) -> None:
        name_dir = self.index.root / manifest.tenant / manifest.name
        write_atomic(name_dir / CURRENT_FILE, f"v{manifest.version}\n", durable=True)

    def remove(self, tenant: str, name: str) -> None:
        # The registry then discards the name dir, `current` with it.
        removed = self.index.removed(tenant)
        removed[name] = self.next_version(tenant, name) - 1
        payload = json.dumps(removed, indent=2) + "\n"
        write_atomic(self.index.root / tenant / REMOVED_FILE, payload, durable=True)

    def remove_tenant(self, tenant: str) -> None:
        pass  # .removed.json goes with the tenant dir the registry discards


# ---------------------------------------------------------------- database (several gateways)

# Namespace of the advisory locks (the first key of pg_advisory_xact_lock(int, int)),
# so ours never meet another application's on a shared database.
_ADVISORY_NAMESPACE = 0x7473_6164  # "tsad"

_CURRENT = (
    "SELECT v.manifest FROM adapters a JOIN adapter_versions v"
    " ON v.tenant = a.tenant AND v.name = a.name AND v.version = a.current_version"
)


def _manifest(rows: Sequence[Row]) -> AdapterManifest | None:
    return AdapterManifest.model_validate_json(rows[0]["manifest"]) if rows else None


class DatabaseIndex(RegistryIndex):
    def __init__(self, store: Store) -> None:
        self.store = store

    @contextlib.contextmanager
    def writing(self, tenant: str) -> Iterator[IndexWriter]:
        with self.store.transaction() as tx:
            if self.store.dialect == "postgresql":
                # Held until the transaction ends, released by the server if this
                # process dies: no lock file, no stale lock.
                tx.query("SELECT pg_advisory_xact_lock(?, hashtext(?))", (_ADVISORY_NAMESPACE, tenant))
            yield _DatabaseWriter(tx)

    def current(self, tenant: str, name: str) -> AdapterManifest | None:
        return _manifest(self.store.query(f"{_CURRENT} WHERE a.tenant = ? AND a.name = ?", (tenant, name)))

    async def acurrent(self, tenant: str, name: str) -> AdapterManifest | None:
        return _manifest(await self.store.aquery(f"{_CURRENT} WHERE a.tenant = ? AND a.name = ?", (tenant, name)))

    def list_current(self, tenant: str | None = None) -> list[AdapterManifest]:
        where, params = (" WHERE a.tenant = ?", (tenant,)) if tenant is not None else ("", ())
        rows = self.store.query(f"{_CURRENT}{where} ORDER BY a.tenant, a.name", params)
        return [AdapterManifest.model_validate_json(row["manifest"]) for row in rows]

    def stored_uids(self, tenant: str | None = None) -> dict[tuple[str, str, int], str | None]:
        """(tenant, name, version) -> uid of every version stored (of `tenant`), current or older."""
        where, params = (" WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
        rows = self.store.query(f"SELECT tenant, name, version, uid FROM adapter_versions{where}", params)
        return {(row["tenant"], row["name"], int(row["version"])): row["uid"] for row in rows}


class _DatabaseWriter(IndexWriter):
    def __init__(self, tx: Tx) -> None:
        self.tx = tx

    def current(self, tenant: str, name: str) -> AdapterManifest | None:
        return _manifest(self.tx.query(f"{_CURRENT} WHERE a.tenant = ? AND a.name = ?", (tenant, name)))

    def next_version(self, tenant: str, name: str) -> int:
        rows = self.tx.query("SELECT last_version FROM adapters WHERE tenant = ? AND name = ?", (tenant, name))
        # Local dirs do not count: another machine's disk may hold what this one left
        # (a removed tenant's, a publish whose commit failed), and the dir a number is
        # published under replaces whatever this disk still had there (a new uid, so
        # never served as the old one). sweep_local() removes such leftovers.
        return (int(rows[0]["last_version"]) if rows else 0) + 1

    def publish(self, manifest: AdapterManifest) -> None:
        self.tx.execute(
            "INSERT INTO adapter_versions (tenant, name, version, uid, sha256, size_bytes, manifest, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (manifest.tenant, manifest.name, manifest.version, manifest.uid, manifest.sha256,
             manifest.size_bytes, manifest.model_dump_json(), manifest.created_at.isoformat()),
        )
        self.tx.execute(
            "INSERT INTO adapters (tenant, name, current_version, last_version) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (tenant, name) DO UPDATE"
            " SET current_version = excluded.current_version, last_version = excluded.last_version",
            (manifest.tenant, manifest.name, manifest.version, manifest.version),
        )

    def remove(self, tenant: str, name: str) -> None:
        self.tx.execute("DELETE FROM adapter_versions WHERE tenant = ? AND name = ?", (tenant, name))
        self.tx.execute("UPDATE adapters SET current_version = NULL WHERE tenant = ? AND name = ?", (tenant, name))

    def remove_tenant(self, tenant: str) -> None:
        self.tx.execute("DELETE FROM adapter_versions WHERE tenant = ?", (tenant,))
        self.tx.execute("DELETE FROM adapters WHERE tenant = ?", (tenant,))


def index_for(store: Store | None, root: Path) -> RegistryIndex:
    """The database when it is shared (PostgreSQL), the files beside the versions otherwise."""
    if store is not None and store.dialect == "postgresql":
        return DatabaseIndex(store)
    return FileIndex(root)
