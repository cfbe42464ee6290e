"""Prometheus metrics of the gateway. Names and labels are documented in README.

Label values are bounded: `backend` is an engine name, `model` is a served model id
(anything else is reported as "unknown"), `status` an HTTP status code, `reason` one
of the fallback reasons of serving.errors.EngineUnavailable.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from serving.engines.base import Engine

# Buckets fit LLM serving: tiny CPU models answer in tens of ms, big GPU ones in minutes.
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)

NO_BACKEND = "none"


class GatewayMetrics:
    def __init__(self, served_models: Iterable[str], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._models = set(served_models)
        r = self.registry
        self.requests = Counter(
            "tuneserve_requests",
            "Finished requests by endpoint, backend, model and HTTP status.",
            ["endpoint", "backend", "model", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "tuneserve_request_duration_seconds",
            "End-to-end request latency, from body read to last byte.",
            ["endpoint", "backend", "model"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tuneserve_time_to_first_token_seconds",
            "Time from request start to the first generated text.",
            ["backend", "model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tuneserve_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
            ["backend", "model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tuneserve_prompt_tokens",
            "Prompt tokens processed.",
            ["backend", "model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "tuneserve_completion_tokens",
            "Completion tokens generated (rate() gives tokens/s).",
            ["backend", "model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "tuneserve_requests_in_flight",
            "Requests being served now, by backend ('none' until routed).",
            ["backend"],
            registry=r,
        )
        self.fallbacks = Counter(
            "tuneserve_fallbacks",
            "Requests moved from one backend to the next, by reason.",
            ["from_backend", "to_backend", "reason"],
            registry=r,
        )

    def model_label(self, model: str | None) -> str:
        return model if model in self._models else "unknown"

    def watch_engines(self, engines: Callable[[], Iterable[Engine]]) -> None:
        """Backend up/down and queue depth are read from the engines at scrape time."""
        self.registry.register(_EngineStateCollector(engines))


class _EngineStateCollector:
    def __init__(self, engines: Callable[[], Iterable[Engine]]) -> None:
        self._engines = engines

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "tuneserve_backend_up", "1 when the backend can take requests, else 0.", labels=["backend"]
        )
        depth = GaugeMetricFamily(
            "tuneserve_queue_depth", "Requests waiting for a backend worker.", labels=["backend"]
        )
        for engine in self._engines():
            up.add_metric([engine.name], 1.0 if engine.is_ready() else 0.0)
            depth.add_metric([engine.name], float(engine.queue_depth()))
        yield up
        yield depth


class RequestTimer:
    """Per-request measurements, reported once at the end."""

    def __init__(self, metrics: GatewayMetrics, endpoint: str, model: str | None) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.model = metrics.model_label(model)
        self.backend = NO_BACKEND
        self.start = time.perf_counter()
        self._last_token_at: float | None = None
        self.tokens_seen = 0
        self._finished = False
        metrics.in_flight.labels(NO_BACKEND).inc()

    def routed(self, backend: str) -> None:
        self.metrics.in_flight.labels(self.backend).dec()
        self.backend = backend
        self.metrics.in_flight.labels(backend).inc()

    def on_tokens(self, count: int) -> None:
        now = time.perf_counter()
        self.tokens_seen += count
        if self._last_token_at is None:
            self.metrics.ttft.labels(self.backend, self.model).observe(now - self.start)
        elif count > 0:
            gap = (now - self._last_token_at) / count
            for _ in range(count):
                self.metrics.itl.labels(self.backend, self.model).observe(gap)
        self._last_token_at = now

    def finish(self, status: int, prompt_tokens: int = 0, completion_tokens: int | None = None) -> None:
        """Record the request; without usage (cancelled, failed) count the tokens streamed."""
        if self._finished:
            return
        if completion_tokens is None:
            completion_tokens = self.tokens_seen
        self._finished = True
        m = self.metrics
        m.in_flight.labels(self.backend).dec()
        m.requests.labels(self.endpoint, self.backend, self.model, str(status)).inc()
        m.latency.labels(self.endpoint, self.backend, self.model).observe(time.perf_counter() - self.start)
        if prompt_tokens:
            m.prompt_tokens.labels(self.backend, self.model).inc(prompt_tokens)
        if completion_tokens:
            m.completion_tokens.labels(self.backend, self.model).inc(completion_tokens)
