"""uvicorn's httptools protocol, with the writes of one event-loop turn sent as one.

uvicorn writes a response's headers the moment they are sent and its body in a second
write, so every answer costs at least two socket writes, each of which wakes the client.
On small VMs a loopback write with its wake-up is among the costliest steps of a request
(~0.1-0.2 ms measured on a 2-vCPU Firecracker VM, more than parsing and routing it), and
the gateway sends headers and first bytes together anyway: a whole answer in one
`send` pair, a stream's headers with its first chunk. Merging what is written in the
same loop turn halves the writes and delays nothing that was not already ready.

It also closes a connection gently when the client may still be sending: an answer
given before the body was read (413, 408, 401; they ask for `Connection: close`, see
body_gate.py) would otherwise be followed by a close with unread bytes in the socket,
which the kernel answers with a reset that can cost the client the answer. Instead the
gateway ends its side (FIN), discards what still arrives for a bounded time and amount,
then closes.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Enough for a client to finish sending a body the size of server.max_body_bytes and
# read the answer; a client that keeps sending past either bound gets the reset.
LINGER_S = 2.0
LINGER_BYTES = 16 * 1024 * 1024


class CoalescingTransport:
    """A transport whose writes are buffered until the end of the current loop turn."""

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        linger: Callable[[], bool] | None = None,
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._linger = linger  # instead of closing: True when it will close later itself
        self._closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()  # a non-keep-alive response closes right after its last write
        first, self._closed = not self._closed, True
        if first and self._linger is not None and self._linger():
            return
        self._transport.close()

    def is_closing(self) -> bool:
        # Closed for the server even while lingering: nothing more is read or answered.
        return self._closed or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        self._lingering: asyncio.TimerHandle | None = None
        self._discarded = 0
        super().connection_made(CoalescingTransport(transport, self.loop, self._linger))  # type: ignore[arg-type]

    def _linger(self) -> bool:
        """Half-close instead of closing while the request's body is still on its way."""
        body_unread = self.cycle is not None and self.cycle.more_body
        if not body_unread or self._raw.is_closing() or not self._raw.can_write_eof():
            return False
        self._raw.write_eof()  # after what is buffered: the answer leaves whole, then FIN
        self._lingering = self.loop.call_later(LINGER_S, self._raw.close)
        self.flow.resume_reading()  # reading may be paused on a full body buffer
        return True

    def data_received(self, data: bytes) -> None:
        if self._lingering is None:
            super().data_received(data)
            return
        self._discarded += len(data)
        if self._discarded > LINGER_BYTES:
            self._raw.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)
