"""The generation routes in the OpenAPI schema (/docs, /openapi.json).

They are plain ASGI routes (generation.py), which FastAPI does not document; their
request bodies are the same pydantic models that validate them, so the docs cannot drift.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from serving.api.error_map import GENERATION_ERRORS, error_statuses
from serving.api.error_schema import OpenAIError
from serving.api.generation import GENERATION_ROUTES, GenerationRoute

_COMPONENTS = "#/components/schemas/{model}"
_ERROR = {"$ref": _COMPONENTS.format(model=OpenAIError.__name__)}
_ERROR_STATUSES = error_statuses(GENERATION_ERRORS)


def _schemas(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema and those it refers to, by component name."""
    schema = model.model_json_schema(ref_template=_COMPONENTS)
    return {**schema.pop("$defs", {}), model.__name__: schema}


def _operation(route: GenerationRoute) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": _ERROR}}}
    return {
        "post": {
            "summary": route.summary,
            "operationId": "create" + route.body.__name__.removesuffix("Request"),
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": _COMPONENTS.format(model=route.body.__name__)}}},
            },
            "responses": {
                "200": {
                    "description": "The whole answer, or with `stream: true` server-sent events ending in `data: [DONE]`",
                    "content": {"application/json": {}, "text/event-stream": {}},
                },
                **{status: {"description": text, **error} for status, text in _ERROR_STATUSES.items()},
            },
        }
    }


def document_generation_routes(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(_schemas(OpenAIError))
            generation = {}
            for route in GENERATION_ROUTES:
                components.update(_schemas(route.body))
                generation[route.path] = _operation(route)
            schema["paths"] = {**generation, **schema["paths"]}  # the main routes first in /docs
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
