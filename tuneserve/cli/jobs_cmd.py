"""`tuneserve jobs`: list, show, cancel and re-run merge/export jobs; run queued ones.

`tuneserve merge|export ... --queue` only queues a job; `tuneserve jobs worker`, on any
machine that shares the database (and the job's paths), claims queued jobs one at a
time (oldest first; concurrent workers never take the same one) and runs them."""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import TYPE_CHECKING, Iterator

from tuneserve.cli.options import add_settings_arguments, settings_from_args

if TYPE_CHECKING:
    from tuneserve.jobs.store import JobStore


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("jobs", help="list, show, cancel and re-run merge/export jobs")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    list_ = actions.add_parser("list", help="recent jobs, newest first")
    list_.add_argument("--limit", type=int, default=50)
    show = actions.add_parser("show", help="one job with its log, outputs and report")
    cancel = actions.add_parser("cancel", help="cancel a queued or running job")
    rerun = actions.add_parser("rerun", help="run a finished job's spec again as a new job")
    worker = actions.add_parser(
        "worker", help="run queued jobs (merge/export --queue) as they come, one at a time",
        description="Claims the oldest job queued with --queue, runs it, prints its summary as a "
        "JSON line, and goes on; SIGTERM cancels the running job and stops. Workers on several "
        "machines share the queue (store.url on PostgreSQL): each job runs once.",
    )
    worker.add_argument("--once", action="store_true", help="run the jobs queued now, then exit")
    worker.add_argument("--poll-interval", type=float, default=2.0, metavar="S",
                        help="seconds between looks at an empty queue [default: 2]")
    for action, handler in ((list_, run_list), (show, run_show), (cancel, run_cancel), (rerun, run_rerun),
                            (worker, run_worker)):
        if action in (show, cancel, rerun):
            action.add_argument("job_id", metavar="ID")
        add_settings_arguments(action)
        action.set_defaults(handler=handler)


@contextlib.contextmanager
def open_jobs(args: argparse.Namespace) -> Iterator[JobStore]:
    """The job table, after marking jobs whose owner died (or lost its lease) as failed."""
    from tuneserve.db import open_store
    from tuneserve.jobs.store import JobStore

    settings = settings_from_args(args)
    with open_store(settings) as store:
        jobs = JobStore(store)
        jobs.recover()
        yield jobs


def run_list(args: argparse.Namespace) -> int:
    with open_jobs(args) as jobs:
        print(json.dumps([job.summary() for job in jobs.list(args.limit)], indent=2))
    return 0


def run_show(args: argparse.Namespace) -> int:
    with open_jobs(args) as jobs:
        print(jobs.get(args.job_id).model_dump_json(indent=2))
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    with open_jobs(args) as jobs:
        print(json.dumps(jobs.request_cancel(args.job_id).summary(), indent=2))
    return 0


def run_rerun(args: argparse.Namespace) -> int:
    from merge.tasks import rerun

    with open_jobs(args) as jobs:
        print(json.dumps(rerun(jobs, args.job_id, settings_from_args(args)).summary(), indent=2))
    return 0


def run_worker(args: argparse.Namespace) -> int:
    """Exit 0 once stopped or (--once) the queue is empty with every job succeeded; 1 if a
    job failed (--once) or a SIGTERM interrupted one."""
    import logging
    import signal
    import time

    from merge.tasks import run_claimed
    from tuneserve.jobs.runner import INTERRUPTED_BY_SIGTERM

    if args.poll_interval <= 0:
        raise SystemExit("tuneserve jobs worker: --poll-interval must be > 0")
    settings = settings_from_args(args)
    # Between jobs a SIGTERM stops the worker at the next look at the queue; during a
    # job the runner's own handler takes it (a cancel, or the job fails as interrupted).
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    failed = 0
    with open_jobs(args) as jobs:
        while not stopping:
            job_id = jobs.claim_next()
            if job_id is None:
                if args.once:
                    break
                time.sleep(args.poll_interval)
                jobs.recover()  # a worker elsewhere that died holding a job frees it here too
                continue
            try:
                record = run_claimed(jobs, job_id, settings)
            except Exception:  # recorded on the job (JobError, or a bug in its work)
                logging.getLogger("tuneserve.jobs").warning("job %s did not succeed", job_id, exc_info=True)
                record = jobs.get(job_id)
            print(json.dumps(record.summary()), flush=True)
            if record.status.value != "succeeded":
                failed += 1
            if record.error == INTERRUPTED_BY_SIGTERM:
                return 1
    return 1 if failed and args.once else 0
