"""`tuneserve eval`: function-calling accuracy (per language and split), general perplexity
and factual retention, base vs adapters, in process or (function calling) through a
running gateway."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tuneserve.adapters.peft_format import is_adapter_dir
from tuneserve.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="evaluate a base model and adapters (function calling, general perplexity, factual retention)",
        description="Score the base model and each adapter side by side: tool-name accuracy, "
        "per-argument exact match, call parse rate and no-call accuracy (text where no tool fits, "
        "the answer after a tool result) on a function-calling JSONL test set, per language and, where "
        "lines carry meta.split, per split (seen tools in unseen phrasings, unseen tools, no call, multi "
        "step); perplexity on a general text set and, on short factual questions the base answers right, "
        "the share an adapter still answers right (forgetting). With --base-url the same cases are "
        "answered by a running gateway over the OpenAI API (tools, tool_choice auto, temperature 0) and scored the same way, "
        "so the figure is the one the API delivers. Prints a table and writes JSON. "
        "Generate a test set with `python -m training.datagen.function_calling --out DIR`, the factual "
        "questions with `python -m training.datagen.factual --out DIR`.",
    )
    parser.add_argument("--base", help="base model dir or hub id [default: the prepared model's hf dir]")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=PATH",
        help="a PEFT adapter dir to evaluate (repeatable); NAME labels it in the table",
    )
    parser.add_argument(
        "--full-model", action="append", default=[], metavar="NAME=PATH",
        help="a whole fine-tuned model dir to evaluate beside the base (repeatable): method galore's "
        "<output_dir>/model, a merged model; it must share the base's tokenizer",
    )
    parser.add_argument("--function-calling", type=Path, metavar="FILE", help="function-calling test JSONL")
    parser.add_argument("--general", type=Path, metavar="FILE", help="general text JSONL for perplexity ({\"text\": ...} lines)")
    parser.add_argument("--factual", type=Path, metavar="FILE",
                        help="short factual questions JSONL ({\"question\": ..., \"answers\": [...]} lines): "
                        "factual_retained, the share of those the base answers right an adapter still does")
    parser.add_argument("--output", type=Path, metavar="FILE", help="write the results as JSON here")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate the first N function-calling cases")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="answer length cap [default: 96]")
    parser.add_argument("--batch-size", type=int, default=8, help="generation batch [default: 8]")
    parser.add_argument("--no-base", action="store_true", help="evaluate the adapters only")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads [default: all cores]")
    gateway = parser.add_argument_group("through a running gateway (instead of in process)")
    gateway.add_argument("--base-url", metavar="URL",
                         help="the gateway (or any OpenAI-compatible server), e.g. http://127.0.0.1:8000 (/v1 optional)")
    gateway.add_argument("--model", action="append", default=[], metavar="NAME",
                         help="model to ask: the base model's id or a published adapter's name (repeatable)")
    gateway.add_argument("--api-key", metavar="KEY", help="the tenant's API key [default: $OPENAI_API_KEY, else none]")
    gateway.add_argument("--concurrency", type=int, default=4, help="requests in flight [default: 4]")
    parser.set_defaults(handler=run)


def _named_dirs(adapter_specs: list[str], model_specs: list[str]) -> tuple[dict[str, Path], dict[str, Path]]:
    """--adapter and --full-model values as name -> dir, one namespace for both (they share the table)."""
    taken = {"base"}
    adapters: dict[str, Path] = {}
    models: dict[str, Path] = {}
    for flag, specs, out in (("--adapter", adapter_specs, adapters), ("--full-model", model_specs, models)):
        for spec in specs:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = Path(spec).name, spec
            if name in taken:
                raise ConfigError(f"{flag} {spec}: the name {name!r} is taken; use NAME=PATH")
            if flag == "--adapter" and not is_adapter_dir(Path(path)):
                raise ConfigError(f"--adapter {spec}: {path} is not a PEFT adapter dir (no adapter_config.json)")
            if flag == "--full-model" and not (Path(path) / "config.json").is_file():
                hint = " (an adapter: use --adapter)" if is_adapter_dir(Path(path)) else ""
                raise ConfigError(f"--full-model {spec}: {path} is not a model dir (no config.json){hint}")
            taken.add(name)
            out[name] = Path(path)
    return adapters, models


def _run_gateway(args: argparse.Namespace) -> dict[str, Any]:
    from training.evaluate import evaluate_gateway

    if not args.model:
        raise ConfigError("--base-url: give --model NAME (the base model's id or an adapter's name)")
    if not args.function_calling:
        raise ConfigError("--base-url: give --function-calling FILE")
    for flag, given in (("--general", args.general), ("--factual", args.factual), ("--adapter", args.adapter),
                        ("--full-model", args.full_model),
                        ("--base", args.base), ("--no-base", args.no_base), ("--threads", args.threads)):
        if given:
            raise ConfigError(f"{flag} is for in-process evaluation; not with --base-url")
    if not args.function_calling.is_file():
        raise ConfigError(f"--function-calling: {args.function_calling} does not exist")
    if len(set(args.model)) != len(args.model):
        raise ConfigError("--model: each name once")
    try:
        import openai as sdk
    except ImportError:
        raise ConfigError("--base-url needs the openai package (pip install openai)") from None

    try:
        return evaluate_gateway(
            args.base_url, args.model, args.function_calling, args.api_key or os.environ.get("OPENAI_API_KEY"),
            args.limit, args.max_new_tokens, args.concurrency,
        )
    except sdk.APIConnectionError as exc:
        raise ConfigError(f"--base-url {args.base_url}: cannot connect ({exc})") from exc
    except sdk.APIStatusError as exc:
        raise ConfigError(f"--base-url {args.base_url}: the server answered {exc.status_code}: {exc.message}") from exc


def run(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate
    from training.model import resolve_base
    from tuneserve.config import load_settings

    if args.base_url or args.model:
        if not args.base_url:
            raise ConfigError("--model needs --base-url (in process, evaluate adapters with --adapter)")
        return _write(args, _run_gateway(args))
    if not (args.function_calling or args.general or args.factual):
        raise ConfigError("nothing to evaluate: give --function-calling FILE, --general FILE and/or --factual FILE")
    for flag, path in (("--function-calling", args.function_calling), ("--general", args.general),
                       ("--factual", args.factual)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag}: {path} does not exist")
    adapters, full_models = _named_dirs(args.adapter, args.full_model)
    if args.no_base and not (adapters or full_models):
        raise ConfigError("--no-base: give at least one --adapter or --full-model")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = resolve_base(args.base, load_settings())
    results = evaluate(
        base, adapters, args.function_calling, args.general, args.limit,
        args.max_new_tokens, args.batch_size, include_base=not args.no_base, factual=args.factual,
        full_models=full_models,
    )
    return _write(args, results)


def _write(args: argparse.Namespace, results: dict[str, Any]) -> int:
    from training.evaluate import format_table

    print(format_table(results))
    if args.output:
        from tuneserve.fsutil import write_atomic

        write_atomic(args.output, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        print(f"results: {args.output}", file=sys.stderr)
    return 0
