"""Per-tenant limits: requests/min, tokens/min and concurrent requests.

Rates are token buckets refilled continuously (capacity = one minute's allowance), so a
tenant can burst up to its per-minute budget and then runs at the configured rate.
Tokens are charged after the request, when usage is known; a tenant whose bucket is
in debt is refused until it refills. Over any limit: 429 with Retry-After, when the
bucket will hold enough again, or for concurrency, about when the first of the tenant's
requests in flight should end (from how long its recent requests took).

`Limits` is what the route uses; TenantLimiter is its in-process backend (one gateway),
serving/limits_redis.py the shared one (many gateways).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, get_args

from serving.errors import RetryLater
from tuneserve.config import TenantLimits


class RateLimited(RetryLater):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Slot(Protocol):
    def release(self, tokens_used: int) -> None:
        """Give the slot back, charging `tokens_used`; only the first call counts.

        Never blocks: a shared backend sends the release in the background."""


UnreachablePolicy = Literal["fail_closed", "local_share"]
UNREACHABLE_POLICIES: tuple[UnreachablePolicy, ...] = get_args(UnreachablePolicy)


@dataclass
class LimitsHealth:
    """What /metrics tells about a shared backend: whether it answers, and how many
    requests were decided without it, by the policy that decided them."""

    backend: str
    policy: UnreachablePolicy
    up: bool | None = None  # None until it was first asked
    degraded: int = 0


class Limits(Protocol):
    @property
    def health(self) -> LimitsHealth | None:
        """None for in-process limits: nothing there can be unreachable."""

    async def admit(self, tenant: str) -> Slot:
        """Admit one request of `tenant` or raise RateLimited (or, for a shared backend
        that cannot be reached under fail_closed, LimitsUnavailable)."""

    async def aclose(self) -> None: ...


def limited(limits: TenantLimits) -> bool:
    return bool(limits.requests_per_minute or limits.tokens_per_minute or limits.concurrent_requests)


class Unlimited:
    """The slot of a tenant without limits: nothing to give back."""

    def release(self, tokens_used: int) -> None:
        pass


UNLIMITED = Unlimited()


# Request durations are averaged exponentially: recent requests count most, and one
# outlier moves the estimate only a fifth of the way.
_DURATION_WEIGHT = 0.2
_UNKNOWN_DURATION_S = 1.0  # before a tenant's first request has ended


@dataclass
class _Bucket:
    per_minute: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.per_minute, self.level + (now - self.updated) * self.per_minute / 60)
        self.updated = now

    def seconds_until(self, amount: float) -> float:
        return max(0.0, (amount - self.level) * 60 / self.per_minute)


@dataclass
class _TenantState:
    requests: _Bucket | None
    tokens: _Bucket | None
    in_flight: int = 0
    limits: TenantLimits = field(default_factory=TenantLimits)
    mean_duration_s: float | None = None

    def ended(self, duration_s: float) -> None:
        previous = self.mean_duration_s
        self.mean_duration_s = duration_s if previous is None else previous + _DURATION_WEIGHT * (duration_s - previous)

    def until_one_ends(self) -> float:
        # With `in_flight` requests staggered over one duration, one ends about every
        # duration / in_flight.
        return (self.mean_duration_s or _UNKNOWN_DURATION_S) / max(1, self.in_flight)


class TenantSlot:
    """An admitted request's place in its tenant's limits, given back exactly once."""

    def __init__(self, limiter: "TenantLimiter", tenant: str, admitted_at: float) -> None:
        self._limiter = limiter
        self.tenant = tenant
        self._admitted_at = admitted_at
        self._held = True

    def release(self, tokens_used: int) -> None:
        # The route releases with the usage when the answer is complete, and again on
        # every way out of the request: only the first counts.
        if self._held:
            self._held = False
            self._limiter.release(self.tenant, tokens_used, admitted_at=self._admitted_at)


class TenantLimiter:
    health: LimitsHealth | None = None

    def __init__(
        self,
        defaults: TenantLimits,
        overrides: dict[str, TenantLimits],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.defaults = defaults
        self.overrides = overrides
        self._clock = clock
        self._state: dict[str, _TenantState] = {}

    def _state_for(self, tenant: str) -> _TenantState:
        state = self._state.get(tenant)
        if state is None:
            limits = self.overrides.get(tenant, self.defaults)
            now = self._clock()
            rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
            state = _TenantState(
                requests=_Bucket(rpm, rpm, now) if rpm else None,
                tokens=_Bucket(tpm, tpm, now) if tpm else None,
                limits=limits,
            )
            self._state[tenant] = state
        return state

    async def admit(self, tenant: str) -> TenantSlot:
        return self.admit_now(tenant)

    def admit_now(self, tenant: str) -> TenantSlot:
        """acquire(), as a slot the request holds until it releases it."""
        self.acquire(tenant)
        return TenantSlot(self, tenant, self._clock())

    async def aclose(self) -> None:
        pass

    def acquire(self, tenant: str) -> None:
        """Admit one request or raise RateLimited; pair with release()."""
        state = self._state_for(tenant)
        now = self._clock()
        limit = state.limits.concurrent_requests
        if limit and state.in_flight >= limit:
            raise RateLimited(f"Tenant '{tenant}' has {limit} requests in flight, its concurrency limit.", state.until_one_ends())
        if state.tokens is not None:
            state.tokens.refill(now)
            if state.tokens.level <= 0:
                wait = state.tokens.seconds_until(1)
                raise RateLimited(f"Tenant '{tenant}' is over {state.tokens.per_minute:g} tokens per minute.", wait)
        if state.requests is not None:
            state.requests.refill(now)
            if state.requests.level < 1:
                wait = state.requests.seconds_until(1)
                raise RateLimited(f"Tenant '{tenant}' is over {state.requests.per_minute:g} requests per minute.", wait)
            state.requests.level -= 1
        state.in_flight += 1

    def release(self, tenant: str, tokens_used: int, admitted_at: float | None = None) -> None:
        state = self._state_for(tenant)
        state.in_flight = max(0, state.in_flight - 1)
        if admitted_at is not None:
            state.ended(self._clock() - admitted_at)
        if state.tokens is not None and tokens_used:
            state.tokens.refill(self._clock())
            state.tokens.level -= tokens_used
