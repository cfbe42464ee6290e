"""`tuneserve models`: prepare and inspect base models."""

from __future__ import annotations

import argparse
import json

from tuneserve.cli.options import add_settings_arguments, settings_from_args
from tuneserve.config import DEFAULT_MODEL_ID
from tuneserve.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("models", help="prepare and inspect base models")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = actions.add_parser(
        "prepare",
        help="prepare the default model (HF copy + Q8_0 GGUF) into the data dir, once",
    )
    prepare.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    add_settings_arguments(prepare)
    prepare.set_defaults(handler=run_prepare)
    show = actions.add_parser("show", help="print the model paths the gateway would use")
    add_settings_arguments(show)
    show.set_defaults(handler=run_show)


def run_prepare(args: argparse.Namespace) -> int:
    from tuneserve.models.prepare import prepare_default_model

    settings = settings_from_args(args)
    if settings.model.name != DEFAULT_MODEL_ID:
        raise ConfigError(
            f"model.name: only the default model ({DEFAULT_MODEL_ID}) can be prepared; "
            "point model.hf_path and model.gguf_path at your own files instead"
        )
    prepared = prepare_default_model(
        settings.model_dir(), force=args.force, extra_buffer_types=settings.engines.llamacpp.extra_buffer_types
    )
    state = "reused" if prepared.reused else "prepared"
    print(f"{state}: HF copy {prepared.hf_path}, GGUF {prepared.gguf_path}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from tuneserve.gguf.llama_loader import gguf_file_type, llama_runtime

    settings = settings_from_args(args)
    hf, gguf = settings.resolved_hf_path(), settings.resolved_gguf_path()
    runtime = llama_runtime(settings.engines.llamacpp.extra_buffer_types)
    print(
        json.dumps(
            {
                "name": settings.model.name,
                "hf_path": str(hf),
                "hf_ready": (hf / "config.json").is_file(),
                "gguf_path": str(gguf),
                "gguf_ready": gguf.is_file(),
                "gguf_type": gguf_file_type(gguf) if gguf.is_file() else None,
                "llama_cpp": runtime.summary(),
            },
            indent=2,
        )
    )
    return 0
