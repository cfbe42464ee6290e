"""Reading request bodies: size limit, JSON, schema, each failure a typed 4xx."""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from serving.api.schemas import UNSUPPORTED
from serving.errors import InvalidRequest, PayloadTooLarge

Body = TypeVar("Body", bound=BaseModel)

# Deeper than any request needs (a tool schema nested to schema_subset.MAX_DEPTH is
# about 70 levels) and far from the recursion limit of the code that walks bodies.
MAX_JSON_DEPTH = 128
# No parameter needs more (seeds are 64-bit); int() of a long digit string costs
# quadratic time, and Python refuses over 4300 digits with an error of its own.
MAX_INT_DIGITS = 100
# What json.loads turns into UTF-16 surrogates, which no engine can encode: \uD800 to
# \uDFFF escapes, and the same encoded as UTF-8 bytes (ED A0..BF), which json.loads
# decodes with "surrogatepass" where UTF-8 proper has none.
_SURROGATE_SOURCE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class _Refused(ValueError):
    """A JSON value the gateway does not accept, raised from json.loads' hooks."""


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


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _constant(name: str) -> float:
    raise _Refused(f"{name} is not a JSON value")


def _load_json(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_int=_integer, parse_constant=_constant)
    except RecursionError:
        raise _unparsable(f"it nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, _Refused
        raise _unparsable(exc) from None


def _may_need_walk(raw: bytes) -> bool:
    """Whether the body may nest too deep or hold a lone surrogate (cheap, on the bytes)."""
    # A UTF-16 or UTF-32 body (json.loads takes those) has a NUL among its first bytes.
    text = b"\x00" in raw[:4] or _SURROGATE_SOURCE.search(raw) is not None
    return text or raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH


def _param(path: tuple[str, ...]) -> str | None:
    return ".".join(path) or None


def _check_text(text: str, path: tuple[str, ...], is_key: bool = False) -> None:
    if text.isascii() or not _SURROGATE.search(text):
        return
    param = _param(path)
    if is_key:
        subject = f"Invalid key in '{param}'" if param else "Invalid key in the request body"
    else:
        subject = f"Invalid value for '{param}'"
    raise InvalidRequest(
        f"{subject}: it holds a lone UTF-16 surrogate (U+D800 to U+DFFF), which is not Unicode text.",
        param=param,
    )


def _walk(data: dict[str, Any]) -> None:
    """Refuse what json.loads lets through and the rest of the gateway cannot take:
    nesting past MAX_JSON_DEPTH, and strings no engine can encode, by their `param`."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if len(path) >= MAX_JSON_DEPTH:
            raise _unparsable(f"it nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path, is_key=True)
                stack.append((item, (*path, key)))
        else:
            stack.extend((item, (*path, str(i))) for i, item in enumerate(value))


def parse_body(raw: bytes, model: type[Body]) -> Body:
    data = _load_json(raw)
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if _may_need_walk(raw):
        _walk(data)
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
