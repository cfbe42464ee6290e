"""Append-only audit trail: who did what to which tenant or adapter, and how it ended.

Where it is written follows the store: `<data_dir>/audit.log` on the embedded default
(FileAuditLog), table `audit` when `store.url` is PostgreSQL (DatabaseAuditLog), so
that the gateways of several machines keep one trail and none needs a shared file.

In the file, each record opens the file with O_APPEND, takes an exclusive `flock`, writes its
line, fsyncs and closes. The lock is what keeps lines whole across threads and
processes: O_APPEND alone places each write at the end, but a short write (disk
nearly full, a signal) would need a second write that another writer could
interleave. Opening per record gives each call its own open file description, so
the flock excludes threads of one process as well as other processes, and a log
moved away by rotation is simply recreated. Audited actions are rare; the fsync
dominates the cost either way.

Records never carry API keys; callers pass key ids.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from tuneserve.errors import TuneserveError

if TYPE_CHECKING:
    from tuneserve.config import Settings
    from tuneserve.db.base import Store

AUDIT_FILENAME = "audit.log"
_FIELDS = ("ts", "actor", "action", "target", "result")


def audit_path(data_dir: Path) -> Path:
    return data_dir / AUDIT_FILENAME


class AuditLog(ABC):
    def record(self, actor: str, action: str, target: str, result: str, **details: Any) -> None:
        """Append `{"ts", "actor", "action", "target", "result", **details}` durably.
        Blocking (an fsync, or a round trip to the database): the gateway calls it from
        a worker thread."""
        clash = set(details) & set(_FIELDS)
        if clash:
            raise TypeError(f"audit details may not override {sorted(clash)}")
        entry = {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "actor": actor,
            "action": action,
            "target": target,
            "result": result,
            # default=str keeps an odd detail from losing the record.
            **json.loads(json.dumps(details, default=str)),
        }
        self._append(entry)

    @abstractmethod
    def _append(self, entry: dict[str, Any]) -> None: ...

    @contextlib.contextmanager
    def recording(
        self, actor: str, action: str, target: str, **details: Any
    ) -> Iterator[dict[str, Any]]:
        """Record the block's outcome: result "ok", "refused" (a TuneserveError: the
        request was turned down) or "failed" (anything else), with the error's message
        (and the error re-raised). The block may add details to the yielded dict."""
        extra: dict[str, Any] = {}
        try:
            yield extra
        except Exception as exc:
            result = "refused" if isinstance(exc, TuneserveError) else "failed"
            self.record(actor, action, target, result, **{**details, **extra, "error": str(exc)})
            raise
        self.record(actor, action, target, "ok", **{**details, **extra})


class FileAuditLog(AuditLog):
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, entry: dict[str, Any]) -> None:
        # json.dumps escapes newlines inside strings, so a record is always one line.
        line = (json.dumps(entry) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock


class DatabaseAuditLog(AuditLog):
    """Rows of table `audit`; the details as one JSON document (jsonb on PostgreSQL)."""

    def __init__(self, store: "Store") -> None:
        self.store = store

    def _append(self, entry: dict[str, Any]) -> None:
        fields = [entry[name] for name in _FIELDS]
        details = json.dumps({k: v for k, v in entry.items() if k not in _FIELDS})
        self.store.execute(
            "INSERT INTO audit (ts, actor, action, target, result, details) VALUES (?, ?, ?, ?, ?, ?)",
            (*fields, details),
        )

    def entries(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest `limit` records, oldest first, as the file's lines read."""
        rows = self.store.query(
            "SELECT ts, actor, action, target, result, details FROM audit ORDER BY id DESC LIMIT ?", (limit,)
        )
        out = []
        for row in reversed(rows):
            details = row["details"]
            out.append({**{name: row[name] for name in _FIELDS},
                        **(json.loads(details) if isinstance(details, str) else details)})
        return out


def open_audit_log(settings: "Settings", store: "Store | None" = None) -> AuditLog:
    """The trail the configured store implies; `store` is one already open for it."""
    from tuneserve.db.factory import is_shared

    if not is_shared(settings):
        return FileAuditLog(audit_path(settings.data_dir))
    if store is None:
        from tuneserve.db import open_store

        store = open_store(settings)
    return DatabaseAuditLog(store)
