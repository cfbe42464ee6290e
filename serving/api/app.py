"""The FastAPI application: engines wired into a router, the routes, one error edge."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Callable

from fastapi import FastAPI
from starlette.routing import Route

from serving.access import Tenancy
from serving.adapter_reconciler import reconcile_forever
from serving.api.adapter_routes import register_adapter_routes
from serving.api.body_gate import BodyGate
from serving.api.error_handlers import install_error_handlers
from serving.api.generation import GENERATION_ROUTES, GenerationService
from serving.api.models_routes import models_routes
from serving.api.openapi_docs import document_generation_routes
from serving.api.status_routes import status_routes
from serving.auth import log_dev_mode_warning
from serving.engine_factory import build_engines, tool_format
from serving.engines.base import Engine
from serving.metrics import GatewayMetrics
from serving.metrics_access import MetricsAccess
from serving.router import Router
from tuneserve import __version__
from tuneserve.config import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, engines: list[Engine] | None = None) -> FastAPI:
    # First: a config that would leave /metrics open fails before any engine loads.
    metrics_access = MetricsAccess.from_settings(settings)
    metrics = GatewayMetrics([settings.model.name], labels=settings.server.metrics)
    engines = build_engines(settings, metrics) if engines is None else engines
    metrics.watch_engines(lambda: engines)
    router = Router(engines, metrics)
    tenancy = Tenancy.from_settings(settings)
    metrics.watch_limits(tenancy.limiter.health)
    bodies = BodyGate.from_settings(settings.server)
    service = GenerationService(
        router,
        metrics,
        tenancy,
        settings.model.name,
        settings.server.max_body_bytes,
        settings.server.request_timeout_s,
        tool_format(settings),
        bodies,
    )

    app = FastAPI(title="tuneserve", version=__version__, lifespan=_lifespan(settings, engines, router, tenancy))
    app.state.settings = settings
    app.state.engines = engines
    app.state.metrics = metrics
    app.state.metrics_access = metrics_access  # serving/api/metrics_listener.py reads it
    app.state.tenancy = tenancy
    app.state.body_gate = bodies  # body_gate.body_gate() finds it for the routes that read bodies
    install_error_handlers(app)

    # At the head of the route table: Starlette tries routes in order, and these two
    # carry nearly all traffic.
    for route in GENERATION_ROUTES:
        app.router.routes.insert(0, Route(route.path, service.endpoint(route), methods=["POST"]))
    document_generation_routes(app)
    app.include_router(models_routes(tenancy))
    register_adapter_routes(app, tenancy, engines)
    app.include_router(status_routes(engines, router, metrics, metrics_access))
    return app


def _lifespan(
    settings: Settings, engines: list[Engine], router: Router, tenancy: Tenancy
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not settings.auth.enabled:
            log_dev_mode_warning()
        for engine in engines:
            await engine.start()
        if not router.any_ready():
            log.warning("no engine is ready yet; /ready answers 503 until one is")
        reconciler = asyncio.create_task(
            reconcile_forever(tenancy.registry, engines, settings.adapters.reconcile_interval_s),
            name="adapter-reconciler",
        )
        try:
            yield
        finally:
            reconciler.cancel()
            await tenancy.aclose()
            for engine in engines:
                await engine.stop()

    return lifespan
