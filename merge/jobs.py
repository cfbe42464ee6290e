"""Merge/export jobs: records in the SQLite store, and the runner that executes one.

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

import json
import logging
import os
import shutil
import signal
import sys
import threading
import uuid
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Callable

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


class _Signalled(BaseException):
    """Raised by the SIGTERM handler. A BaseException, like KeyboardInterrupt, so that
    library code catching Exception (mergekit does, around tokenizer copying) cannot
    swallow it and let the job run on."""


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class JobStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    # ------------------------------------------------------------ records

    def create(self, kind: str, spec: dict[str, Any]) -> str:
        job_id = uuid.uuid4().hex[:12]
        self.store.execute(
            "INSERT INTO jobs (id, kind, status, spec, created_at) VALUES (?, ?, 'queued', ?, ?)",
            (job_id, kind, json.dumps(spec), _now()),
        )
        return job_id

    def get(self, job_id: str) -> JobRecord:
        rows = self.store.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(f"no job {job_id!r}; `tuneserve jobs list` shows the jobs")
        return _record(rows[0])

    def list(self, limit: int = 50) -> list[JobRecord]:
        rows = self.store.query("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [_record(r) for r in rows]

    def recover(self) -> list[str]:
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
                    _now(),
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
                self._finish(row["id"], JobStatus.failed, "its process exited before it started")
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
                (_now(), job_id),
            )
            return self.get(job_id)
        self.store.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        row = self.store.query("SELECT pid, pid_start FROM jobs WHERE id = ?", (job_id,))[0]
        if process_alive(row["pid"], row["pid_start"]):
            os.kill(row["pid"], signal.SIGTERM)
        return self.get(job_id)

    # ------------------------------------------------------------ runner side

    def _start(self, job_id: str) -> None:
        pid = os.getpid()
        changed = self.store.execute(
            "UPDATE jobs SET status = 'running', pid = ?, pid_start = ?, started_at = ?, "
            "heartbeat_at = ? WHERE id = ? AND status = 'queued'",
            (pid, process_start_time(pid), _now(), _now(), job_id),
        )
        if not changed:
            raise JobError(f"job {job_id} is {self.get(job_id).status.value}, not queued")

    def _finish(self, job_id: str, status: JobStatus, error: str | None = None, outputs: list[str] | None = None) -> None:
        self.store.execute(
            "UPDATE jobs SET status = ?, error = ?, outputs = COALESCE(?, outputs), "
            "finished_at = ?, progress = CASE WHEN ? = 'succeeded' THEN 1 ELSE progress END, "
            "stage = CASE WHEN ? = 'succeeded' THEN 'done' ELSE stage END, "
            "staging = NULL WHERE id = ?",
            (status.value, error, json.dumps(outputs) if outputs is not None else None, _now(), status.value, status.value, job_id),
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


class JobContext:
    """What a running job's work function uses to report progress, logs and results."""

    def __init__(self, jobs: JobStore, job_id: str, show_progress: bool) -> None:
        self.jobs = jobs
        self.job_id = job_id
        self.report: dict[str, Any] = {}
        self._bar: Any = None
        if show_progress:
            from tqdm import tqdm

            self._bar = tqdm(total=100, unit="%", desc=f"job {job_id}", file=sys.stderr)

    def progress(self, fraction: float, stage: str) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        self.jobs.update(self.job_id, progress=fraction, stage=stage)
        self.jobs.append_log(self.job_id, f"{_now()} {stage}\n")
        if self._bar is not None:
            self._bar.set_description_str(f"job {self.job_id}: {stage}")
            self._bar.n = round(fraction * 100)
            self._bar.refresh()

    def staging(self, path: Path) -> None:
        """Record the temp dir the output is built in, for recover() to delete."""
        self.jobs.update(self.job_id, staging=str(path))

    def add_report(self, **entries: Any) -> None:
        self.report.update(entries)
        self.jobs.update(self.job_id, report=json.dumps(self.report, default=str))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _JobLogHandler(logging.Handler):
    def __init__(self, jobs: JobStore, job_id: str) -> None:
        super().__init__(logging.INFO)
        self.jobs, self.job_id = jobs, job_id
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.jobs.append_log(self.job_id, self.format(record) + "\n")
        except Exception:  # a log line must never fail the job
            self.handleError(record)


def submit(jobs: JobStore, kind: str, spec: dict[str, Any]) -> str:
    """Create a queued job owned by this process (recover() fails it if we die first)."""
    pid = os.getpid()
    return jobs.create(kind, {**spec, "_creator_pid": pid, "_creator_start": process_start_time(pid)})


def run_job(
    jobs: JobStore,
    job_id: str,
    work: Callable[[JobContext], list[str]],
    show_progress: bool | None = None,
) -> JobRecord:
    """Run `work` as job `job_id` in this process; return the final record.

    Raises JobError (after recording it) when the job fails or is cancelled."""
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    ctx = JobContext(jobs, job_id, show_progress)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                jobs.update(job_id, heartbeat_at=_now())
            except Exception:  # the store is busy: the next beat will do
                log.debug("heartbeat failed", exc_info=True)

    # Python runs signal handlers in the main thread, but the kernel hands a
    # process-directed SIGTERM to any thread that does not block it, so a signal mask
    # set here cannot hold a cancel back. The handler itself waits instead: until the
    # `try` below is armed, a SIGTERM is only remembered (a cancel sent the moment the
    # row says "running" used to escape as a raw _Signalled, or kill a loaded machine's
    # run between `_start` and the `try`).
    armed = False
    pending: list[int] = []

    def on_sigterm(signum: int, _frame: Any) -> None:
        if not armed:
            pending.append(signum)
            return
        raise _Signalled(signum)

    beat = threading.Thread(target=heartbeat, name=f"job-{job_id}-heartbeat", daemon=True)
    in_main = threading.current_thread() is threading.main_thread()
    # Installed before the job shows as running, so a cancel's SIGTERM always finds it.
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    try:
        jobs._start(job_id)
    except BaseException:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        raise
    handler = _JobLogHandler(jobs, job_id)
    root = logging.getLogger()
    try:
        armed = True
        if pending:
            raise _Signalled(pending[0])
        beat.start()
        root.addHandler(handler)
        if jobs.cancel_requested(job_id):
            raise JobCancelled(f"job {job_id} cancelled")
        outputs = work(ctx)
        ctx.progress(1.0, "done")
        jobs._finish(job_id, JobStatus.succeeded, outputs=outputs)
    except (JobCancelled, _Signalled) as exc:
        if isinstance(exc, JobCancelled) or jobs.cancel_requested(job_id):
            jobs._finish(job_id, JobStatus.cancelled, f"job {job_id} cancelled")
            raise JobError(f"job {job_id} cancelled; nothing was published") from None
        why = f"interrupted by signal {exc.args[0]}; nothing was published"
        jobs._finish(job_id, JobStatus.failed, why)
        raise JobError(f"job {job_id} {why}") from None
    except KeyboardInterrupt:
        jobs._finish(job_id, JobStatus.failed, "interrupted (Ctrl-C); nothing was published")
        raise
    except TuneserveError as exc:
        jobs._finish(job_id, JobStatus.failed, str(exc))
        raise JobError(f"job {job_id} failed: {exc}") from exc
    except BaseException as exc:
        jobs._finish(job_id, JobStatus.failed, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        root.removeHandler(handler)
        stop.set()
        ctx.close()
    return jobs.get(job_id)
