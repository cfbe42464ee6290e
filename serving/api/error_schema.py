"""The OpenAI error body as a pydantic model, for the OpenAPI schema only.

Errors are rendered by ApiError.body() (no validation on the way out); a test checks
the two agree.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from serving.errors import ApiError


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: ErrorDetail


def error_response_doc(error: type[ApiError], description: str) -> dict[int | str, dict[str, Any]]:
    """A FastAPI `responses=` entry for an error a route may answer with."""
    return {error.status_code: {"model": OpenAIError, "description": description}}
