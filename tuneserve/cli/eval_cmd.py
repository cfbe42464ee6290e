"""`tuneserve eval`: function-calling accuracy and general perplexity, base vs adapters."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tuneserve.adapters.peft_format import is_adapter_dir
from tuneserve.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="evaluate a base model and adapters (function calling, general perplexity)",
        description="Score the base model and each adapter side by side: tool-name accuracy, "
        "per-argument exact match and JSON validity on a function-calling JSONL test set, and "
        "perplexity on a general text set (forgetting). Prints a table and writes JSON. "
        "Generate a test set with `python -m training.datagen.function_calling --out DIR`.",
    )
    parser.add_argument("--base", help="base model dir or hub id [default: the prepared model's hf dir]")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=PATH",
        help="a PEFT adapter dir to evaluate (repeatable); NAME labels it in the table",
    )
    parser.add_argument("--function-calling", type=Path, metavar="FILE", help="function-calling test JSONL")
    parser.add_argument("--general", type=Path, metavar="FILE", help="general text JSONL for perplexity ({\"text\": ...} lines)")
    parser.add_argument("--output", type=Path, metavar="FILE", help="write the results as JSON here")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate the first N function-calling cases")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="answer length cap [default: 96]")
    parser.add_argument("--batch-size", type=int, default=8, help="generation batch [default: 8]")
    parser.add_argument("--no-base", action="store_true", help="evaluate the adapters only")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads [default: all cores]")
    parser.set_defaults(handler=run)


def _adapters(specs: list[str]) -> dict[str, Path]:
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if name in adapters or name == "base":
            raise ConfigError(f"--adapter {spec}: the name {name!r} is taken; use NAME=PATH")
        if not is_adapter_dir(Path(path)):
            raise ConfigError(f"--adapter {spec}: {path} is not a PEFT adapter dir (no adapter_config.json)")
        adapters[name] = Path(path)
    return adapters


def run(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate, format_table
    from training.model import resolve_base
    from tuneserve.config import load_settings

    if not (args.function_calling or args.general):
        raise ConfigError("nothing to evaluate: give --function-calling FILE and/or --general FILE")
    for flag, path in (("--function-calling", args.function_calling), ("--general", args.general)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag}: {path} does not exist")
    adapters = _adapters(args.adapter)
    if args.no_base and not adapters:
        raise ConfigError("--no-base: give at least one --adapter")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = resolve_base(args.base, load_settings())
    results = evaluate(
        base, adapters, args.function_calling, args.general, args.limit,
        args.max_new_tokens, args.batch_size, include_base=not args.no_base,
    )
    print(format_table(results))
    if args.output:
        from tuneserve.fsutil import write_atomic

        write_atomic(args.output, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        print(f"results: {args.output}", file=sys.stderr)
    return 0
