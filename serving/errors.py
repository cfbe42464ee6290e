"""Typed serving errors. The API edge turns each into the OpenAI error shape.

`ApiError` subclasses carry what the client sees. `EngineUnavailable` is internal:
the router catches it before the first byte and tries the next engine.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from tuneserve.errors import TuneserveError

# Why a request moved to the next engine: a metrics label, so a closed set (README's
# Metrics table is generated from it by scripts/metrics_table.py).
FallbackReason = Literal[
    "not_ready",  # the router skipped an engine that reports itself not ready
    "connect_error",
    "timeout",
    "upstream_5xx",
    "circuit_open",
    "unhealthy",  # vLLM's health probe failed
    "adapter_load_failed",  # vLLM refused the adapter; llama.cpp may still serve it
    "adapter_load_miss",  # a vLLM replica answered 404 for a registered adapter it does not hold
    "cancelled",  # an adapter load that concurrent requests waited on was cancelled
]
FALLBACK_REASONS: tuple[FallbackReason, ...] = get_args(FallbackReason)

# Retry-After bounds: under 1 s is not expressible (integer seconds) and invites a
# retry storm; past a minute a client is better told again than made to wait on a
# guess that the load may have made stale.
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 60


def retry_after(seconds: float) -> dict[str, str]:
    """The Retry-After header for a wait estimate, whole seconds within the bounds."""
    wait = math.ceil(seconds) if math.isfinite(seconds) else RETRY_AFTER_MAX_S
    return {"Retry-After": str(min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, wait)))}


class ApiError(TuneserveError):
    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ApiError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(ApiError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
        )


class Forbidden(ApiError):
    status_code = 403
    error_type = "invalid_request_error"
    code = "forbidden"


class NotFound(ApiError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(ApiError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RetryLater(ApiError):
    """An error that says when to come back: a 429 or 503 with Retry-After."""

    default_retry_after_s: float = 1

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        wait = self.default_retry_after_s if retry_after_s is None else retry_after_s
        super().__init__(message, headers=retry_after(wait))


class QueueFull(RetryLater):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"


class NoEngineAvailable(RetryLater):
    status_code = 503
    error_type = "server_error"
    code = "engine_unavailable"
    default_retry_after_s = 5


class ServerBusy(RetryLater):
    """Too many request bodies are arriving at once (server.max_pending_bodies)."""

    status_code = 503
    error_type = "server_error"
    code = "server_busy"


class LimitsUnavailable(RetryLater):
    """The shared limits (limits.backend redis) cannot be reached and
    limits.redis.on_unreachable is fail_closed: no request is admitted uncounted."""

    status_code = 503
    error_type = "server_error"
    code = "limits_unavailable"


class StoreUnavailable(RetryLater):
    """The database that holds tenants' keys (store.url) cannot be reached: the key
    cannot be checked, so the request is refused, not let through."""

    status_code = 503
    error_type = "server_error"
    code = "store_unavailable"
    default_retry_after_s = 2


class AdapterStorageUnavailable(RetryLater):
    """adapters.s3 could not take an uploaded version; nothing of it was published."""

    status_code = 503
    error_type = "server_error"
    code = "adapter_store_unavailable"
    default_retry_after_s = 5


class BodyTimeout(ApiError):
    """The request body did not arrive within its deadline (server.body_timeout_s)."""

    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class EngineFailed(ApiError):
    """An engine broke after it had accepted the request."""

    status_code = 502
    error_type = "server_error"
    code = "engine_error"


class EngineUnavailable(Exception):
    """The engine could not start this request; safe to retry on another engine."""

    def __init__(self, reason: FallbackReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RequestTimeout(ApiError):
    status_code = 504
    error_type = "timeout"
    code = "timeout"


class Unauthorized(ApiError):
    """Missing, malformed or unknown API key. The message never echoes the key, and is
    the same for a key that never existed and one that was deleted or rotated away."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str = "Incorrect API key provided.") -> None:
        # RFC 9110 requires a 401 to name the scheme it accepts.
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class TooManyUploads(RetryLater):
    """Adapter uploads in progress are at their bound (adapters.max_concurrent_uploads*)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "too_many_uploads"
    default_retry_after_s = 5
