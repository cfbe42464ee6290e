"""`tuneserve merge CONFIG.yaml --out DIR`: a mergekit merge or an adapter operation, as a job."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tuneserve.cli.jobs_cmd import open_jobs
from tuneserve.cli.options import add_settings_arguments, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "merge",
        help="run a mergekit merge or an adapter merge/combination job",
        description="CONFIG is a mergekit config (the file mergekit-yaml takes; a model may be "
        "BASE+ADAPTER) or an adapter operation (operation: merge_adapter | combine_adapters). "
        "It is validated before anything is loaded; the output is built in a temp dir and "
        "renamed to --out when complete. Prints the finished job as JSON.",
    )
    parser.add_argument("merge_config", metavar="CONFIG", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output dir (must not exist)")
    parser.add_argument(
        "--shard-size", default="1B", help="largest output shard (mergekit out_shard_size) [default: 1B]"
    )
    parser.add_argument(
        "--queue", action="store_true",
        help="only queue the job for `tuneserve jobs worker` (any machine sharing the database "
        "and these paths); print it and exit",
    )
    add_settings_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from merge.config import read_yaml
    from merge.tasks import merge_spec, queue_new, run_new

    settings = settings_from_args(args)
    raw = read_yaml(args.merge_config)
    kind, spec = merge_spec(raw, str(args.merge_config), args.out, settings, args.shard_size)
    with open_jobs(args) as jobs:
        record = queue_new(jobs, kind, spec) if args.queue else run_new(jobs, kind, spec, settings)
    print(json.dumps({**record.summary(), "report": record.report}, indent=2))
    return 0
