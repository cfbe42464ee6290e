"""A tenant's limit across two gateways: admitted/allowed with Redis limits and in-process ones.

Two limiters stand for two gateways (the limiter is all a gateway adds to admission), each
driven by more workers than the tenant's concurrency and faster than its requests/min,
for a few seconds. Allowed is what the limit lets through in that time (a minute's
burst plus the refill); with Redis the ratio should stay at 1 (goal <= 1.05), with
in-process limits it is about 2, one full limit per gateway. The same for the peak of
requests in flight against the concurrency limit.

Usage: .venv/bin/python benchmarks/scale_out_limits.py [--seconds 3]   (starts its own redis-server)
benchmarks/scale_out.py calls measure_limit_across_gateways().
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.limits import Limits, RateLimited, TenantLimiter  # noqa: E402
from serving.limits_redis import RedisLimiter  # noqa: E402
from tuneserve.config import LimitsConfig, RedisLimitsConfig, TenantLimits  # noqa: E402

TENANT = "bench"
LIMITS = TenantLimits(requests_per_minute=300, concurrent_requests=4)
GATEWAYS = 2
WORKERS_PER_GATEWAY = 8  # twice the concurrency limit: demand always exceeds it
HOLD_S = 0.01  # how long an admitted request keeps its slot
BACKOFF_S = 0.002  # a refused worker's pause before it asks again


async def _drive(gateways: list[Limits], seconds: float) -> dict[str, Any]:
    admitted = refused = in_flight = peak = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def worker(limiter: Limits) -> None:
        nonlocal admitted, refused, in_flight, peak
        while loop.time() < end:
            try:
                slot = await limiter.admit(TENANT)
            except RateLimited:
                refused += 1
                await asyncio.sleep(BACKOFF_S)
                continue
            admitted += 1
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(HOLD_S)
            in_flight -= 1
            slot.release(0)

    started = time.monotonic()
    await asyncio.gather(*(worker(g) for g in gateways for _ in range(WORKERS_PER_GATEWAY)))
    elapsed = time.monotonic() - started
    rpm = LIMITS.requests_per_minute
    concurrency = LIMITS.concurrent_requests
    assert rpm and concurrency
    allowed = rpm + rpm / 60 * elapsed  # the bucket starts full: a minute's burst, then the rate
    return {
        "seconds": round(elapsed, 2),
        "admitted": admitted,
        "refused": refused,
        "allowed": round(allowed, 1),
        "ratio": round(admitted / allowed, 3),
        "peak_in_flight": peak,
        "concurrency_ratio": round(peak / concurrency, 3),
    }


async def _measure(redis_url: str, seconds: float) -> dict[str, Any]:
    config = LimitsConfig(
        backend="redis",
        # A prefix of its own: a run never meets an earlier run's buckets.
        redis=RedisLimitsConfig(url=redis_url, key_prefix=f"bench:{uuid.uuid4().hex[:8]}:", timeout_s=1.0),
        default=LIMITS,
    )
    shared = [RedisLimiter(config) for _ in range(GATEWAYS)]
    try:
        redis = await _drive(list(shared), seconds)
        degraded = sum(limiter.health.degraded for limiter in shared)
    finally:
        for limiter in shared:
            await limiter.aclose()
    local = await _drive([TenantLimiter(LIMITS, {}) for _ in range(GATEWAYS)], seconds)
    return {
        "gateways": GATEWAYS,
        "tenant_limits": LIMITS.model_dump(exclude_none=True),
        "redis": {**redis, "decided_without_redis": degraded},
        "local": local,
        "goal": "redis ratio <= 1.05 (local: about 2)",
    }


def measure_limit_across_gateways(redis_url: str, seconds: float = 3.0) -> dict[str, Any]:
    """admitted/allowed of one tenant's limit over two gateways, Redis-backed and in-process."""
    return asyncio.run(_measure(redis_url, seconds))


def main() -> None:
    from common import machine, write_result

    from tests.support.redis_server import start_redis

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        server = start_redis(Path(directory))
        try:
            result = measure_limit_across_gateways(server.url, args.seconds)
        finally:
            server.stop()
    result["machine"] = machine()
    print(json.dumps(result, indent=2))
    write_result("scale_out_limits", result)


if __name__ == "__main__":
    main()
