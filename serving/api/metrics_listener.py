"""The metrics listener (server.metrics.port): a second port that serves /metrics only.

One uvicorn server listens on both ports with one ASGI app, which tells requests apart
by the local port they arrived on: the scope's `server`, the accepting socket's own
address, which no header can change. So the API port never answers /metrics (404, as
for any unknown path) and the metrics port answers nothing else, whatever a proxy or
client sends. Lifespan events go to the API app, which owns the engines.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.api.error_handlers import install_error_handlers
from serving.api.status_routes import metrics_routes
from serving.metrics import GatewayMetrics
from serving.metrics_access import MetricsAccess


def metrics_app(metrics: GatewayMetrics, access: MetricsAccess) -> FastAPI:
    app = FastAPI(title="tuneserve metrics", openapi_url=None, docs_url=None, redoc_url=None)
    install_error_handlers(app)  # its 401s and 404s in OpenAI's shape, like the API's
    app.include_router(metrics_routes(metrics, access))
    return app


class ByLocalPort:
    def __init__(self, api: ASGIApp, metrics: ASGIApp, metrics_port: int) -> None:
        self.api = api
        self.metrics = metrics
        self.metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] != "lifespan" and server is not None and server[1] == self.metrics_port:
            await self.metrics(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def with_metrics_listener(app: FastAPI) -> ASGIApp:
    """What uvicorn should serve: `app` itself unless server.metrics.port is set."""
    access: MetricsAccess = app.state.metrics_access
    if not access.own_listener:
        return app
    assert access.port is not None
    return ByLocalPort(app, metrics_app(app.state.metrics, access), access.port)
