"""Tenant limits shared by several gateways through a real Redis (limits.backend redis).

Two RedisLimiter instances on one redis-server are two gateways; the last tests run two
real gateway processes on llama.cpp and ask them with the official openai client.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import openai
import pytest
from openai import OpenAI

from benchmarks.scale_out_limits import measure_limit_across_gateways
from serving.errors import LimitsUnavailable
from serving.limits import RateLimited, Slot
from serving.limits_redis import RETRY_REDIS_S, RedisLimiter
from serving.metrics import GatewayMetrics
from tests.support.metrics import scrape, value
from tests.support.redis_server import RedisServer, redis_server, start_redis
from tests.support.servers import MODEL, ServerProcess, gateway
from tuneserve.config import LimitsConfig, RedisLimitsConfig, TenantLimits

__all__ = ["redis_server"]  # the module-scoped fixture, imported for its tests

TENANT = "acme"


def limits_config(url: str, limits: TenantLimits, **redis: Any) -> LimitsConfig:
    # A prefix per test: no test meets another's buckets in the shared server.
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    return LimitsConfig(
        backend="redis", redis=RedisLimitsConfig(url=url, key_prefix=prefix, **redis), default=limits
    )


@pytest.fixture
async def gateways(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., list[RedisLimiter]]]:
    """Limiters on one config: `make(config, n)` gives n gateways sharing its Redis keys."""
    made: list[RedisLimiter] = []

    def make(config: LimitsConfig, n: int = 2) -> list[RedisLimiter]:
        new = [RedisLimiter(config) for _ in range(n)]
        made.extend(new)
        return new

    yield make
    for limiter in made:
        await limiter.aclose()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, to stop and start."""
    server = start_redis(tmp_path)
    yield server
    server.stop()


async def admitted(limiter: RedisLimiter, n: int) -> list[Slot]:
    slots = []
    for _ in range(n):
        try:
            slots.append(await limiter.admit(TENANT))
        except RateLimited:
            pass
    return slots


async def eventually(admit: Callable[[], Awaitable[Slot]], timeout_s: float = 20) -> Slot:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await admit()
        except (RateLimited, LimitsUnavailable):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_requests_per_minute_hold_across_two_gateways(redis_server: RedisServer, gateways: Any) -> None:
    a, b = gateways(limits_config(redis_server.url, TenantLimits(requests_per_minute=10)))
    counts = [len(await admitted(a, 1)) + len(await admitted(b, 1)) for _ in range(10)]
    assert sum(counts) == 10  # not 20: one bucket for both
    with pytest.raises(RateLimited, match="requests per minute") as info:
        await b.admit(TENANT)
    assert info.value.status_code == 429
    assert 1 <= int(info.value.headers["Retry-After"]) <= 6  # one request refills in 60/10 s
    assert (await a.admit("globex")) is not None  # another tenant has its own bucket


async def test_tokens_charged_on_one_gateway_count_on_the_other(redis_server: RedisServer, gateways: Any) -> None:
    a, b = gateways(limits_config(redis_server.url, TenantLimits(tokens_per_minute=100)))
    slot = await a.admit(TENANT)
    slot.release(250)  # may overdraw once, as in-process
    slot.release(7)  # only the first release counts
    await a.drain()
    with pytest.raises(RateLimited, match="tokens per minute") as info:
        await b.admit(TENANT)
    # 150 tokens of debt and one more: 151 * 60/100 s, beyond the 60 s Retry-After cap.
    assert info.value.headers["Retry-After"] == "60"


async def test_concurrency_holds_across_two_gateways(redis_server: RedisServer, gateways: Any) -> None:
    a, b = gateways(limits_config(redis_server.url, TenantLimits(concurrent_requests=2)))
    first, _ = await a.admit(TENANT), await b.admit(TENANT)
    for limiter in (a, b):
        with pytest.raises(RateLimited, match="in flight"):
            await limiter.admit(TENANT)
    first.release(0)
    await a.drain()
    await b.admit(TENANT)  # the place a gave back


async def test_a_crashed_gateways_slots_come_back_after_their_lease(redis_server: RedisServer, gateways: Any) -> None:
    crashed, alive = gateways(limits_config(redis_server.url, TenantLimits(concurrent_requests=1), lease_s=3))
    await crashed.admit(TENANT)
    await crashed.aclose()  # gone without a release: nobody renews its lease now
    with pytest.raises(RateLimited, match="in flight"):
        await alive.admit(TENANT)
    await eventually(lambda: alive.admit(TENANT))


async def test_renewals_keep_a_long_requests_lease(redis_server: RedisServer, gateways: Any) -> None:
    a, b = gateways(limits_config(redis_server.url, TenantLimits(concurrent_requests=1), lease_s=1.5))
    long_request = await a.admit(TENANT)
    await asyncio.sleep(4.5)  # three leases long: only renewals every 0.5 s keep it
    with pytest.raises(RateLimited, match="in flight"):
        await b.admit(TENANT)
    long_request.release(0)
    await a.drain()
    await b.admit(TENANT)


