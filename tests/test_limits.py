"""Per-tenant limits: requests/min, tokens/min, concurrency; 429 with Retry-After."""

from __future__ import annotations

import pytest

from serving.limits import RateLimited, TenantLimiter
from tests.clock import ManualClock
from tuneserve.config import TenantLimits


def test_requests_per_minute_bucket() -> None:
    clock = ManualClock(1000.0)
    limiter = TenantLimiter(TenantLimits(requests_per_minute=3), {}, clock)
    for _ in range(3):
        limiter.acquire("a")
        limiter.release("a", 0)
    with pytest.raises(RateLimited) as info:
        limiter.acquire("a")
    assert info.value.status_code == 429
    assert int(info.value.headers["Retry-After"]) == 20  # one request refills in 60/3 s
    limiter.acquire("b")  # other tenants are not affected
    clock.now += 20
    limiter.acquire("a")


def test_tokens_per_minute_charged_after_use() -> None:
    clock = ManualClock(1000.0)
    limiter = TenantLimiter(TenantLimits(tokens_per_minute=100), {}, clock)
    limiter.acquire("a")
    limiter.release("a", 250)  # a big request may overdraw once...
    with pytest.raises(RateLimited, match="tokens per minute"):
        limiter.acquire("a")  # ...then waits until the debt is repaid
    clock.now += 60 * 1.5
    with pytest.raises(RateLimited):
        limiter.acquire("a")
    clock.now += 1
    limiter.acquire("a")


def test_concurrency_and_overrides() -> None:
    limiter = TenantLimiter(TenantLimits(concurrent_requests=1), {"vip": TenantLimits(concurrent_requests=3)})
    limiter.acquire("a")
    with pytest.raises(RateLimited, match="in flight"):
        limiter.acquire("a")
    limiter.release("a", 0)
    limiter.acquire("a")
    for _ in range(3):
        limiter.acquire("vip")
    with pytest.raises(RateLimited):
        limiter.acquire("vip")


def test_unlimited_by_default() -> None:
    limiter = TenantLimiter(TenantLimits(), {})
    for _ in range(1000):
        limiter.acquire("a")


def test_a_slot_is_released_once() -> None:
    clock = ManualClock(1000.0)
    limiter = TenantLimiter(TenantLimits(concurrent_requests=2, tokens_per_minute=100), {}, clock)
    first, _ = limiter.admit_now("a"), limiter.admit_now("a")
    first.release(150)  # the answer, with its usage...
    first.release(7)  # ...then the request's way out: neither frees nor charges again
    clock.now += 31  # refills 51.7 tokens: out of the debt of 150, not of 157
    limiter.admit_now("a")
    with pytest.raises(RateLimited, match="in flight"):
        limiter.admit_now("a")


def test_concurrency_retry_after_follows_the_tenants_request_times() -> None:
    clock = ManualClock(1000.0)
    limiter = TenantLimiter(TenantLimits(concurrent_requests=1), {}, clock)
    slow = limiter.admit_now("a")
    clock.now += 20
    slow.release(0)
    held = limiter.admit_now("a")
    with pytest.raises(RateLimited, match="in flight") as info:
        limiter.admit_now("a")
    assert info.value.headers["Retry-After"] == "20"  # its one request in flight takes ~20 s
    held.release(0)  # at once: a fifth of the way from 20 s to 0
    limiter.admit_now("a")
    with pytest.raises(RateLimited) as info:
        limiter.admit_now("a")
    assert info.value.headers["Retry-After"] == "16"


def test_retry_after_stays_within_a_minute() -> None:
    clock = ManualClock(1000.0)
    limiter = TenantLimiter(TenantLimits(tokens_per_minute=1), {}, clock)
    limiter.acquire("a")
    limiter.release("a", 1000)  # a debt that takes 1000 minutes to repay
    with pytest.raises(RateLimited) as info:
        limiter.acquire("a")
    assert info.value.headers["Retry-After"] == "60"
