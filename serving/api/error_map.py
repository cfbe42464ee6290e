"""Which HTTP answer each error gets: the one table of the API edge.

The domain (tuneserve/) raises its own errors and knows nothing of HTTP; the exception
handlers (error_handlers.py) and the routes turn them into OpenAI errors through
`DOMAIN_ERRORS` only. `GENERATION_ERRORS` is what /docs lists for the generation
routes, its statuses read from the ApiError classes themselves.
"""

from __future__ import annotations

from typing import Any, Callable

from serving.errors import (
    AdapterStorageUnavailable,
    ApiError,
    BodyTimeout,
    EngineFailed,
    InvalidRequest,
    LimitsUnavailable,
    ModelNotFound,
    NoEngineAvailable,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    RequestTimeout,
    ServerBusy,
    StoreUnavailable,
    Unauthorized,
)
from serving.limits import RateLimited
from tuneserve.adapters.registry import AdapterNotFound, AdapterStoreUnavailable
from tuneserve.adapters.validation import AdapterRejected
from tuneserve.tenants.store import TenantNotFound

# (the error, the name the client used if the route knows it): messages name what the
# client sent, not the registry's internal form. Any: each takes its own error class.
Translate = Callable[[Any, str | None], ApiError]


def _rejected(exc: AdapterRejected, _: str | None) -> ApiError:
    if exc.reason == "too_large":
        return PayloadTooLarge(str(exc), param="file", code=exc.reason)
    param = "name" if exc.reason == "invalid_name" else "file"
    return InvalidRequest(str(exc), param=param, code=exc.reason)


def _adapter_missing(exc: AdapterNotFound, model: str | None) -> ApiError:
    message = f"Adapter '{model}' does not exist." if model is not None else str(exc)
    return NotFound(message, param="model")


def _tenant_missing(exc: TenantNotFound, tenant: str | None) -> ApiError:
    message = f"Tenant '{tenant}' does not exist." if tenant is not None else str(exc)
    return NotFound(message, param="tenant")


def _store_unavailable(exc: AdapterStoreUnavailable, _: str | None) -> ApiError:
    # The message names the bucket's answer, never a server path.
    return AdapterStorageUnavailable("The adapter store cannot take this version right now; nothing was published. Retry later.")


DOMAIN_ERRORS: dict[type[Exception], Translate] = {
    AdapterRejected: _rejected,
    AdapterStoreUnavailable: _store_unavailable,
    AdapterNotFound: _adapter_missing,
    TenantNotFound: _tenant_missing,
}


def api_error(exc: Exception, subject: str | None = None) -> ApiError:
    """The OpenAI error for a domain error of DOMAIN_ERRORS (its class or a subclass)."""
    for cls in type(exc).__mro__:
        translate = DOMAIN_ERRORS.get(cls)
        if translate is not None:
            return translate(exc, subject)
    raise TypeError(f"no HTTP mapping for {type(exc).__name__}") from exc


ErrorDocs = tuple[tuple[tuple[type[ApiError], ...], str], ...]

# In status order; QueueFull and RateLimited share 429; NoEngineAvailable, ServerBusy and
# LimitsUnavailable and StoreUnavailable 503.
GENERATION_ERRORS: ErrorDocs = (
    ((InvalidRequest,), "Bad parameters, malformed JSON or empty messages"),
    ((Unauthorized,), "Missing or unknown API key"),
    ((ModelNotFound,), "Unknown model (`model_not_found`)"),
    ((BodyTimeout,), "The body did not arrive within `server.body_timeout_s` (`request_timeout`)"),
    ((PayloadTooLarge,), "Body over the size limit"),
    ((QueueFull, RateLimited), "A queue or the tenant's rate limit is full (see Retry-After)"),
    ((EngineFailed,), "The engine broke after accepting the request"),
    (
        (NoEngineAvailable, ServerBusy, LimitsUnavailable, StoreUnavailable),
        "No engine can serve the request, too many request bodies are arriving at once "
        "(`server_busy`), the shared limits' Redis is unreachable with "
        "`limits.redis.on_unreachable: fail_closed` (`limits_unavailable`), or the key "
        "database is (`store_unavailable`); see Retry-After",
    ),
    ((RequestTimeout,), "Generation did not finish within the request timeout"),
)


def error_statuses(errors: ErrorDocs) -> dict[str, str]:
    """{"429": description, ...}: the OpenAPI responses of these errors."""
    statuses: dict[str, str] = {}
    for classes, description in errors:
        codes = {cls.status_code for cls in classes}
        assert len(codes) == 1, f"{classes} answer with different statuses"
        statuses[str(codes.pop())] = description
    return statuses
