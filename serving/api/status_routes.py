"""`/health`, `/ready` and `/metrics`: what orchestrators and Prometheus poll."""

from __future__ import annotations

from typing import Any, Literal, Sequence

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from serving.api.error_schema import OpenAIError, error_response_doc
from serving.engines.base import Engine
from serving.errors import NoEngineAvailable, Unauthorized
from serving.metrics import GatewayMetrics
from serving.metrics_access import MetricsAccess
from serving.router import Router


class Health(BaseModel):
    status: Literal["ok"]


class EngineState(BaseModel):
    """serving.engines.base.EngineStatus, as /ready shows it."""

    # Fields an engine adds to its status show up without a change here.
    model_config = ConfigDict(extra="allow")

    name: str
    ready: bool
    detail: str
    extra: dict[str, Any]


class Ready(BaseModel):
    status: Literal["ready"]
    engines: dict[str, EngineState]


class NotReady(OpenAIError):
    engines: dict[str, EngineState]


class EnginesNotReady(NoEngineAvailable):
    """503 whose body also shows each engine's state, so an operator sees why."""

    def __init__(self, engines: dict[str, EngineState]) -> None:
        super().__init__("No inference engine is ready.")
        self.engines = engines

    def body(self) -> dict[str, Any]:
        engines = {name: state.model_dump(mode="json") for name, state in self.engines.items()}
        return {**super().body(), "engines": engines}


class PrometheusText(Response):
    media_type = CONTENT_TYPE_LATEST


def metrics_routes(metrics: GatewayMetrics, access: MetricsAccess) -> APIRouter:
    """/metrics, on the API port or on the metrics listener (serving/api/metrics_listener.py)."""
    routes = APIRouter()
    text = {"description": "Prometheus text format", "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}
    refused = error_response_doc(Unauthorized, "Missing or incorrect metrics token") if access.token else {}

    @routes.get("/metrics", response_class=PrometheusText, responses={200: text, **refused})
    async def prometheus_metrics(request: Request) -> PrometheusText:
        """Prometheus metrics; with server.metrics.token(_file), only for that bearer token."""
        access.authorize(request.headers.get("authorization"))
        return PrometheusText(generate_latest(metrics.registry))

    return routes


def status_routes(
    engines: Sequence[Engine], router: Router, metrics: GatewayMetrics, access: MetricsAccess
) -> APIRouter:
    routes = APIRouter()

    @routes.get("/health")
    async def health() -> Health:
        """Liveness: 200 while the process runs."""
        return Health(status="ok")

    @routes.get(
        "/ready",
        responses={
            EnginesNotReady.status_code: {"model": NotReady, "description": "No engine can serve (see Retry-After)"}
        },
    )
    async def ready() -> Ready:
        """200 when at least one engine can serve, else 503; either way each engine's state."""
        states = {e.name: EngineState.model_validate(vars(e.status())) for e in engines}
        if not router.any_ready():
            raise EnginesNotReady(states)
        return Ready(status="ready", engines=states)

    if access.on_api_port:
        routes.include_router(metrics_routes(metrics, access))
    return routes
