"""`tuneserve jobs`: list, show, cancel and re-run merge/export jobs."""

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
    for action, handler in ((list_, run_list), (show, run_show), (cancel, run_cancel), (rerun, run_rerun)):
        if action is not list_:
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
