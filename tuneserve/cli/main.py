"""`tuneserve <command>`: one entry point; each command lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from tuneserve import __version__
from tuneserve.cli import (
    adapters_cmd,
    db_cmd,
    eval_cmd,
    export_cmd,
    jobs_cmd,
    merge_cmd,
    models_cmd,
    serve_cmd,
    tenants_cmd,
    train_cmd,
)
from tuneserve.errors import TuneserveError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tuneserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve_cmd.register(sub)
    models_cmd.register(sub)
    tenants_cmd.register(sub)
    adapters_cmd.register(sub)
    merge_cmd.register(sub)
    export_cmd.register(sub)
    jobs_cmd.register(sub)
    train_cmd.register(sub)
    eval_cmd.register(sub)
    db_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except TuneserveError as exc:
        print(f"tuneserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
