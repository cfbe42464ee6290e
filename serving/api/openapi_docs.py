"""The generation routes in the OpenAPI schema (/docs, /openapi.json).

They are plain ASGI routes (generation.py), which FastAPI does not document; their
request bodies are the same pydantic models that validate them, so the docs cannot drift.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serving.api.generation import GENERATION_ROUTES, GenerationRoute

_ERROR = {"$ref": "#/components/schemas/OpenAIError"}
_ERROR_SCHEMA = {
    "title": "OpenAIError",
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}
_ERROR_STATUSES = {
    "400": "Bad parameters, malformed JSON or empty messages",
    "401": "Missing or unknown API key",
    "404": "Unknown model (`model_not_found`)",
    "413": "Body over the size limit",
    "429": "A queue or the tenant's rate limit is full (see Retry-After)",
    "502": "The engine broke after accepting the request",
    "503": "No engine can serve the request",
    "504": "Generation did not finish within the request timeout",
}


def _operation(route: GenerationRoute) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": _ERROR}}}
    return {
        "post": {
            "summary": route.summary,
            "operationId": "create" + route.body.__name__.removesuffix("Request"),
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.body.__name__}"}}},
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
            components["OpenAIError"] = _ERROR_SCHEMA
            generation = {}
            for route in GENERATION_ROUTES:
                body = route.body.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[route.body.__name__] = body
                generation[route.path] = _operation(route)
            schema["paths"] = {**generation, **schema["paths"]}  # the main routes first in /docs
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
