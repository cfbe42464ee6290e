"""Circuit breaker logic, and 503 when no engine can serve."""

from __future__ import annotations

import httpx

from serving.resilience import CircuitBreaker
from tests.clock import ManualClock
from tests.support.servers import MODEL, free_port, gateway


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
