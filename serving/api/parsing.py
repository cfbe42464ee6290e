"""Reading request bodies: size limit, JSON, schema, each failure a typed 4xx."""

from __future__ import annotations

import json
from typing import Any, Mapping, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from serving.api.schemas import UNSUPPORTED
from serving.errors import InvalidRequest, PayloadTooLarge

Body = TypeVar("Body", bound=BaseModel)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is {declared} bytes; the limit is {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    # Counted while reading too: chunked bodies declare no length.
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(error: Mapping[str, Any]) -> tuple[str, str | None]:
    loc = [str(part) for part in error["loc"]]
    # Union members add their type name to the location; keep the field path only.
    path = [p for p in loc if not p[:1].isupper() and p not in {"str", "list[str]", "list[TextPart]"}]
    param = ".".join(path) if path else None
    message = error["msg"].removeprefix("Value error, ")
    if param is None:
        return f"Invalid request: {message}", None
    if error["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if error["type"] == "missing":
        return f"Missing required parameter: '{param}'.", param
    return f"Invalid value for '{param}': {message}", param


def _unparsable(detail: object) -> InvalidRequest:
    return InvalidRequest(
        f"We could not parse the JSON body of your request: {detail}. "
        "The body must be a JSON object."
    )


def invalid_request(error: Mapping[str, Any]) -> InvalidRequest:
    """The 400 for one pydantic error, its `param` the field's path as OpenAI gives it."""
    if error["type"] == "json_invalid":
        return _unparsable(error.get("ctx", {}).get("error", error["msg"]))
    message, param = _describe(error)
    return InvalidRequest(message, param=param)


def parse_body(raw: bytes, model: type[Body]) -> Body:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _unparsable(exc) from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    for key, why in UNSUPPORTED.items():
        # Falsy values (false, null, []) ask for nothing and are harmless to drop.
        if key in data:
            if data[key] not in (None, False, [], {}, 0):
                raise InvalidRequest(f"'{key}' is not supported: {why}.", param=key)
            del data[key]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(exc.errors()[0]) from exc
