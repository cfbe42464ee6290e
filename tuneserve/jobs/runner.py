"""The runner that executes one job in the calling process: heartbeat (which renews the
job's lease), progress, log, cancel by SIGTERM, and the record's final state whatever
happens (see store.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from tuneserve.errors import TuneserveError
from tuneserve.jobs.store import HEARTBEAT_S, JobCancelled, JobError, JobRecord, JobStatus, JobStore, Lease, utc_now

log = logging.getLogger(__name__)

# The error of a job a SIGTERM ended without a cancel (a pod or service stopping).
INTERRUPTED_BY_SIGTERM = "interrupted by SIGTERM; nothing was published"


class _Signalled(BaseException):
    """Raised by the SIGTERM handler. A BaseException, like KeyboardInterrupt, so that
    library code catching Exception (mergekit does, around tokenizer copying) cannot
    swallow it and let the job run on."""


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
        self.jobs.append_log(self.job_id, f"{utc_now()} {stage}\n")
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
    return jobs.create(kind, spec)


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
                lease = jobs.renew(job_id)
            except Exception:  # the store is busy: the next beat will do (the lease is long)
                log.debug("heartbeat failed", exc_info=True)
                continue
            if lease is Lease.lost:
                log.warning("job %s: lease lost (failed by another instance); stopping it", job_id)
            if lease is not Lease.held:
                # A cancel from another machine (whose SIGTERM cannot reach us), or a
                # lost lease: stop the work as a local cancel does. Only while the
                # handler is installed and armed (the lock keeps `finally` from
                # restoring the previous handler in between): a SIGTERM outside that
                # would end the process. Once: a local cancel has signalled already.
                with signals.lock:
                    if in_main and signals.armed and not signals.received and not stop.is_set():
                        os.kill(os.getpid(), signal.SIGTERM)
            if lease is Lease.lost:
                return

    # Python runs signal handlers in the main thread, but the kernel hands a
    # process-directed SIGTERM to any thread that does not block it, so a signal mask
    # set here cannot hold a cancel back. The handler itself waits instead: until the
    # `try` below is armed, a SIGTERM is only remembered (a cancel sent the moment the
    # row says "running" used to escape as a raw _Signalled, or kill a loaded machine's
    # run between `mark_running` and the `try`). Every SIGTERM is remembered, armed or
    # not: library code may turn the _Signalled it was interrupted by into an exception
    # of its own, and the job must still end as the cancel it was.
    signals = _SignalState()

    def on_sigterm(signum: int, _frame: Any) -> None:
        signals.received.append(signum)
        if signals.armed:
            signals.armed = False  # one interruption per run: the recording below must finish
            raise _Signalled(signum)

    beat = threading.Thread(target=heartbeat, name=f"job-{job_id}-heartbeat", daemon=True)
    in_main = threading.current_thread() is threading.main_thread()
    # Installed before the job shows as running, so a cancel's SIGTERM always finds it.
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    try:
        jobs.mark_running(job_id)
    except BaseException:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        raise
    handler = _JobLogHandler(jobs, job_id)
    root = logging.getLogger()
    try:
        signals.armed = True
        if signals.received:
            signals.armed = False
            raise _Signalled(signals.received[0])
        beat.start()
        root.addHandler(handler)
        if jobs.cancel_requested(job_id):
            raise JobCancelled(f"job {job_id} cancelled")
        outputs = work(ctx)
        signals.armed = False
        if signals.received:  # swallowed by library code, and the work then finished
            jobs.append_log(job_id, f"{utc_now()} a SIGTERM arrived but the work had already published\n")
        ctx.progress(1.0, "done")
        jobs.mark_finished(job_id, JobStatus.succeeded, outputs=outputs)
    except BaseException as exc:
        signals.armed = False
        _record_failure(jobs, job_id, exc, signalled=bool(signals.received))
        raise
    finally:
        with signals.lock:
            stop.set()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        root.removeHandler(handler)
        ctx.close()
    return jobs.get(job_id)


class _SignalState:
    def __init__(self) -> None:
        self.armed = False
        self.received: list[int] = []
        self.lock = threading.Lock()  # the heartbeat's self-signal against the handler's restore


def _record_failure(jobs: JobStore, job_id: str, exc: BaseException, signalled: bool) -> None:
    """Record why the run ended and raise what the caller should see: JobError for a
    cancel, a signal or a TuneserveError; other exceptions propagate as they are."""
    if isinstance(exc, KeyboardInterrupt):
        jobs.mark_finished(job_id, JobStatus.failed, "interrupted (Ctrl-C); nothing was published")
        return
    if signalled and not isinstance(exc, (_Signalled, JobCancelled)):
        # What the work raised once the signal cut into it (kept for whoever debugs it).
        jobs.append_log(job_id, f"{utc_now()} after SIGTERM: {type(exc).__name__}: {exc}\n")
    if isinstance(exc, JobCancelled) or (signalled and jobs.cancel_requested(job_id)):
        jobs.mark_finished(job_id, JobStatus.cancelled, f"job {job_id} cancelled")
        raise JobError(f"job {job_id} cancelled; nothing was published") from None
    if signalled:
        why = INTERRUPTED_BY_SIGTERM
        jobs.mark_finished(job_id, JobStatus.failed, why)
        raise JobError(f"job {job_id} {why}") from None
    if isinstance(exc, TuneserveError):
        jobs.mark_finished(job_id, JobStatus.failed, str(exc))
        raise JobError(f"job {job_id} failed: {exc}") from exc
    jobs.mark_finished(job_id, JobStatus.failed, f"{type(exc).__name__}: {exc}")
