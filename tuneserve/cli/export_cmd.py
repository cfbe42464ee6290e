"""`tuneserve export SOURCE --out FILE.gguf`: GGUF export with a quality gate, as a job."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tuneserve.cli.jobs_cmd import open_jobs
from tuneserve.cli.options import add_settings_arguments, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    from merge.export import EXPORT_TYPES

    parser = sub.add_parser(
        "export",
        help="export an HF model, GGUF or PEFT adapter to (quantized) GGUF, quality-gated",
        description="SOURCE is an HF model dir (converted, and quantized for the upper-case "
        "types), a .gguf (quantized) or a PEFT adapter dir (-> GGUF LoRA). The result must "
        "pass the quality gate against the HF reference before it is renamed to --out.",
    )
    parser.add_argument("source", metavar="SOURCE", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output .gguf file")
    parser.add_argument(
        "--type",
        choices=EXPORT_TYPES,
        help="f16, bf16, q8_0: llama.cpp's converter; Q4_K_M, Q5_K_M, Q6_K, Q8_0: "
        "llama_model_quantize (of an f16). Not for adapters.",
    )
    parser.add_argument("--reference", type=Path, help="HF dir the gate compares a GGUF source with [default: model.hf_path]")
    parser.add_argument("--base", type=Path, help="an adapter's HF base [default: model.hf_path]")
    parser.add_argument("--base-gguf", type=Path, help="an adapter's base GGUF for the gate [default: model.gguf_path]")
    gate = parser.add_argument_group("quality gate")
    gate.add_argument("--no-gate", action="store_true", help="publish without the quality gate")
    gate.add_argument("--max-perplexity-ratio", type=float, help="[default: 1.05]")
    gate.add_argument("--min-token-agreement", type=float, help="[default: 0.90]")
    gate.add_argument("--gate-text", type=Path, help="held-out text file for perplexity")
    gate.add_argument("--gate-prompts", type=Path, help="file with one prompt per line for greedy agreement")
    parser.add_argument(
        "--queue", action="store_true",
        help="only queue the job for `tuneserve jobs worker` (any machine sharing the database "
        "and these paths); print it and exit",
    )
    add_settings_arguments(parser)
    parser.set_defaults(handler=run)


def export_spec(args: argparse.Namespace) -> dict:
    from pydantic import ValidationError

    from merge.export import ExportError, ExportSpec, source_kind, validate_spec
    from tuneserve.config import format_validation_error
    from tuneserve.gguf.quality_gate import GateConfig

    settings = settings_from_args(args)
    gate: dict = {"enabled": not args.no_gate}
    for key in ("max_perplexity_ratio", "min_token_agreement"):
        if getattr(args, key) is not None:
            gate[key] = getattr(args, key)
    if args.gate_text is not None:
        gate["text_file"] = args.gate_text.resolve()
    if args.gate_prompts is not None:
        try:
            gate["prompts"] = [l.strip() for l in args.gate_prompts.read_text().splitlines() if l.strip()]
        except OSError as exc:
            raise ExportError(f"--gate-prompts: cannot read {args.gate_prompts}: {exc.strerror}") from exc
    hf = settings.resolved_hf_path().resolve()
    kind = source_kind(args.source)
    try:
        spec = ExportSpec(
            source=args.source.resolve(),
            out=args.out.resolve(),
            type=args.type,
            reference=(args.reference or hf).resolve() if kind == "gguf" else None,
            base=(args.base or hf).resolve() if kind == "adapter" else None,
            base_gguf=(args.base_gguf or settings.resolved_gguf_path()).resolve() if kind == "adapter" else None,
            gate=GateConfig(**gate),
            gate_cache=(settings.data_dir / "cache" / "gate").resolve(),
        )
    except ValidationError as exc:
        raise ExportError(format_validation_error(exc, "export").replace("key '", "key 'gate.")) from exc
    validate_spec(spec)
    if spec.out.exists():
        raise ExportError(f"--out: {spec.out} already exists; choose a new path or remove it")
    return spec.model_dump(mode="json")


def run(args: argparse.Namespace) -> int:
    from merge.tasks import queue_new, run_new

    spec = export_spec(args)
    with open_jobs(args) as jobs:
        if args.queue:
            record = queue_new(jobs, "export", spec)
        else:
            record = run_new(jobs, "export", spec, settings_from_args(args))
    print(json.dumps({**record.summary(), "report": record.report}, indent=2))
    return 0
