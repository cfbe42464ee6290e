"""The gateway's uvicorn protocol merges the writes of one loop turn (one socket write per
whole answer instead of two); every gateway test runs through it end to end.

Bodies arrive under a deadline and a bound on how many are arriving at once
(body_gate.py), and a connection answered before its body was read is closed with a
FIN, not a reset, so a kept-alive client goes on on a new one.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from pathlib import Path
from typing import Iterator, Literal

import httpx
import pytest

from serving.api.body_gate import BodyGate
from serving.api.http_protocol import CoalescingTransport
from serving.errors import BodyTimeout, ServerBusy
from tests.support.servers import MODEL, ServerProcess, free_port, gateway

CHAT = "/v1/chat/completions"
ADMIN_KEY = "admin-key-for-body-tests"
JSON = b"content-type: application/json\r\n"
End = Literal["eof", "reset", "timeout"]


def no_engine() -> dict[str, str]:
    """A gateway that starts at once: its only engine (a vLLM nobody runs) is down, and
    the answers tested here come before any engine would be asked."""
    return {
        "engines.llamacpp.enabled": "false",
        "engines.vllm.enabled": "true",
        "engines.vllm.url": f"http://127.0.0.1:{free_port()}",
    }


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


def test_gate_times_a_body_out_and_asks_to_close() -> None:
    async def scenario() -> BodyTimeout:
        gate = BodyGate(max_pending=4, timeout_s=60)
        with pytest.raises(BodyTimeout) as info:
            async with gate.reading(timeout_s=0.05):  # a route's own, shorter deadline
                await asyncio.sleep(30)
        assert gate.pending == 0
        return info.value

    error = asyncio.run(scenario())
    assert error.status_code == 408 and error.headers["Connection"] == "close"


def test_gate_bounds_bodies_arriving_at_once() -> None:
    async def scenario() -> ServerBusy:
        gate = BodyGate(max_pending=1, timeout_s=30)
        async with gate.reading():
            with pytest.raises(ServerBusy) as info:
                async with gate.reading():
                    pass
        async with gate.reading():  # the place is free again
            pass
        return info.value

    error = asyncio.run(scenario())
    assert error.status_code == 503 and error.code == "server_busy"
    # A place frees at the latest when the body holding it times out, 30 s from now.
    assert 25 <= int(error.headers["Retry-After"]) <= 30
    assert error.headers["Connection"] == "close"


def _send_head(port: int, head: bytes, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(60)
    sock.sendall(head + b"\r\n" + body)
    return sock


def _read_to_end(sock: socket.socket) -> tuple[bytes, End]:
    """Everything the server sends, and how the connection ended."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    except TimeoutError:
        return data, "timeout"
    return data, "eof"


