"""Jobs (merges, exports, ...): their records in the store (SQLite or PostgreSQL).

A job runs in the process of the CLI command that started it, on any machine sharing
the database. Starting it claims the queued row (`mark_running`: on PostgreSQL the row
is locked with SKIP LOCKED, on SQLite the write lock serialises claims), so two
runners never both run one job. The row records its owner (lease.py: host, pid and
its start time, a nonce) and a lease the heartbeat renews. Any later job command
first calls `JobStore.recover()`, which fails the queued and running jobs whose owner
is gone (on this host: its process is dead; elsewhere: its lease expired) and deletes
their staging dir: a crash, SIGKILL, reboot or lost machine never leaves a job
"running" or a half-written output behind. `tuneserve jobs rerun` runs one again.

Cancel: `tuneserve jobs cancel` flags the row; on the owner's host it also sends
SIGTERM to the job's process at once, elsewhere the owner's heartbeat sees the flag
and signals itself. The runner turns that signal into `JobCancelled` in the main
thread, so the staged output is discarded by the same `finally` blocks as any failure.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import signal
import time
import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel

from tuneserve.db import Store
from tuneserve.errors import TuneserveError
from tuneserve.jobs.lease import Owner, lease_until, new_owner, parse_owner
from tuneserve.processes import process_alive, process_start_time

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
_NOT_TERMINAL = "status IN ('queued', 'running')"


class Lease(str, Enum):
    """What a heartbeat found (JobStore.renew)."""

    held = "held"
    cancel = "cancel"  # held, and a cancel was requested
    lost = "lost"  # the job is no longer ours: another instance failed it


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
        # Who this store's jobs belong to: the jobs it creates and the ones it claims.
        self.owner: Owner = new_owner()

    # ------------------------------------------------------------ records

    def create(self, kind: str, spec: dict[str, Any], for_any_worker: bool = False) -> str:
        """A queued job owned by this store's owner until it runs (recover() fails it
        if the owner dies first); with `for_any_worker`, owned by nobody until a worker
        (`tuneserve jobs worker`, on any machine) claims it with claim_next()."""
        job_id = uuid.uuid4().hex[:12]
        owner, lease = (None, None) if for_any_worker else (str(self.owner), lease_until())
        self.store.execute(
            "INSERT INTO jobs (id, kind, status, spec, created_at, owner, lease_expires_at) "
            "VALUES (?, ?, 'queued', ?, ?, ?, ?)",
            (job_id, kind, json.dumps(spec), utc_now(), owner, lease),
        )
        return job_id

    def claim_next(self) -> str | None:
        """Take the oldest job queued for any worker: it becomes this owner's (leased, so
        recover() fails it if this process dies before running it); None when none waits.
        Concurrent workers each get a different job: on PostgreSQL the row one worker
        holds is skipped by the others (SKIP LOCKED), not waited for."""
        with self.store.transaction() as tx:
            rows = tx.query(
                "SELECT id FROM jobs WHERE status = 'queued' AND owner IS NULL "
                f"ORDER BY created_at, id LIMIT 1{self.store.skip_locked}"
            )
            if not rows:
                return None
            job_id = str(rows[0]["id"])
            tx.execute(
                "UPDATE jobs SET owner = ?, lease_expires_at = ? WHERE id = ? AND status = 'queued' AND owner IS NULL",
                (str(self.owner), lease_until(), job_id),
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
        """Fail queued and running jobs whose owner is gone; return their ids."""
        failed = []
        now = time.time()
        rows = self.store.query(
            "SELECT id, status, owner, lease_expires_at, pid, pid_start, staging, spec "
            f"FROM jobs WHERE {_NOT_TERMINAL}"
        )
        for row in rows:
            why = _why_gone(row, now)
            if why is None:
                continue
            # Only if nothing changed meanwhile (the owner renewed, or finished, or
            # another instance got here first): the owner and lease in the row are
            # still the ones judged gone.
            changed = self.store.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = ?, staging = NULL "
                "WHERE id = ? AND status = ? AND COALESCE(owner, '') = ? "
                "AND COALESCE(lease_expires_at, 0) = ?",
                (utc_now(), why, row["id"], row["status"], row["owner"] or "", row["lease_expires_at"] or 0),
            )
            if changed:
                if row["staging"]:
                    shutil.rmtree(row["staging"], ignore_errors=True)
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
        row = self.store.query("SELECT owner, pid, pid_start FROM jobs WHERE id = ?", (job_id,))[0]
        owner = parse_owner(row["owner"])
        # Elsewhere, the owner's next heartbeat sees the flag and signals itself.
        if (owner is None or owner.is_local()) and process_alive(row["pid"], row["pid_start"]):
            os.kill(row["pid"], signal.SIGTERM)
        return self.get(job_id)

    # ------------------------------------------------------------ runner side

    def mark_running(self, job_id: str) -> None:
        """Claim a queued job for this store's owner; JobError if it is not there to claim."""
        pid = os.getpid()
        with self.store.transaction() as tx:
            # SKIP LOCKED: a runner claiming it at this moment holds the row, and this
            # one gives up at once instead of waiting to find it running.
            claimable = tx.query(
                f"SELECT id FROM jobs WHERE id = ? AND status = 'queued'{self.store.skip_locked}",
                (job_id,),
            )
            changed = bool(claimable) and tx.execute(
                "UPDATE jobs SET status = 'running', pid = ?, pid_start = ?, started_at = ?, "
                "heartbeat_at = ?, owner = ?, lease_expires_at = ? WHERE id = ? AND status = 'queued'",
                (pid, process_start_time(pid), utc_now(), utc_now(), str(self.owner), lease_until(), job_id),
            ) > 0
        if not changed:
            status = self.get(job_id).status
            if status is JobStatus.queued:
                raise JobError(f"job {job_id} is being claimed by another runner")
            raise JobError(f"job {job_id} is {status.value}, not queued")

    def renew(self, job_id: str) -> Lease:
        """The heartbeat: extend this owner's lease on a running job."""
        rows = self.store.query(
            "UPDATE jobs SET heartbeat_at = ?, lease_expires_at = ? "
            "WHERE id = ? AND owner = ? AND status = 'running' RETURNING cancel_requested",
            (utc_now(), lease_until(), job_id, str(self.owner)),
        )
        if not rows:
            return Lease.lost
        return Lease.cancel if rows[0]["cancel_requested"] else Lease.held

    def mark_finished(self, job_id: str, status: JobStatus, error: str | None = None, outputs: "builtins.list[str] | None" = None) -> None:
        # A finished job stays as it ended: a runner that lost its lease (failed by
        # recover() elsewhere) cannot turn the record back into a success.
        self.store.execute(
            "UPDATE jobs SET status = ?, error = ?, outputs = COALESCE(?, outputs), "
            "finished_at = ?, progress = CASE WHEN ? = 'succeeded' THEN 1 ELSE progress END, "
            "stage = CASE WHEN ? = 'succeeded' THEN 'done' ELSE stage END, "
            f"staging = NULL WHERE id = ? AND {_NOT_TERMINAL}",
            (status.value, error, json.dumps(outputs) if outputs is not None else None, utc_now(), status.value, status.value, job_id),
        )

    def update(self, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        columns = ", ".join(f"{name} = ?" for name in fields)
        self.store.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))

    def append_log(self, job_id: str, text: str) -> None:
        # Keeps the newest MAX_LOG_CHARS: a chatty job cannot grow the row forever.
        # (substr with a positive start: SQLite and PostgreSQL read a negative one apart.)
        self.store.execute(
            "UPDATE jobs SET log = CASE WHEN length(log) + length(?) > ? "
            "THEN substr(log || ?, length(log) + length(?) - ? + 1) ELSE log || ? END WHERE id = ?",
            (text, MAX_LOG_CHARS, text, text, MAX_LOG_CHARS, text, job_id),
        )

    def cancel_requested(self, job_id: str) -> bool:
        rows = self.store.query("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
        return bool(rows[0]["cancel_requested"])


def _record(row: Any) -> JobRecord:
    data = dict(row)
    for key in ("spec", "outputs", "report"):
        data[key] = json.loads(data[key])
    data["spec"] = {k: v for k, v in data["spec"].items() if not k.startswith("_")}
    return JobRecord(**{k: v for k, v in data.items() if k in JobRecord.model_fields})


def _why_gone(row: Any, now: float) -> str | None:
    """Why the job's owner counts as gone (the job's error), or None while it lives."""
    owner = parse_owner(row["owner"])
    if owner is None:  # recorded before owners were: a local pid, as it always was
        if row["status"] == JobStatus.running.value:
            alive = process_alive(row["pid"], row["pid_start"])
        else:
            spec = json.loads(row["spec"])
            alive = spec.get("_creator_pid") is None or process_alive(spec["_creator_pid"], spec.get("_creator_start"))
    elif owner.is_local():  # the fast path: the kernel knows at once
        alive = owner.alive_here()
    else:
        alive = (row["lease_expires_at"] or 0) >= now
    if alive:
        return None
    if row["status"] == JobStatus.queued.value:
        return "its process exited before it started"
    if owner is not None and not owner.is_local():
        return (
            f"the job's owner ({owner.host}, pid {owner.pid}) stopped renewing its lease (its "
            "machine or process died); nothing was published. "
            f"Re-run it: tuneserve jobs rerun {row['id']}"
        )
    return (
        f"the job's process (pid {row['pid']}) died while it ran (killed or "
        f"crashed); nothing was published. Re-run it: tuneserve jobs rerun {row['id']}"
    )
