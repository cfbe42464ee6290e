"""Request bodies on their way in: each under a deadline, and only so many at once.

uvicorn puts no time limit on a request body: a client can send one a byte a minute,
and a few hundred such clients hold the gateway's memory and file descriptors for as
long as they like. Every route that reads a body reads it inside `BodyGate.reading()`:

    async with body_gate(request).reading():
        form = await request.form()

Past `server.max_pending_bodies` bodies still arriving, a new request gets 503 at once,
before anything else (auth included) looks at it; a body not complete within
`server.body_timeout_s` gets 408. An error answered from inside the block, before the
body has arrived whole, asks for `Connection: close`: the unread rest of the body
would otherwise be taken for the next request on the connection (a client that stops
sending on an early answer, as `Expect: 100-continue` clients do, then hangs), and
the gateway's protocol (http_protocol.py) closes such a connection without a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from starlette.requests import Request

from serving.errors import ApiError, BodyTimeout, ServerBusy
from tuneserve.config import ServerConfig


class BodyGate:
    def __init__(self, max_pending: int, timeout_s: float) -> None:
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self._deadlines: dict[object, float] = {}  # one per body being read

    @classmethod
    def from_settings(cls, server: ServerConfig) -> "BodyGate":
        return cls(server.max_pending_bodies, server.body_timeout_s)

    @property
    def pending(self) -> int:
        return len(self._deadlines)

    @contextlib.asynccontextmanager
    async def reading(self, timeout_s: float | None = None) -> AsyncIterator[None]:
        """Hold one of the pending-body places while the block reads the body.

        `timeout_s` overrides `server.body_timeout_s` for a route whose bodies are
        larger (adapter uploads); the place is shared with every other route.
        """
        now = asyncio.get_running_loop().time()
        if len(self._deadlines) >= self.max_pending:
            raise close_connection(self._busy(now))
        limit = self.timeout_s if timeout_s is None else timeout_s
        key = object()
        self._deadlines[key] = now + limit
        deadline = asyncio.timeout_at(now + limit)
        try:
            async with deadline:
                yield
        except TimeoutError:
            if not deadline.expired():
                raise
            raise close_connection(BodyTimeout(f"The request body did not arrive within {limit:g}s.")) from None
        except ApiError as exc:
            close_connection(exc)
            raise
        finally:
            del self._deadlines[key]

    def _busy(self, now: float) -> ServerBusy:
        # A place frees at the latest when the oldest body's deadline passes.
        return ServerBusy(
            f"{self.max_pending} request bodies are arriving already, the gateway's limit; retry shortly.",
            retry_after_s=min(self._deadlines.values()) - now,
        )


def close_connection(error: ApiError) -> ApiError:
    """`error`, answered with `Connection: close`: for a refusal sent before the body
    was read, whose unread rest would be taken for the next request."""
    error.headers["Connection"] = "close"
    return error


def body_gate(request: Request) -> BodyGate:
    """The app's gate (create_app installs it), for a route that reads its own body."""
    gate = request.app.state.body_gate
    assert isinstance(gate, BodyGate)
    return gate
