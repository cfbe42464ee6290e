"""Client mistakes get a 4xx in OpenAI's error shape, never a 5xx."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, AsyncGenerator, Protocol

import httpx
import openai
import pytest
from fastapi import Query
from openai import OpenAI
from pydantic import BaseModel
from starlette.testclient import TestClient

from serving.api.app import create_app
from serving.engines.base import Engine, EngineStatus, GenerationEvent, GenerationRequest, TextDelta, Usage
from tests.support.metrics import scrape, value
from tests.support.servers import MODEL, ServerProcess
from tuneserve.config import load_settings

CHAT = "/v1/chat/completions"
GOOD: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def post(server: ServerProcess, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(server.base_url + path, timeout=60, **kwargs)


class _Response(Protocol):
    """httpx's, or the TestClient's (httpx2)."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


def assert_openai_error(response: _Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_malformed_json(llama_gateway: ServerProcess) -> None:
    r = post(llama_gateway, CHAT, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    error = assert_openai_error(r, 400)
    assert "JSON" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_body_must_be_an_object(llama_gateway: ServerProcess) -> None:
    assert_openai_error(post(llama_gateway, CHAT, json=[1, 2]), 400)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stream": "yes"}, "stream"),
        ({"seed": "abc"}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 0}, "n"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools.0.function.name"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": 7}, "model"),
    ],
)
def test_bad_parameters_get_400(llama_gateway: ServerProcess, change: dict[str, Any], param: str) -> None:
    error = assert_openai_error(post(llama_gateway, CHAT, json={**GOOD, **change}), 400)
    assert error["param"] == param, error


def test_missing_model_and_messages(llama_gateway: ServerProcess) -> None:
    error = assert_openai_error(post(llama_gateway, CHAT, json={"messages": GOOD["messages"]}), 400, "model")
    assert "Missing required parameter" in error["message"]
    assert_openai_error(post(llama_gateway, CHAT, json={"model": MODEL}), 400, "messages")


def test_unknown_model_is_404(llama_gateway: ServerProcess) -> None:
    error = assert_openai_error(post(llama_gateway, CHAT, json={**GOOD, "model": "gpt-9"}), 404, "model")
    assert error["code"] == "model_not_found"


