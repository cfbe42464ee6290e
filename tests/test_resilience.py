"""Circuit breaker logic, 503 when no engine can serve, and the Retry-After of 503s and
of a full llama.cpp queue, derived from the engines' state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from serving.engines.base import GenerationRequest, SamplingParams
from serving.engines.llamacpp import LlamaCppEngine
from serving.engines.vllm import VLLMEngine
from serving.errors import NoEngineAvailable, QueueFull
from serving.metrics import GatewayMetrics
from serving.resilience import CircuitBreaker
from serving.router import Router
from tests.clock import ManualClock
from tests.support.servers import MODEL, free_port, gateway
from tuneserve.config import VLLMConfig

REQUEST = GenerationRequest("r", "completion", SamplingParams(max_tokens=1), prompt="Hi")


def test_breaker_opens_after_threshold_and_half_opens_after_timeout() -> None:
    clock = ManualClock(0.0)
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=10, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow_request()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow_request()
    clock.now = 10
    assert breaker.state == "half_open"
    assert breaker.allow_request()  # one trial...
    assert not breaker.allow_request()  # ...at a time
    breaker.record_failure()  # failed trial: open again for a full timeout
    assert breaker.state == "open"
    clock.now = 20
    assert breaker.allow_request()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow_request()


def test_abandoned_trial_frees_the_slot() -> None:
    clock = ManualClock(0.0)
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=1, clock=clock)
    breaker.record_failure()
    clock.now = 1
    assert breaker.allow_request()
    breaker.release_trial()  # the client went away before any outcome
    assert breaker.allow_request()


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=1)
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"


def test_no_engine_gives_503_with_retry_after() -> None:
    server = gateway(
        "gw-noengine",
        {
            "engines.llamacpp.enabled": "false",
            "engines.vllm.enabled": "true",
            "engines.vllm.url": f"http://127.0.0.1:{free_port()}",
        },
    ).start()
    try:
        r = httpx.post(
            server.base_url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
            timeout=30,
        )
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "engine_unavailable"
        assert int(r.headers["retry-after"]) > 0
        ready = httpx.get(server.base_url + "/ready", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["engines"]["vllm"]["ready"] is False
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    finally:
        server.stop()


def test_open_circuit_tells_when_its_trial_comes() -> None:
    clock = ManualClock(0.0)
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=10, clock=clock)
    assert breaker.seconds_until_trial() == 0
    breaker.record_failure()
    clock.now = 4
    assert breaker.seconds_until_trial() == 6
    clock.now = 12
    assert breaker.seconds_until_trial() == 0  # half-open: a trial may go now


def test_no_engine_retry_after_is_when_the_engine_may_be_back() -> None:
    # Down, and never probed: the next health probe may find it back.
    engine = VLLMEngine(VLLMConfig(health_interval_s=3.2), "http://127.0.0.1:1", MODEL)
    router = Router([engine], GatewayMetrics([MODEL]))
    with pytest.raises(NoEngineAvailable) as info:
        asyncio.run(router.open(REQUEST))
    assert info.value.headers["Retry-After"] == "4"
    with pytest.raises(NoEngineAvailable) as info:
        asyncio.run(Router([], GatewayMetrics([MODEL])).open(REQUEST))
    assert info.value.headers["Retry-After"] == "5"  # nobody can tell: the default


def test_full_queue_retry_after_is_its_drain_time() -> None:
    """Queue depth x recent service time / workers: not 1 s whatever the queue."""
    engine = LlamaCppEngine(Path("unused.gguf"), n_ctx=64, queue_size=4)
    engine._workers = [object(), object()]  # type: ignore[list-item]  # two busy workers, no model
    engine._in_engine = 2 + 4  # both running, four queued
    engine._served(10.0)
    engine._served(20.0)  # recent jobs weigh most: 10 + (20 - 10) / 5 = 12 s
    assert engine.drain_time_s() == 4 * 12.0 / 2

    async def one() -> None:
        await engine.generate(REQUEST).__anext__()

    with pytest.raises(QueueFull) as info:
        asyncio.run(one())
    assert info.value.headers["Retry-After"] == "24"
