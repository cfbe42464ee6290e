"""`tuneserve serve`: run the OpenAI-compatible gateway."""

from __future__ import annotations

import argparse
import logging

from tuneserve.cli.options import add_settings_arguments, settings_from_args
from tuneserve.config import Settings
from tuneserve.errors import ConfigError

STARTUP_FAILURE = 3  # uvicorn's exit status when the server never started


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
    from serving.api.metrics_listener import with_metrics_listener

    settings = settings_from_args(args)
    check_model_files(settings)
    logging.getLogger().setLevel(settings.server.log_level.upper())
    app = create_app(settings)
    config = uvicorn.Config(
        with_metrics_listener(app),
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
        access_log=settings.server.log_level == "debug",
        http=CoalescingHttpToolsProtocol,
        timeout_graceful_shutdown=10,
    )
    # One server on every listener, so one signal handler and one graceful shutdown
    # cover the metrics port too (serving/api/metrics_listener.py tells them apart).
    sockets = [config.bind_socket()]
    access = app.state.metrics_access
    if access.own_listener:
        sockets.append(uvicorn.Config(app, host=access.host, port=access.port).bind_socket())
    server = uvicorn.Server(config)
    server.run(sockets=sockets)
    return 0 if server.started else STARTUP_FAILURE