async def test_fail_closed_answers_503_while_redis_is_down(own_redis: RedisServer, gateways: Any) -> None:
    (a,) = gateways(limits_config(own_redis.url, TenantLimits(requests_per_minute=100)), n=1)
    metrics = GatewayMetrics(["m"])
    metrics.watch_limits(a.health)
    (await a.admit(TENANT)).release(0)
    assert metrics.registry.get_sample_value("tuneserve_limits_backend_up", {"backend": "redis"}) == 1
    own_redis.stop()
    for _ in range(3):
        with pytest.raises(LimitsUnavailable) as info:
            await a.admit(TENANT)
    error = info.value
    assert error.status_code == 503 and int(error.headers["Retry-After"]) >= 1
    assert error.body()["error"]["code"] == "limits_unavailable"
    a.overrides["free"] = TenantLimits()
    await a.admit("free")  # a tenant without limits needs no Redis
    assert metrics.registry.get_sample_value("tuneserve_limits_backend_up", {"backend": "redis"}) == 0
    assert metrics.registry.get_sample_value("tuneserve_limits_degraded_total", {"policy": "fail_closed"}) == 3
    own_redis.start()
    await eventually(lambda: a.admit(TENANT))
    assert metrics.registry.get_sample_value("tuneserve_limits_backend_up", {"backend": "redis"}) == 1


async def test_local_share_admits_limit_over_n_then_shares_again(own_redis: RedisServer, gateways: Any) -> None:
    config = limits_config(own_redis.url, TenantLimits(requests_per_minute=10), on_unreachable="local_share", gateways=2)
    a, b = gateways(config)
    metrics = GatewayMetrics(["m"])
    metrics.watch_limits(a.health)
    own_redis.stop()
    assert len(await admitted(a, 8)) == 5  # 10 / 2 gateways, in this process
    assert metrics.registry.get_sample_value("tuneserve_limits_backend_up", {"backend": "redis"}) == 0
    assert metrics.registry.get_sample_value("tuneserve_limits_degraded_total", {"policy": "local_share"}) == 8
    own_redis.start()  # empty: as a Redis that lost its state
    await asyncio.sleep(RETRY_REDIS_S + 0.2)  # the breaker lets the next request try Redis
    counts = [len(await admitted(a, 1)) + len(await admitted(b, 1)) for _ in range(10)]
    assert sum(counts) == 10  # shared again: 10 across both, not 5 + 5 locally nor 20
    assert metrics.registry.get_sample_value("tuneserve_limits_backend_up", {"backend": "redis"}) == 1
    assert metrics.registry.get_sample_value("tuneserve_limits_degraded_total", {"policy": "local_share"}) == 8


def test_benchmark_ratio_across_gateways(redis_server: RedisServer) -> None:
    result = measure_limit_across_gateways(redis_server.url, seconds=1.5)
    assert result["redis"]["ratio"] <= 1.05 and result["redis"]["concurrency_ratio"] <= 1
    assert result["local"]["ratio"] > 1.5  # each in-process limiter lets a whole limit through


# --- two real gateways ---------------------------------------------------------------

E2E_RPM = 3
QUESTION = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def two_gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, list[ServerProcess]]]:
    redis = start_redis(tmp_path_factory.mktemp("redis-e2e"))
    settings = {
        "limits.backend": "redis",
        "limits.redis.url": redis.url,
        "limits.redis.key_prefix": json.dumps(f"e2e:{uuid.uuid4().hex[:8]}:"),  # flags parse as YAML
        # Without auth every request is the dev tenant's: it gets the default limits.
        "limits.default.requests_per_minute": E2E_RPM,
    }
    servers: list[ServerProcess] = []
    try:
        for name in ("gw-limits-a", "gw-limits-b"):
            servers.append(gateway(name, settings).start())
        yield redis, servers
    finally:
        for server in servers:
            server.stop()
        redis.stop()


def chat(server: ServerProcess) -> Any:
    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)  # type: ignore[arg-type]


def test_a_tenant_limit_holds_across_two_gateway_processes(two_gateways: tuple[RedisServer, list[ServerProcess]]) -> None:
    redis, (a, b) = two_gateways
    outcomes: list[tuple[str, str]] = []
    started = time.monotonic()
    # Until each gateway has refused once: on a loaded machine the bucket refills one
    # request every 60 / E2E_RPM s while the loop runs, so the count admitted is bounded
    # by the time taken, not fixed.
    for server in (a, b) * (4 * E2E_RPM):
        try:
            chat(server)
            outcomes.append((server.name, "ok"))
        except openai.RateLimitError as exc:
            assert exc.code == "rate_limit_exceeded"
            assert int(exc.response.headers["retry-after"]) >= 1
            outcomes.append((server.name, "429"))
        if {name for name, o in outcomes if o == "429"} == {a.name, b.name}:
            break
    refilled = int((time.monotonic() - started) * E2E_RPM / 60)
    assert refilled < E2E_RPM, "the loop took over a minute: too slow to tell one shared limit from two"
    assert E2E_RPM <= [o for _, o in outcomes].count("ok") <= E2E_RPM + refilled  # not 2 * E2E_RPM
    assert {name for name, o in outcomes if o == "ok"} == {a.name, b.name}
    assert {name for name, o in outcomes if o == "429"} == {a.name, b.name}
    for server in (a, b):
        assert value(scrape(server.base_url), "tuneserve_limits_backend_up", backend="redis") == 1

    redis.stop()  # fail_closed, the default policy
    try:
        with pytest.raises(openai.InternalServerError) as info:
            chat(b)
        assert info.value.status_code == 503 and info.value.code == "limits_unavailable"
        assert int(info.value.response.headers["retry-after"]) >= 1
        samples = scrape(b.base_url)
        assert value(samples, "tuneserve_limits_backend_up", backend="redis") == 0
        assert value(samples, "tuneserve_limits_degraded_total", policy="fail_closed") >= 1
    finally:
        redis.start()  # empty again: the tenant's bucket is full
    deadline = time.monotonic() + 30
    while True:
        try:
            chat(b)
            break
        except openai.InternalServerError:
            assert time.monotonic() < deadline, "gateway b never used Redis again"
            time.sleep(0.3)
    assert value(scrape(b.base_url), "tuneserve_limits_backend_up", backend="redis") == 1
