"""A clock tests move by hand, for time-based logic (breakers, rate limits)."""


class ManualClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now
