"""vLLM launched and supervised by the gateway; killed; llama.cpp takes over; vLLM returns."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
from typing import Iterator

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support.metrics import scrape, value
from tests.support.servers import MODEL, TEST_VLLM_LAUNCH, ServerProcess, free_port, gateway
from tests.support.waiting import wait_for

pytestmark = pytest.mark.vllm

LONG = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]


def engine_status(server: ServerProcess, name: str) -> dict:
    return httpx.get(server.base_url + "/ready", timeout=10).json()["engines"][name]




@pytest.fixture(scope="module")
def launched() -> Iterator[ServerProcess]:
    server = gateway(
        "gw-launch",
        {
            "engines.vllm.enabled": "true",
            "engines.vllm.launch.enabled": "true",
            "engines.vllm.launch.port": free_port(),
            "engines.vllm.launch.dtype": TEST_VLLM_LAUNCH["dtype"],
            "engines.vllm.launch.extra_args": json.dumps(TEST_VLLM_LAUNCH["extra_args"]),
            # vLLM's start-up takes every core of a small machine, which slows llama.cpp
            # many times over; the pause lets the fallback checks run on a quiet CPU.
            "engines.vllm.launch.restart_backoff_s": 10,
            "engines.vllm.health_interval_s": 0.5,
        },
    ).start()
    try:
        wait_for(lambda: engine_status(server, "vllm")["ready"], 400, "the launched vLLM")
        yield server
    finally:
        server.stop()


def backend_of(server: ServerProcess) -> str:
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.headers["x-tuneserve-backend"]


def test_kill_vllm_falls_back_then_recovers(launched: ServerProcess) -> None:
    assert backend_of(launched) == "vllm"
    status = engine_status(launched, "vllm")
    pid, restarts = status["extra"]["pid"], status["extra"]["restarts"]
    client = OpenAI(base_url=launched.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    # A stream in flight on vLLM when it dies ends with an error event, not a hang.
    stream = client.chat.completions.create(
        model=MODEL, messages=LONG, max_tokens=1500, temperature=0, stream=True
    )
    received = []
    whole: concurrent.futures.Future[httpx.Response] | None = None
    with concurrent.futures.ThreadPoolExecutor(1) as pool, pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
            if len(received) == 1 and whole is None:
                whole = pool.submit(
                    httpx.post,
                    launched.base_url + "/v1/chat/completions",
                    json={"model": MODEL, "messages": LONG, "max_tokens": 64, "temperature": 0},
                    timeout=120,
                )
            if len(received) == 3:
                os.killpg(pid, signal.SIGKILL)  # vLLM and its engine processes crash
    assert len(received) >= 3
    assert "vLLM" in str(info.value)
    # A non-streamed request in flight has sent the client nothing yet: llama.cpp answers it.
    assert whole is not None
    response = whole.result()
    assert response.status_code == 200, response.text
    assert response.headers["x-tuneserve-backend"] == "llamacpp"
    assert response.json()["usage"]["completion_tokens"] > 0

    # Requests not yet started are answered by llama.cpp, with no error.
    before = scrape(launched.base_url)
    for _ in range(4):
        assert backend_of(launched) == "llamacpp"
    after = scrape(launched.base_url)
    assert value(after, "tuneserve_fallbacks_total", from_backend="vllm", to_backend="llamacpp") > value(
        before, "tuneserve_fallbacks_total", from_backend="vllm", to_backend="llamacpp"
    )
    assert value(after, "tuneserve_backend_up", backend="vllm") == 0
    assert httpx.get(launched.base_url + "/ready").status_code == 200  # llama.cpp still serves

    # The supervisor restarts vLLM and traffic returns to it.
    wait_for(lambda: engine_status(launched, "vllm")["ready"], 400, "vLLM to come back")
    assert backend_of(launched) == "vllm"
    status = engine_status(launched, "vllm")
    assert status["extra"]["restarts"] == restarts + 1
    assert status["extra"]["pid"] != pid


def test_fallback_when_vllm_unreachable() -> None:
    """A configured vLLM that never answers: every request still succeeds on llama.cpp."""
    server = gateway(
        "gw-deadvllm",
        {"engines.vllm.enabled": "true", "engines.vllm.url": f"http://127.0.0.1:{free_port()}"},
    ).start(ready_path="/ready")
    try:
        assert backend_of(server) == "llamacpp"
        samples = scrape(server.base_url)
        assert value(samples, "tuneserve_backend_up", backend="vllm") == 0
        assert value(samples, "tuneserve_fallbacks_total", from_backend="vllm", reason="not_ready") >= 1
    finally:
        server.stop()
