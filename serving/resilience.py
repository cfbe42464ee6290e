"""Circuit breaker for an upstream engine."""

from __future__ import annotations

import time
from typing import Callable, Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures; after `reset_timeout_s`
    lets one trial request through (half-open); a success closes it again."""

    def __init__(
        self,
        failure_threshold: int,
        reset_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.reset_timeout_s:
            return "half_open"
        return "open"

    def seconds_until_trial(self) -> float:
        """How long an open circuit still refuses every request; 0 when it lets one through."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.reset_timeout_s - self._clock())

    def allow_request(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        self._trial_in_flight = False
        if self._opened_at is not None or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()

    def release_trial(self) -> None:
        """Free the half-open trial slot of a request that ended without an outcome."""
        self._trial_in_flight = False
