"""The adapter routes in the OpenAPI schema: their multipart body and every status.

The routes read their bodies themselves (upload_form.py counts an upload while it
arrives), so FastAPI cannot infer the body or the errors; they are declared here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from serving.api.error_schema import OpenAIError
from serving.errors import ApiError, Forbidden, InvalidRequest, NotFound, PayloadTooLarge, TooManyUploads, Unauthorized

_DESCRIPTIONS: dict[type[ApiError], str] = {
    InvalidRequest: "A missing or malformed field, or an adapter that fails validation (`code` says why)",
    Unauthorized: "Missing or unknown API key",
    Forbidden: "An admin-only field (`tenant`, `path`) sent with a tenant key",
    NotFound: "The named tenant does not exist",
    PayloadTooLarge: "The upload is over adapters.max_bytes (counted while it arrives)",
    TooManyUploads: "Uploads in progress are at their bound (see Retry-After)",
}


class AdapterInfo(BaseModel):
    id: str
    object: str = "adapter"
    tenant: str
    version: int
    parent: str
    rank: int
    alpha: float
    target_modules: list[str]
    sha256: str
    size_bytes: int
    created_at: int


class UploadFields(BaseModel):
    name: str
    file: bytes | None = None  # a .tar.gz or .zip of a PEFT adapter dir
    tenant: str | None = None  # admin only
    path: str | None = None  # admin only: a server-side adapter dir or archive


def error_responses(*errors: type[ApiError]) -> dict[int | str, dict[str, Any]]:
    return {
        error.status_code: {"model": OpenAIError, "description": _DESCRIPTIONS.get(error, error.__name__)}
        for error in errors
    }


def _upload_body() -> dict[str, Any]:
    schema = UploadFields.model_json_schema()
    schema["properties"]["file"] = {"type": "string", "format": "binary"}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": schema},
                "application/x-www-form-urlencoded": {"schema": {**schema, "required": ["name", "path"]}},
            },
        }
    }


UPLOAD_DOCS: dict[str, Any] = {
    "responses": {
        201: {"model": AdapterInfo, "description": "The stored adapter version"},
        **error_responses(InvalidRequest, Unauthorized, Forbidden, NotFound, PayloadTooLarge, TooManyUploads),
    },
    "openapi_extra": _upload_body(),
}
