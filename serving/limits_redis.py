"""Per-tenant limits held across every gateway, in Redis (limits.backend redis).

Buckets and leases live in Redis and change only inside Lua scripts
(serving/limits_scripts.py), one call per admission, so two gateways admitting at the
same instant cannot both take the last request of a minute. Concurrency is counted in
leases that expire: this gateway renews the leases of its requests in flight every
lease_s/3, and a gateway that dies stops renewing, so its slots come back after
lease_s instead of never.

Redis that does not answer within limits.redis.timeout_s is unreachable, and the
configured policy decides: fail_closed refuses with 503, local_share admits against
this process's own buckets at limit/gateways. Both count every request so decided
(LimitsHealth, exported by serving/metrics.py): limits are never silently multiplied.
After a few failures in a row, Redis is tried again by one request a second (a
circuit breaker), so an outage costs at most one timeout a second, not one a request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from serving import limits_scripts
from serving.errors import LimitsUnavailable
from serving.limits import UNLIMITED, LimitsHealth, RateLimited, Slot, TenantLimiter, limited
from serving.resilience import CircuitBreaker
from tuneserve.config import LimitsConfig, TenantLimits

log = logging.getLogger(__name__)

# Consecutive failures that make Redis unreachable: one slow answer (a fork for a
# snapshot, a GC pause) costs its own request the policy, not a second of requests.
FAILURES_TO_OPEN = 3
# How long Redis, once unreachable, is left alone before one request tries it again.
RETRY_REDIS_S = 1.0
# Releases that could not be sent wait for Redis to come back, up to this many: beyond
# it the oldest are dropped (their leases expire on their own; only their token charge
# is lost), so an outage cannot grow the gateway's memory without bound.
MAX_UNSENT_RELEASES = 10_000

_REFUSALS = {
    1: "has {limits.concurrent_requests} requests in flight, its concurrency limit",
    2: "is over {limits.tokens_per_minute:g} tokens per minute",
    3: "is over {limits.requests_per_minute:g} requests per minute",
}


def shared_limits(limits: TenantLimits, gateways: int) -> TenantLimits:
    """One gateway's share of a tenant's limits (local_share): each divided by gateways."""
    concurrency = limits.concurrent_requests
    return TenantLimits(
        requests_per_minute=limits.requests_per_minute / gateways if limits.requests_per_minute else None,
        tokens_per_minute=limits.tokens_per_minute / gateways if limits.tokens_per_minute else None,
        concurrent_requests=max(1, concurrency // gateways) if concurrency else None,
    )


@dataclass(frozen=True)
class _Release:
    tenant: str
    tokens_per_minute: float
    tokens_used: int
    lease: str
    duration_ms: float


class RedisSlot:
    def __init__(self, limiter: "RedisLimiter", tenant: str, limits: TenantLimits, lease: str, admitted_at: float) -> None:
        self._limiter = limiter
        self._tenant = tenant
        self._limits = limits
        self._lease = lease
        self._admitted_at = admitted_at
        self._held = True

    def release(self, tokens_used: int) -> None:
        # As TenantSlot: the answer releases with its usage, every way out again.
        if self._held:
            self._held = False
            self._limiter.release(self._tenant, self._limits, self._lease, tokens_used, self._admitted_at)


class RedisLimiter:
    def __init__(
        self,
        config: LimitsConfig,
        client: Redis | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.defaults = config.default
        self.overrides = config.per_tenant
        self._config = config.redis
        self._clock = clock
        redis_config = config.redis
        # No retries inside redis-py: timeout_s is the whole wait, and the breaker
        # decides when to try again.
        self._redis = client or Redis.from_url(
            redis_config.url,
            socket_timeout=redis_config.timeout_s,
            socket_connect_timeout=redis_config.timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._admit_script = self._redis.register_script(limits_scripts.ADMIT)
        self._release_script = self._redis.register_script(limits_scripts.RELEASE)
        self._renew_script = self._redis.register_script(limits_scripts.RENEW)
        self._lease_ms = round(redis_config.lease_s * 1000)
        self._breaker = CircuitBreaker(FAILURES_TO_OPEN, RETRY_REDIS_S, clock)
        self.health = LimitsHealth("redis", redis_config.on_unreachable)
        self._local: TenantLimiter | None = None
        if redis_config.on_unreachable == "local_share":
            n = redis_config.gateways
            self._local = TenantLimiter(
                shared_limits(config.default, n),
                {tenant: shared_limits(limits, n) for tenant, limits in config.per_tenant.items()},
                clock,
            )
        # Lease ids name their gateway, so a look at Redis tells whose slots are held.
        self._gateway_id = uuid.uuid4().hex[:12]
        self._lease_numbers = itertools.count(1)
        self._held: dict[str, set[str]] = collections.defaultdict(set)
        self._unsent: collections.deque[_Release] = collections.deque(maxlen=MAX_UNSENT_RELEASES)
        self._sending: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None

    def _keys(self, tenant: str) -> tuple[str, str]:
        tagged = f"{self._config.key_prefix}{{{tenant}}}"
        return f"{tagged}:state", f"{tagged}:leases"

    async def admit(self, tenant: str) -> Slot:
        limits = self.overrides.get(tenant, self.defaults)
        if not limited(limits):
            return UNLIMITED
        self._ensure_renewer()
        trial = self._breaker.state == "half_open"
        if not self._breaker.allow_request():
            return self._without_redis(tenant)
        lease = f"{self._gateway_id}:{next(self._lease_numbers)}" if limits.concurrent_requests else ""
        try:
            result = await self._call(
                self._admit_script,
                self._keys(tenant),
                [
                    limits.requests_per_minute or 0,
                    limits.tokens_per_minute or 0,
                    limits.concurrent_requests or 0,
                    lease,
                    self._lease_ms,
                ],
            )
        except _Unreachable as exc:
            self._went_down(exc)
            return self._without_redis(tenant)
        except BaseException:
            if trial:  # cancelled mid-trial: let the next request try, not none ever
                self._breaker.record_failure()
            raise
        self._came_up()
        reason, wait_ms = int(result[0]), int(result[1]) if len(result) > 1 else 0
        if reason:
            why = _REFUSALS[reason].format(limits=limits)
            raise RateLimited(f"Tenant '{tenant}' {why}.", wait_ms / 1000)
        if lease:
            self._held[tenant].add(lease)
        return RedisSlot(self, tenant, limits, lease, self._clock())

    def release(self, tenant: str, limits: TenantLimits, lease: str, tokens_used: int, admitted_at: float) -> None:
        if lease:
            # No longer renewed from now on, even if Redis never hears of the release.
            held = self._held.get(tenant)
            if held is not None:
                held.discard(lease)
                if not held:
                    del self._held[tenant]
        tpm = limits.tokens_per_minute or 0
        if not lease and not (tpm and tokens_used):
            return
        # The mean duration only matters to concurrency refusals.
        duration_ms = (self._clock() - admitted_at) * 1000 if lease else -1.0
        task = asyncio.get_running_loop().create_task(self._send(_Release(tenant, tpm, tokens_used, lease, duration_ms)))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, release: _Release) -> None:
        try:
            await self._call(self._release_script, self._keys(release.tenant), _release_args(release))
        except _Unreachable as exc:
            self._unsent.append(release)
            self._went_down(exc)
        else:
            self._came_up()

    def _without_redis(self, tenant: str) -> Slot:
        self.health.degraded += 1
        if self._local is None:
            raise LimitsUnavailable(
                "Rate limits cannot be checked right now (their store is unreachable); try again shortly.",
                max(self._breaker.seconds_until_trial(), RETRY_REDIS_S),
            )
        return self._local.admit_now(tenant)

    async def _call(self, script: Any, keys: tuple[str, str], args: list[Any]) -> Any:
        try:
            async with asyncio.timeout(self._config.timeout_s):
                return await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise _Unreachable(exc) from exc

    def _went_down(self, exc: _Unreachable) -> None:
        self._breaker.record_failure()
        if self.health.up is not False:
            what = "503 for limited tenants" if self._local is None else f"local limits at 1/{self._config.gateways}"
            log.warning("Redis for limits unreachable (%s): %s until it answers", exc, what)
        self.health.up = False

    def _came_up(self) -> None:
        self._breaker.record_success()
        if self.health.up is False:
            log.warning("Redis for limits answers again: limits are shared across gateways again")
        self.health.up = True

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever(), name="limits-lease-renewer")

    async def _renew_forever(self) -> None:
        interval = self._config.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            if self._held or self._unsent:
                await self._renew_once()

    async def _renew_once(self) -> None:
        """Renew every lease held, and send the releases an outage kept back: one round trip."""
        unsent = list(self._unsent)
        held = [(tenant, list(leases)) for tenant, leases in self._held.items()]
        try:
            async with asyncio.timeout(self._config.timeout_s):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for tenant, leases in held:
                        await self._renew_script(keys=[self._keys(tenant)[1]], args=[self._lease_ms, *leases], client=pipe)
                    for release in unsent:
                        await self._release_script(keys=self._keys(release.tenant), args=_release_args(release), client=pipe)
                    renewed = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._went_down(_Unreachable(exc))
            return
        self._came_up()
        for _ in unsent:
            self._unsent.popleft()
        lost = sum(len(leases) for _, leases in held) - sum(int(n) for n in renewed[: len(held)])
        if lost > 0:
            log.warning("%d concurrency leases had expired before renewal (Redis out of reach for longer than a lease)", lost)

    async def drain(self) -> None:
        """Wait until the releases started so far have reached Redis (or been kept back)."""
        while self._sending:
            await asyncio.gather(*self._sending)

    async def aclose(self) -> None:
        """Stop renewing and close the connections. The leases of requests still in
        flight are left to expire: their requests are still running somewhere."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        await self.drain()
        await self._redis.aclose()


class _Unreachable(Exception):
    """Redis did not answer in time, or not at all."""


def _release_args(release: _Release) -> list[Any]:
    return [release.tokens_per_minute, release.tokens_used, release.lease, release.duration_ms]
