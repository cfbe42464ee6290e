"""`tuneserve serve`: run the OpenAI-compatible gateway."""

from __future__ import annotations

import argparse
import logging

from tuneserve.cli.options import add_settings_arguments, settings_from_args
from tuneserve.config import Settings
from tuneserve.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible gateway",
        description="Serve the base model through the OpenAI-compatible gateway: vLLM first "
        "when enabled, the embedded llama.cpp engine as fallback.",
    )
    add_settings_arguments(parser)
    parser.set_defaults(handler=run)


def check_model_files(settings: Settings) -> None:
    gguf = settings.resolved_gguf_path()
    if settings.engines.llamacpp.enabled and not gguf.is_file():
        raise ConfigError(
            f"model.gguf_path: {gguf} does not exist; run `tuneserve models prepare` "
            "or point model.gguf_path at a GGUF file"
        )
    hf = settings.resolved_hf_path()
    if settings.engines.vllm.launch.enabled and not (hf / "config.json").is_file():
        raise ConfigError(
            f"model.hf_path: {hf} is not an HF model dir; run `tuneserve models prepare` "
            "or point model.hf_path at one"
        )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.api.app import create_app
    from serving.api.http_protocol import CoalescingHttpToolsProtocol

    settings = settings_from_args(args)
    check_model_files(settings)
    logging.getLogger().setLevel(settings.server.log_level.upper())
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
        access_log=settings.server.log_level == "debug",
        http=CoalescingHttpToolsProtocol,
        timeout_graceful_shutdown=10,
    )
    return 0
