"""Prometheus metrics of the gateway. Names and labels are documented in README.

Label values are bounded: `backend` is an engine name, `model` is a served model id
(anything else is reported as "unknown"), `status` an HTTP status code, `reason` one
of the fallback reasons of serving.errors.EngineUnavailable, `tenant` and `adapter`
registered names only (a request for an unknown adapter is labelled before lookup
with adapter "base" and fails with 404), so their product is bounded by the registry.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.core import GaugeMetricFamily

from serving.engines.base import Engine

# Buckets fit LLM serving: tiny CPU models answer in tens of ms, big GPU ones in minutes.
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

NO_BACKEND = "none"
NO_TENANT = "none"
BASE_ADAPTER = "base"
REQUEST_LABELS = ["tenant", "adapter"]


class GatewayMetrics:
    def __init__(self, served_models: Iterable[str], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._models = set(served_models)
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "tuneserve_requests",
            "Finished requests by endpoint, backend, model and HTTP status.",
            ["endpoint", "backend", "model", "status", *REQUEST_LABELS],
            registry=r,
        )
        self.latency = Histogram(
            "tuneserve_request_duration_seconds",
            "End-to-end request latency, from body read to last byte.",
            ["endpoint", "backend", "model", *REQUEST_LABELS],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tuneserve_time_to_first_token_seconds",
            "Time from request start to the first generated text.",
            ["backend", "model", *REQUEST_LABELS],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tuneserve_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
            ["backend", "model", *REQUEST_LABELS],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tuneserve_prompt_tokens",
            "Prompt tokens processed.",
            ["backend", "model", *REQUEST_LABELS],
            registry=r,
        )
        self.completion_tokens = Counter(
            "tuneserve_completion_tokens",
            "Completion tokens generated (rate() gives tokens/s).",
            ["backend", "model", *REQUEST_LABELS],
            registry=r,
        )
        self.in_flight = Gauge(
            "tuneserve_requests_in_flight",
            "Requests being served now, by backend ('none' until routed).",
            ["backend"],
            registry=r,
        )
        self.adapter_load = Histogram(
            "tuneserve_adapter_load_seconds",
            "Time to load an adapter into an engine (cold start of its first request).",
            ["backend"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.adapter_evictions = Counter(
            "tuneserve_adapter_evictions",
            "Adapters evicted from an engine's cache to make room.",
            ["backend"],
            registry=r,
        )
        self.fallbacks = Counter(
            "tuneserve_fallbacks",
            "Requests moved from one backend to the next, by reason.",
            ["from_backend", "to_backend", "reason"],
            registry=r,
        )

    def child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """`metric.labels(*values)`, remembered.

        prometheus_client validates and locks on every `labels()` call, several times a
        request; label sets are bounded (see above) and never removed, so a dict suffices.
        """
        key = (metric, values)
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = metric.labels(*values)
        return series

    def model_label(self, model: str | None) -> str:
        return model if model in self._models else "unknown"

    def add_model(self, model: str) -> None:
        self._models.add(model)

    # AdapterObserver
    def adapter_loaded(self, backend: str, seconds: float) -> None:
        self.adapter_load.labels(backend).observe(seconds)

    def adapter_evicted(self, backend: str) -> None:
        self.adapter_evictions.labels(backend).inc()

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
        # Exported so alerts can say "queue 80% full" without knowing the config.
        capacity = GaugeMetricFamily(
            "tuneserve_queue_capacity", "Requests a backend's queue holds before rejecting (0: no queue).",
            labels=["backend"],
        )
        loaded = GaugeMetricFamily(
            "tuneserve_adapters_loaded", "Adapters loaded in an engine now.", labels=["backend"]
        )
        for engine in self._engines():
            up.add_metric([engine.name], 1.0 if engine.is_ready() else 0.0)
            depth.add_metric([engine.name], float(engine.queue_depth()))
            capacity.add_metric([engine.name], float(engine.queue_capacity()))
            loaded.add_metric([engine.name], float(engine.loaded_adapters()))
        yield up
        yield depth
        yield capacity
        yield loaded


class RequestTimer:
    """Per-request measurements, reported once at the end."""

    def __init__(self, metrics: GatewayMetrics, endpoint: str, model: str | None) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.model = metrics.model_label(model)
        self.backend = NO_BACKEND
        self.tenant = NO_TENANT
        self.adapter = BASE_ADAPTER
        self.start = time.perf_counter()
        self._last_token_at: float | None = None
        self.tokens_seen = 0
        self._finished = False
        # Called once with the request's total tokens when it ends (per-tenant limits).
        self.on_finish: Callable[[int], None] | None = None
        metrics.child(metrics.in_flight, NO_BACKEND).inc()

    def routed(self, backend: str) -> None:
        self.metrics.child(self.metrics.in_flight, self.backend).dec()
        self.backend = backend
        self.metrics.child(self.metrics.in_flight, backend).inc()

    def on_tokens(self, count: int, timed: bool = True) -> None:
        self.tokens_seen += count
        if not timed:
            return
        now = time.perf_counter()
        if self._last_token_at is None:
            self.metrics.child(self.metrics.ttft, *self._labels()).observe(now - self.start)
        elif count > 0:
            gap = (now - self._last_token_at) / count
            itl = self.metrics.child(self.metrics.itl, *self._labels())
            for _ in range(count):
                itl.observe(gap)
        self._last_token_at = now

    def _labels(self) -> tuple[str, str, str, str]:
        return self.backend, self.model, self.tenant, self.adapter

    def finish(self, status: int, prompt_tokens: int = 0, completion_tokens: int | None = None) -> None:
        """Record the request; without usage (cancelled, failed) count the tokens streamed."""
        if self._finished:
            return
        if completion_tokens is None:
            completion_tokens = self.tokens_seen
        if self.on_finish is not None:
            self.on_finish(prompt_tokens + completion_tokens)
        self._finished = True
        m = self.metrics
        m.child(m.in_flight, self.backend).dec()
        labels = self._labels()
        m.child(m.requests, self.endpoint, self.backend, self.model, str(status), self.tenant, self.adapter).inc()
        m.child(m.latency, self.endpoint, *labels).observe(time.perf_counter() - self.start)
        if prompt_tokens:
            m.child(m.prompt_tokens, *labels).inc(prompt_tokens)
        if completion_tokens:
            m.child(m.completion_tokens, *labels).inc(completion_tokens)