def test_oversized_body_is_413(llama_gateway: ServerProcess) -> None:
    huge = {**GOOD, "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    assert_openai_error(post(llama_gateway, CHAT, json=huge), 413)


def test_oversized_chunked_body_is_413(llama_gateway: ServerProcess) -> None:
    def body() -> Any:
        for _ in range(300):
            yield b"x" * 10_000

    assert_openai_error(post(llama_gateway, CHAT, content=body()), 413)


def test_client_gone_before_its_body_is_counted_not_logged_as_a_crash(llama_gateway: ServerProcess) -> None:
    before = scrape(llama_gateway.base_url)
    with socket.create_connection(("127.0.0.1", llama_gateway.port)) as sock:
        sock.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{\"model\": ")  # promises 1000 bytes, sends 10
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    closed = 0.0
    while time.monotonic() < deadline and not closed:
        after = scrape(llama_gateway.base_url)
        closed = value(after, "tuneserve_requests_total", status="499") - value(before, "tuneserve_requests_total", status="499")
        time.sleep(0.1)
    assert closed == 1
    assert value(after, "tuneserve_requests_total", status="500") == value(before, "tuneserve_requests_total", status="500")
    assert "Exception in ASGI application" not in llama_gateway.log_tail(20_000)


def _logged_during(server: ServerProcess, action: Any) -> tuple[Any, str]:
    """What `action()` returned and what the server logged meanwhile."""
    start = server.log_path.stat().st_size
    result = action()
    with open(server.log_path, "rb") as log:
        log.seek(start)
        return result, log.read().decode(errors="replace")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"[" * 10_000 + b"]" * 10_000, "nests deeper"),
        (b'{"model": "m", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nests deeper"),
        (b'{"model": "m", "tools": [{"x": ' + b'{"a": ' * 200 + b"1" + b"}" * 200 + b"}]}", "nests deeper"),
        (b'{"model": "m", "max_tokens": ' + b"7" * 5000 + b', "messages": []}', "more than 100 digits"),
        (b'{"model": "m", "temperature": NaN, "messages": []}', "NaN is not a JSON value"),
    ],
)
def test_hostile_json_is_400_without_a_traceback(llama_gateway: ServerProcess, body: bytes, why: str) -> None:
    response, logged = _logged_during(
        llama_gateway, lambda: post(llama_gateway, CHAT, content=body, headers={"content-type": "application/json"})
    )
    error = assert_openai_error(response, 400)
    assert error["message"].startswith("We could not parse the JSON body") and why in error["message"], error
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert "Traceback" not in logged and "unhandled error" not in logged


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages.0.content"),
        (CHAT, b'{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\uDFFF"}]}]}', "messages.0.content.0.text"),
        (CHAT, b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\udbff"]}', "stop.0"),
        ("/v1/completions", b'{"model": "%s", "prompt": "\\ud800 once"}', "prompt"),
        # Unescaped, as UTF-8 bytes: not UTF-8 proper, but json.loads decodes it.
        ("/v1/completions", b'{"model": "%s", "prompt": "once \xed\xa0\x80"}', "prompt"),
    ],
)
def test_lone_surrogate_is_400_naming_the_param(llama_gateway: ServerProcess, path: str, body: bytes, param: str) -> None:
    """llama.cpp's text.encode() failed on these (a 502); no engine may see one."""
    before = scrape(llama_gateway.base_url)
    response = post(llama_gateway, path, content=body % MODEL.encode(), headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400, param)
    assert "surrogate" in error["message"] and f"'{param}'" in error["message"]
    after = scrape(llama_gateway.base_url)
    assert value(after, "tuneserve_requests_total", status="400", backend="none") == value(before, "tuneserve_requests_total", status="400", backend="none") + 1


def test_a_surrogate_in_a_key_is_400_and_a_pair_is_text(llama_gateway: ServerProcess) -> None:
    body = b'{"model": "%s", "\\ud800": 1, "messages": [{"role": "user", "content": "hi"}]}' % MODEL.encode()
    error = assert_openai_error(post(llama_gateway, CHAT, content=body, headers={"content-type": "application/json"}), 400)
    assert error["param"] is None and "surrogate" in error["message"]
    # A pair is one character (U+1F600), and an escaped backslash is no escape at all.
    fine = b'{"model": "%s", "max_tokens": 1, "messages": [{"role": "user", "content": "\\ud83d\\ude00 \\\\ud800"}]}' % MODEL.encode()
    assert post(llama_gateway, CHAT, content=fine, headers={"content-type": "application/json"}).status_code == 200


class _RecordingEngine(Engine):
    """Answers every request with one token, and keeps what it was asked."""

    name = "llamacpp"

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    def is_ready(self) -> bool:
        return True

    def status(self) -> EngineStatus:
        return EngineStatus(self.name, True)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        self.requests.append(request)
        yield TextDelta("x", finish_reason="length")
        yield Usage(1, 1)


def test_no_engine_sees_a_lone_surrogate(tmp_path: Path) -> None:
    """Refused while parsing, before routing: vLLM (first in line) as much as llama.cpp."""
    engine = _RecordingEngine()
    client = TestClient(create_app(load_settings(environ={"TUNESERVE_DATA_DIR": str(tmp_path)}), engines=[engine]))
    bad = b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % MODEL.encode()
    assert_openai_error(client.post(CHAT, content=bad), 400, "messages.0.content")
    assert engine.requests == []
    assert client.post(CHAT, json=GOOD).status_code == 200  # the engine does serve
    assert len(engine.requests) == 1


