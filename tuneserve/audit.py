"""Append-only audit log (`<data_dir>/audit.log`): one JSON object per line.

Each record opens the file with O_APPEND, takes an exclusive `flock`, writes its
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from tuneserve.errors import TuneserveError

AUDIT_FILENAME = "audit.log"
_FIELDS = ("ts", "actor", "action", "target", "result")


def audit_path(data_dir: Path) -> Path:
    return data_dir / AUDIT_FILENAME


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, actor: str, action: str, target: str, result: str, **details: Any) -> None:
        """Append `{"ts", "actor", "action", "target", "result", **details}` durably."""
        clash = set(details) & set(_FIELDS)
        if clash:
            raise TypeError(f"audit details may not override {sorted(clash)}")
        entry = {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "actor": actor,
            "action": action,
            "target": target,
            "result": result,
            **details,
        }
        # json.dumps escapes newlines inside strings, so a record is always one line;
        # default=str keeps an odd detail from losing the record.
        line = (json.dumps(entry, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock

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
