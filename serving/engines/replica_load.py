"""A vLLM replica's load as a gateway sees it: its last /metrics scrape plus what this
gateway sent it since (scrapes lag by up to an interval; a burst would otherwise pile
onto the replica that looked idle at the last scrape)."""

from __future__ import annotations

from dataclasses import dataclass

# vLLM's scheduler gauges (vllm/v1/metrics/loggers.py); one series per engine core.
LOAD_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def parse_vllm_load(text: str) -> float | None:
    """running + waiting requests from vLLM's Prometheus text; None when neither is there."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith("vllm:num_requests_"):
            continue
        ends = [i for i in (line.find("{"), line.find(" ")) if i >= 0]
        if not ends or line[: min(ends)] not in LOAD_METRICS:
            continue  # e.g. vllm:num_requests_waiting_by_reason, a breakdown of waiting
        sample = line[line.rfind("}") + 1 :] if "}" in line else line[min(ends) :]
        try:
            total += float(sample.split()[0])
        except (ValueError, IndexError):
            continue
        found = True
    return total if found else None


@dataclass(frozen=True)
class Dispatch:
    """One request sent to a replica; `epoch`: how many scrapes had begun by then."""

    epoch: int


class LoadTracker:
    def __init__(self) -> None:
        self.scraped = 0.0
        self._started = 0  # scrapes begun
        self._counted_below = 0  # requests of lower epochs are in `scraped`
        self._live: dict[int, int] = {}  # epoch -> requests sent then, still running

    @property
    def load(self) -> float:
        return self.scraped + sum(n for epoch, n in self._live.items() if epoch >= self._counted_below)

    @property
    def in_flight(self) -> int:
        return sum(self._live.values())

    def scrape_started(self) -> int:
        """Call right before fetching /metrics; pass what it returns to `scraped_at`."""
        self._started += 1
        return self._started

    def scraped_at(self, epoch: int, load: float) -> None:
        """What vLLM reported; it counts every request sent before that scrape began."""
        if epoch <= self._counted_below:
            return  # a later scrape already reported
        self.scraped = load
        self._counted_below = epoch

    def dispatched(self) -> Dispatch:
        dispatch = Dispatch(self._started)
        self._live[dispatch.epoch] = self._live.get(dispatch.epoch, 0) + 1
        return dispatch

    def finished(self, dispatch: Dispatch) -> None:
        left = self._live.get(dispatch.epoch, 0) - 1
        if left > 0:
            self._live[dispatch.epoch] = left
        else:
            self._live.pop(dispatch.epoch, None)