def test_null_max_tokens_on_completions_is_openais_16(client: OpenAI) -> None:
    """Chat's null means "up to the context"; the legacy completions default to 16 either way."""
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=None, temperature=0)
    assert completion.usage is not None and completion.usage.completion_tokens <= 16
    assert completion.choices[0].finish_reason == "length"  # it ran into the 16, not into an end of text


def test_too_large_budget_names_the_param_the_client_sent(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as old:
        client.chat.completions.create(model=MODEL, messages=GOOD["messages"], max_tokens=100_000)
    with pytest.raises(openai.BadRequestError) as new:
        client.chat.completions.create(model=MODEL, messages=GOOD["messages"], max_completion_tokens=100_000)
    for info, param in ((old, "max_tokens"), (new, "max_completion_tokens")):
        assert isinstance(info.value.body, dict)
        assert info.value.body["param"] == param and info.value.body["code"] == "context_length_exceeded"


def test_prompt_longer_than_context_is_400(llama_gateway: ServerProcess) -> None:
    long_text = "hello " * 3000
    error = assert_openai_error(post(llama_gateway, CHAT, json={**GOOD, "messages": [{"role": "user", "content": long_text}]}), 400)
    assert error["code"] == "context_length_exceeded"
    error = assert_openai_error(post(llama_gateway, CHAT, json={**GOOD, "max_tokens": 100_000}), 400, "max_tokens")


def test_template_refusal_is_400(llama_gateway: ServerProcess) -> None:
    # Completions validate too: empty prompt, several prompts, echo.
    for change in ({"prompt": ""}, {"prompt": ["a", "b"]}, {"prompt": "x", "echo": True}):
        body = {"model": MODEL, "max_tokens": 2, **change}
        assert_openai_error(post(llama_gateway, "/v1/completions", json=body), 400, "prompt" if "echo" not in change else "echo")


def test_unknown_route_and_method(llama_gateway: ServerProcess) -> None:
    assert_openai_error(httpx.get(llama_gateway.base_url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(llama_gateway.base_url + CHAT), 405)


def test_openai_client_raises_typed_errors(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=GOOD["messages"])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[])
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "messages"


class _Item(BaseModel):
    name: str
    tags: list[int] = []


class _Probe(BaseModel):
    items: list[_Item]


def test_fastapi_validated_routes_name_the_param(tmp_path: Path) -> None:
    """A route FastAPI validates answers like the generation routes: OpenAI's shape, with
    `param` the field's path and the same wording (the gateway's own routes read their
    bodies themselves today; this holds the edge to it for the next one)."""
    app = create_app(load_settings(environ={"TUNESERVE_DATA_DIR": str(tmp_path)}), engines=[])

    @app.post("/probe")
    async def probe(body: _Probe, limit: int = Query()) -> dict[str, int]:
        return {"items": len(body.items), "limit": limit}

    client = TestClient(app)
    good = {"items": [{"name": "a", "tags": [1]}]}
    assert client.post("/probe?limit=2", json=good).json() == {"items": 1, "limit": 2}
    cases = [
        ("/probe?limit=x", good, "limit", "Invalid value for 'limit': "),
        ("/probe", good, "limit", "Missing required parameter: 'limit'."),
        ("/probe?limit=1", {"items": [{"name": "a", "tags": ["x"]}]}, "items.0.tags.0", "Invalid value for 'items."),
        ("/probe?limit=1", {"items": [{}]}, "items.0.name", "Missing required parameter: 'items.0.name'."),
    ]
    for url, body, param, message in cases:
        error = assert_openai_error(client.post(url, json=body), 400, param)
        assert error["message"].startswith(message), error
        assert error["type"] == "invalid_request_error"
    broken = client.post("/probe?limit=1", content=b"{nope", headers={"content-type": "application/json"})
    error = assert_openai_error(broken, 400)
    assert error["param"] is None and error["message"].startswith("We could not parse the JSON body")
