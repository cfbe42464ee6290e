"""Jobs (merges, exports, ...): their records in the SQLite store.

A job runs in the process of the CLI command that started it. The row records that
process (pid and its start time, so a recycled pid is not mistaken for it) and a
heartbeat. Any later job command first calls `JobStore.recover()`, which marks
"running" jobs whose process is gone as failed and deletes their staging dir: a crash,
SIGKILL or reboot never leaves a job "running" or a half-written output behind.

Cancel: `tuneserve jobs cancel` flags the row and sends SIGTERM to the job's process;
the runner turns that signal into `JobCancelled` in the main thread, so the staged
output is discarded by the same `finally` blocks as any failure.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import signal
import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel

from tuneserve.errors import TuneserveError
from tuneserve.processes import process_alive, process_start_time
from tuneserve.store import Store

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
MAX_LOG_CHARS = 256_000


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}


class JobNotFound(TuneserveError):
    pass


class JobCancelled(TuneserveError):
    pass


class JobError(TuneserveError):
    """A job ended without success; the message says how, the job id and why."""


class JobRecord(BaseModel):
    id: str
    kind: str
    status: JobStatus
    spec: dict[str, Any]
    progress: float
    stage: str
    log: str
    outputs: list[str]
    report: dict[str, Any]
    error: str | None
    pid: int | None
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None

    def summary(self) -> dict[str, Any]:
        """What `jobs list` shows: everything but the log, spec and report."""
        return self.model_dump(mode="json", exclude={"log", "spec", "report"})


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


class JobStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    # ------------------------------------------------------------ records

    def create(self, kind: str, spec: dict[str, Any]) -> str:
        job_id = uuid.uuid4().hex[:12]
        self.store.execute(
            "INSERT INTO jobs (id, kind, status, spec, created_at) VALUES (?, ?, 'queued', ?, ?)",
            (job_id, kind, json.dumps(spec), utc_now()),
        )
        return job_id

    def get(self, job_id: str) -> JobRecord:
        rows = self.store.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(f"no job {job_id!r}; `tuneserve jobs list` shows the jobs")
        return _record(rows[0])

    def list(self, limit: int = 50) -> "builtins.list[JobRecord]":
        rows = self.store.query("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [_record(r) for r in rows]

    def recover(self) -> "builtins.list[str]":
        """Mark running jobs whose process is gone as failed; return their ids."""
        failed = []
        for row in self.store.query(
            "SELECT id, pid, pid_start, staging FROM jobs WHERE status = 'running'"
        ):
            if process_alive(row["pid"], row["pid_start"]):
                continue
            changed = self.store.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? "
                "WHERE id = ? AND status = 'running' AND pid IS ?",
                (
                    utc_now(),
                    f"the job's process (pid {row['pid']}) died while it ran (killed or "
                    f"crashed); nothing was published. Re-run it: tuneserve jobs rerun {row['id']}",
                    row["id"],
                    row["pid"],
                ),
            )
            if changed:
                if row["staging"]:
                    shutil.rmtree(row["staging"], ignore_errors=True)
                failed.append(row["id"])
        # Queued jobs whose creator died before starting them can never run.
        for row in self.store.query("SELECT id, spec FROM jobs WHERE status = 'queued'"):
            pid = json.loads(row["spec"]).get("_creator_pid")
            start = json.loads(row["spec"]).get("_creator_start")
            if pid is not None and not process_alive(pid, start):
                self.mark_finished(row["id"], JobStatus.failed, "its process exited before it started")
                failed.append(row["id"])
        return failed

    def request_cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.status in TERMINAL:
            raise JobError(f"job {job_id} already {job.status.value}; nothing to cancel")
        if job.status is JobStatus.queued:
            self.store.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, error = 'cancelled' "
                "WHERE id = ? AND status = 'queued'",
                (utc_now(), job_id),
            )
            return self.get(job_id)
        self.store.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        row = self.store.query("SELECT pid, pid_start FROM jobs WHERE id = ?", (job_id,))[0]
        if process_alive(row["pid"], row["pid_start"]):
            os.kill(row["pid"], signal.SIGTERM)
        return self.get(job_id)

    # ------------------------------------------------------------ runner side

    def mark_running(self, job_id: str) -> None:
        """Claim a queued job for this process."""
        pid = os.getpid()
        changed = self.store.execute(
            "UPDATE jobs SET status = 'running', pid = ?, pid_start = ?, started_at = ?, "
            "heartbeat_at = ? WHERE id = ? AND status = 'queued'",
            (pid, process_start_time(pid), utc_now(), utc_now(), job_id),
        )
        if not changed:
            raise JobError(f"job {job_id} is {self.get(job_id).status.value}, not queued")

    def mark_finished(self, job_id: str, status: JobStatus, error: str | None = None, outputs: "builtins.list[str] | None" = None) -> None:
        self.store.execute(
            "UPDATE jobs SET status = ?, error = ?, outputs = COALESCE(?, outputs), "
            "finished_at = ?, progress = CASE WHEN ? = 'succeeded' THEN 1 ELSE progress END, "
            "stage = CASE WHEN ? = 'succeeded' THEN 'done' ELSE stage END, "
            "staging = NULL WHERE id = ?",
            (status.value, error, json.dumps(outputs) if outputs is not None else None, utc_now(), status.value, status.value, job_id),
        )

    def update(self, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        columns = ", ".join(f"{name} = ?" for name in fields)
        self.store.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))

    def append_log(self, job_id: str, text: str) -> None:
        # substr keeps the newest MAX_LOG_CHARS: a chatty job cannot grow the row forever.
        self.store.execute(
            "UPDATE jobs SET log = substr(log || ?, -?) WHERE id = ?", (text, MAX_LOG_CHARS, job_id)
        )

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.store.query("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))[0][0])


def _record(row: Any) -> JobRecord:
    data = dict(row)
    for key in ("spec", "outputs", "report"):
        data[key] = json.loads(data[key])
    data["spec"] = {k: v for k, v in data["spec"].items() if not k.startswith("_")}
    return JobRecord(**{k: v for k, v in data.items() if k in JobRecord.model_fields})
