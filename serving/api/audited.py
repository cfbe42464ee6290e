"""One audit record for every adapter or tenant action a caller asked for, refused or not.

Refusals are what an operator reviewing an incident needs most (a tenant probing for
another's adapters, an oversized upload, an admin-only field tried with a tenant key),
so the whole route runs inside the scope: whatever stops it is recorded with the
status the client got. Records hold names, statuses and messages, never keys.
Failed authentications are not recorded here (anyone can send them, and they carry
no identity to record).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from serving.access import actor
from serving.api.error_map import DOMAIN_ERRORS, api_error
from serving.auth import Principal
from serving.errors import ApiError
from tuneserve.audit import AuditLog


@dataclass
class AuditScope:
    target: str  # what the action is on, as far as the route knows it yet
    details: dict[str, Any] = field(default_factory=dict)


def _as_api_error(exc: Exception) -> ApiError | None:
    if isinstance(exc, ApiError):
        return exc
    if any(cls in DOMAIN_ERRORS for cls in type(exc).__mro__):
        return api_error(exc)
    return None


@contextlib.asynccontextmanager
async def audited(audit: AuditLog, principal: Principal, action: str, target: str) -> AsyncIterator[AuditScope]:
    """Record the block's outcome: "ok", "refused" (a 4xx: status, code, message) or
    "failed" (anything else, re-raised as it was). Written from a worker thread: the
    record waits on an fsync or on the database, never on the event loop."""
    scope = AuditScope(target)
    who = actor(principal)
    try:
        yield scope
    except Exception as exc:
        answer = _as_api_error(exc)
        if answer is not None and answer.status_code < 500:
            await asyncio.to_thread(
                audit.record, who, action, scope.target, "refused",
                **scope.details, status=answer.status_code, code=answer.code, error=answer.message,
            )
        else:
            await asyncio.to_thread(audit.record, who, action, scope.target, "failed", **scope.details, error=str(exc))
        raise
    await asyncio.to_thread(audit.record, who, action, scope.target, "ok", **scope.details)
