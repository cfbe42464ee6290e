"""The FastAPI application: engines wired into a router, OpenAI routes, errors, metrics."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Route

from serving.api.adapter_routes import register_adapter_routes
from serving.api.generation import GENERATION_ROUTES, GenerationService
from serving.api.openapi_docs import document_generation_routes
from serving.engines.base import AdapterObserver, Engine
from serving.engines.llamacpp import LlamaCppEngine
from serving.engines.vllm import VLLMEngine
from serving.engines.vllm_launcher import VLLMLauncher
from serving.errors import ApiError, InvalidRequest, NoEngineAvailable
from serving.metrics import GatewayMetrics
from tuneserve.models.chat_template import ChatTemplate
from serving.router import Router
from serving.access import Tenancy
from serving.auth import log_dev_mode_warning
from tuneserve import __version__
from tuneserve.config import Settings

log = logging.getLogger(__name__)


def build_engines(settings: Settings, observer: AdapterObserver | None = None) -> list[Engine]:
    """Engines in routing priority: vLLM (GPU) first when enabled, llama.cpp last."""
    engines: list[Engine] = []
    hf_path = settings.resolved_hf_path()
    if settings.engines.vllm.enabled:
        cfg = settings.engines.vllm
        launcher = None
        if cfg.launch.enabled:
            launcher = VLLMLauncher(
                cfg,
                hf_path,
                settings.vllm_model_name(),
                settings.model.max_model_len,
                settings.data_dir / "logs" / "vllm.log",
            )
        engines.append(VLLMEngine(cfg, settings.vllm_url(), settings.vllm_model_name(), launcher, observer))
    if settings.engines.llamacpp.enabled:
        cfg_l = settings.engines.llamacpp
        # The HF tokenizer's template is what vLLM renders with; prefer it for parity.
        template = ChatTemplate.from_hf_dir(hf_path) if (hf_path / "tokenizer_config.json").is_file() else None
        engines.append(
            LlamaCppEngine(
                settings.resolved_gguf_path(),
                n_ctx=settings.model.max_model_len,
                workers=cfg_l.workers,
                n_threads=cfg_l.n_threads,
                n_batch=cfg_l.n_batch,
                queue_size=cfg_l.queue_size,
                template=template,
                max_loras=cfg_l.max_loras,
                observer=observer,
                extra_buffer_types=cfg_l.extra_buffer_types,
            )
        )
    return engines


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def create_app(settings: Settings, engines: list[Engine] | None = None) -> FastAPI:
    metrics = GatewayMetrics([settings.model.name])
    engines = build_engines(settings, metrics) if engines is None else engines
    metrics.watch_engines(lambda: engines)
    router = Router(engines, metrics)
    tenancy = Tenancy.from_settings(settings)
    service = GenerationService(
        router,
        metrics,
        tenancy,
        settings.model.name,
        settings.server.max_body_bytes,
        settings.server.request_timeout_s,
    )
    started_at = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not settings.auth.enabled:
            log_dev_mode_warning()
        for engine in engines:
            await engine.start()
        if not router.any_ready():
            log.warning("no engine is ready yet; /ready answers 503 until one is")
        try:
            yield
        finally:
            for engine in engines:
                await engine.stop()

    app = FastAPI(title="tuneserve", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.engines = engines
    app.state.metrics = metrics
    app.state.tenancy = tenancy

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(InvalidRequest(str(exc.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ApiError(str(exc.detail), code=str(exc.status_code))
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(ApiError("The server had an internal error; it has been logged."))

    # At the head of the route table: Starlette tries routes in order, and these two
    # carry nearly all traffic.
    for route in GENERATION_ROUTES:
        app.router.routes.insert(0, Route(route.path, service.endpoint(route), methods=["POST"]))
    document_generation_routes(app)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        principal = tenancy.authenticator.authenticate(request.headers.get("authorization"))
        base = settings.model.name
        data = [
            {
                "id": base,
                "object": "model",
                "created": started_at,
                "owned_by": "tuneserve",
                "root": base,
                "parent": None,
                "max_model_len": settings.model.max_model_len,
            }
        ]
        for record in tenancy.visible_adapters(principal):
            own = record.tenant == principal.tenant
            data.append(
                {
                    "id": record.name if own else f"{record.tenant}/{record.name}",
                    "object": "model",
                    "created": int(record.created_at.timestamp()),
                    "owned_by": record.tenant,
                    "root": base,
                    "parent": base,
                    "max_model_len": settings.model.max_model_len,
                }
            )
        return {"object": "list", "data": data}

    register_adapter_routes(app, tenancy, engines)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        statuses = {e.name: vars(e.status()) for e in engines}
        if not router.any_ready():
            error = NoEngineAvailable("No inference engine is ready.")
            body = error.body()
            body["engines"] = statuses
            return JSONResponse(body, status_code=error.status_code, headers=error.headers)
        return JSONResponse({"status": "ready", "engines": statuses})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
