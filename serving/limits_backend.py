"""The limits backend of limits.backend: in-process (one gateway) or Redis (many)."""

from __future__ import annotations

from serving.limits import Limits, TenantLimiter
from tuneserve.config import LimitsConfig


def build_limits(config: LimitsConfig) -> Limits:
    if config.backend == "redis":
        # Deferred: only gateways that share their limits pay for importing redis.
        from serving.limits_redis import RedisLimiter

        return RedisLimiter(config)
    return TenantLimiter(config.default, config.per_tenant)
