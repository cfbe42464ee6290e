"""Every error leaves the gateway in OpenAI's shape, whoever raised it.

ApiErrors carry their own answer; domain errors get theirs from error_map.py; FastAPI's
request validation gets the same message and `param` as the generation routes' own
parsing; anything else is a logged 500 that says nothing about the server.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api.error_map import DOMAIN_ERRORS, api_error
from serving.api.parsing import invalid_request
from serving.errors import ApiError, InvalidRequest

log = logging.getLogger(__name__)

# Where FastAPI found the value ("body", "query", ...) heads its location; the field
# path after it is what `param` names.
_SOURCES = {"body", "query", "path", "header", "cookie"}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    errors = exc.errors()
    if not errors:
        return InvalidRequest("Invalid request.")
    first = dict(errors[0])
    loc = tuple(first.get("loc", ()))
    first["loc"] = loc[1:] if loc and loc[0] in _SOURCES else loc
    first.setdefault("msg", "invalid request")
    return invalid_request(first)


def install_error_handlers(app: FastAPI) -> None:
    async def _api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(api_error(exc))

    async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(exc))

    async def _http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error = ApiError(str(exc.detail), code=str(exc.status_code))
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(error)

    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(ApiError("The server had an internal error; it has been logged."))

    app.add_exception_handler(ApiError, _api_error)
    for domain_error in DOMAIN_ERRORS:
        app.add_exception_handler(domain_error, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
