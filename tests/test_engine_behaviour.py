"""llama.cpp engine behaviour through the gateway: cancellation, queue limits, metrics."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.support.metrics import scrape, value
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, gateway
from tuneserve.gguf.llama_loader import gguf_file_type, llama_runtime
from tuneserve.models.prepare import GGUF_NAME

# Answered at length by both the f16 and the Q8_0 model ("count to 1000" stops at 20,
# which the faster Q8_0 finishes inside the tests' timeouts).
LONG = [{"role": "user", "content": "Write a long, detailed essay about the history of the Roman Empire."}]


def llama_status(server: ServerProcess) -> dict:
    return httpx.get(server.base_url + "/ready", timeout=10).json()["engines"]["llamacpp"]["extra"]


def test_client_disconnect_cancels_generation(llama_gateway: ServerProcess) -> None:
    before = scrape(llama_gateway.base_url)
    body = {"model": MODEL, "messages": LONG, "max_tokens": 1800, "temperature": 0, "stream": True}
    with httpx.stream("POST", llama_gateway.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert llama_status(llama_gateway)["busy_workers"] == 1
    # Closing the connection must free the worker long before 1800 tokens are done.
    deadline = time.monotonic() + 5
    while llama_status(llama_gateway)["busy_workers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert llama_status(llama_gateway)["busy_workers"] == 0
    after = scrape(llama_gateway.base_url)
    assert value(after, "tuneserve_requests_total", status="499") == value(before, "tuneserve_requests_total", status="499") + 1
    generated = value(after, "tuneserve_completion_tokens_total") - value(before, "tuneserve_completion_tokens_total")
    assert 0 < generated < 1800


def test_non_streamed_disconnect_cancels_too(llama_gateway: ServerProcess) -> None:
    body = {"model": MODEL, "messages": LONG, "max_tokens": 1800, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(llama_gateway.base_url + "/v1/chat/completions", json=body, timeout=1.5)
    deadline = time.monotonic() + 5
    while llama_status(llama_gateway)["busy_workers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert llama_status(llama_gateway)["busy_workers"] == 0


def test_full_queue_answers_429_with_retry_after() -> None:
    server = gateway("gw-queue", {"engines.llamacpp.queue_size": 1}).start()
    body = {"model": MODEL, "messages": LONG, "max_tokens": 200, "temperature": 0, "stream": True}

    async def burst() -> list[tuple[int, dict[str, str], dict]]:
        # Streamed: an accepted request answers 200 at its first token and is held open
        # until the running one, the three rejected ones have answered, so the worker and
        # the queue slot are taken when the burst arrives however slowly a loaded machine
        # generates; then each is closed (waiting for 2 x 200 tokens timed out under load).
        answered: list[int] = []
        all_but_the_queued_one = asyncio.Event()

        async def one(client: httpx.AsyncClient) -> tuple[int, dict[str, str], dict]:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                answered.append(r.status_code)
                if len(answered) >= 4:
                    all_but_the_queued_one.set()
                if r.status_code != 200:
                    return r.status_code, dict(r.headers), json.loads(await r.aread())
                await all_but_the_queued_one.wait()
                return r.status_code, dict(r.headers), {}

        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(5)))

    try:
        responses = asyncio.run(burst())
        codes = sorted(code for code, _, _ in responses)
        assert codes == [200, 200, 429, 429, 429], codes
        _, headers, error = next(r for r in responses if r[0] == 429)
        assert int(headers["retry-after"]) >= 1
        assert error["error"]["type"] == "rate_limit_error"
    finally:
        server.stop()


def test_metrics_cover_requests_latency_tokens(llama_gateway: ServerProcess) -> None:
    before = scrape(llama_gateway.base_url)
    r = httpx.post(
        llama_gateway.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True},
        timeout=60,
    )
    assert r.status_code == 200
    httpx.post(llama_gateway.base_url + "/v1/chat/completions", json={"model": "nope", "messages": []}, timeout=10)
    httpx.post(llama_gateway.base_url + "/v1/chat/completions", json={"model": "other-model", "messages": [{"role": "user", "content": "x"}]}, timeout=10)
    after = scrape(llama_gateway.base_url)

    ok = dict(endpoint="chat", backend="llamacpp", model=MODEL, status="200")
    assert value(after, "tuneserve_requests_total", **ok) == value(before, "tuneserve_requests_total", **ok) + 1
    assert value(after, "tuneserve_requests_total", status="400", backend="none") >= 1
    # Unknown model names do not create label values.
    assert value(after, "tuneserve_requests_total", status="404", model="unknown") >= 1
    assert not any(l.get("model") in {"nope", "other-model"} for l, _ in after["tuneserve_requests_total"])

    labels = dict(backend="llamacpp", model=MODEL)
    for histogram in ("tuneserve_time_to_first_token_seconds", "tuneserve_inter_token_latency_seconds"):
        assert value(after, histogram + "_count", **labels) > value(before, histogram + "_count", **labels)
    assert value(after, "tuneserve_request_duration_seconds_count", **labels) > value(before, "tuneserve_request_duration_seconds_count", **labels)
    tokens = value(after, "tuneserve_completion_tokens_total", **labels) - value(before, "tuneserve_completion_tokens_total", **labels)
    assert 0 < tokens <= 8
    assert value(after, "tuneserve_prompt_tokens_total", **labels) > value(before, "tuneserve_prompt_tokens_total", **labels)
    assert value(after, "tuneserve_backend_up", backend="llamacpp") == 1
    assert ({"backend": "llamacpp"}, 0.0) in after["tuneserve_queue_depth"]
    assert value(after, "tuneserve_requests_in_flight") == 0
    buckets = [float(l["le"]) for l, _ in after["tuneserve_time_to_first_token_seconds_bucket"] if l["backend"] == "llamacpp" and l["le"] != "+Inf"]
    assert min(buckets) <= 0.01 and max(buckets) >= 30


def test_ready_says_which_llama_cpp_path_this_host_takes(llama_gateway: ServerProcess) -> None:
    status = llama_status(llama_gateway)
    runtime = llama_runtime()
    assert status["gguf_type"] == gguf_file_type(DATA_DIR / "models" / MODEL / GGUF_NAME)
    assert status["system_info"] == runtime.system_info and "AVX2 = 1" in status["system_info"]
    assert status["extra_buffer_types"] is runtime.extra_buffer_types
    assert status["why"].startswith("auto: ")