def _head(path: str, length: int, *extra: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1".encode(), b"host: gateway", JSON.strip(), f"content-length: {length}".encode(), *extra]
    return b"\r\n".join(lines) + b"\r\n"


def test_kept_alive_client_goes_on_after_an_early_413(llama_gateway: ServerProcess) -> None:
    def chunked() -> Iterator[bytes]:
        for _ in range(300):
            yield b"x" * 10_000

    with httpx.Client(base_url=llama_gateway.base_url, timeout=60) as client:
        for body in (b"x" * 2_000_000, chunked()):
            refused = client.post(CHAT, content=body, headers={"content-type": "application/json"})
            assert refused.status_code == 413 and refused.headers["connection"] == "close"
            answered = client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
            assert answered.status_code == 200, answered.text


def test_client_that_waits_for_100_continue_is_not_left_hanging(llama_gateway: ServerProcess) -> None:
    """It sends no body after a final answer: kept alive, the connection would take its
    next request for the body it never sent."""
    with _send_head(llama_gateway.port, _head(CHAT, 2_000_000, b"expect: 100-continue")) as sock:
        data, end = _read_to_end(sock)
    assert data.startswith(b"HTTP/1.1 413 ") and b"\r\nconnection: close\r\n" in data
    assert end == "eof"


def test_early_answer_ends_in_fin_not_reset(llama_gateway: ServerProcess) -> None:
    """Closed with the body unread in the socket, the kernel would send a reset."""
    with _send_head(llama_gateway.port, _head(CHAT, 5_000_000), b"x" * 1_000_000) as sock:
        data, end = _read_to_end(sock)
    assert data.startswith(b"HTTP/1.1 413 ")
    assert end == "eof"


@pytest.fixture(scope="module")
def deadline_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = gateway(
        "gw-body-deadline",
        {"data_dir": tmp_path_factory.mktemp("deadline"), **no_engine(), "server.body_timeout_s": 1.5},
    ).start()
    yield server
    server.stop()


def test_trickled_body_gets_408_at_its_deadline(deadline_gateway: ServerProcess) -> None:
    """A byte every quarter second keeps any idle timeout away; the deadline is for the whole body."""
    started = time.monotonic()
    with _send_head(deadline_gateway.port, _head(CHAT, 1000), b'{"model": ') as sock:
        while not select.select([sock], [], [], 0.25)[0]:
            sock.sendall(b" ")
        data, end = _read_to_end(sock)
    assert time.monotonic() - started >= 1.5
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"\r\nconnection: close\r\n" in head
    assert json.loads(body)["error"] == {
        "message": "The request body did not arrive within 1.5s.",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_timeout",
    }
    assert end == "eof"


@pytest.fixture(scope="module")
def capped_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir: Path = tmp_path_factory.mktemp("capped")
    server = gateway(
        "gw-body-cap",
        {
            "data_dir": data_dir,
            **no_engine(),
            "server.max_pending_bodies": 2,
            "server.body_timeout_s": 60,
            "auth.enabled": "true",
            "auth.admin_key": ADMIN_KEY,
            "server.metrics.enabled": "false",
        },
    ).start()
    yield server
    server.stop()


def _stalled(server: ServerProcess, key: str | None) -> socket.socket:
    auth = [f"authorization: Bearer {key}".encode()] if key else []
    return _send_head(server.port, _head(CHAT, 1000, *auth), b'{"model": ')


def _probe_until(server: ServerProcess, done: set[int]) -> httpx.Response:
    """Probe (no key, a whole body) until the answer's status is one of `done`."""
    deadline = time.monotonic() + 30
    while True:
        r = httpx.post(server.base_url + CHAT, json={}, timeout=30)
        if r.status_code in done or time.monotonic() > deadline:
            return r


def test_bodies_arriving_at_once_are_capped_before_auth(capped_gateway: ServerProcess) -> None:
    first, second = _stalled(capped_gateway, ADMIN_KEY), _stalled(capped_gateway, ADMIN_KEY)
    with first, second:
        busy = _probe_until(capped_gateway, {503})
        # Refused before its key is looked at: a 503, where a free gateway says 401.
        assert busy.status_code == 503, busy.text
        assert busy.json()["error"]["code"] == "server_busy" and busy.json()["error"]["type"] == "server_error"
        assert busy.headers["connection"] == "close"
        # A place frees at the latest when the oldest stalled body's 60 s run out.
        assert 30 <= int(busy.headers["retry-after"]) <= 60
        first.close()  # its place frees as the gateway sees the hang-up
        free = _probe_until(capped_gateway, {401})
        assert free.status_code == 401, free.text


def test_a_keyless_body_holds_no_place(capped_gateway: ServerProcess) -> None:
    started = time.monotonic()
    with _stalled(capped_gateway, None) as sock:
        data, end = _read_to_end(sock)
    assert data.startswith(b"HTTP/1.1 401 ") and b"\r\nconnection: close\r\n" in data
    assert end == "eof" and time.monotonic() - started < 30  # not held until the 60 s deadline
