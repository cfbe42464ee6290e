"""The gateway's uvicorn protocol merges the writes of one loop turn (one socket write per
whole answer instead of two); every gateway test runs through it end to end."""

from __future__ import annotations

import asyncio

from serving.api.http_protocol import CoalescingTransport


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 8000) if name == "sockname" else default


def test_writes_of_one_turn_leave_as_one_in_order() -> None:
    async def scenario() -> RecordingTransport:
        raw = RecordingTransport()
        transport = CoalescingTransport(raw, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(memoryview(b"body"))
        assert raw.writes == []  # nothing leaves before the turn ends
        await asyncio.sleep(0)
        transport.write(b"next turn")
        await asyncio.sleep(0)
        assert transport.get_extra_info("sockname") == ("127.0.0.1", 8000)  # the rest is forwarded
        transport.write(b"last")
        transport.close()  # flushes first: a non-keep-alive answer closes right after writing
        transport.write(b"after close")
        await asyncio.sleep(0)
        return raw

    raw = asyncio.run(scenario())
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"next turn", b"last"] and raw.closed
