"""Prometheus metrics of the gateway, built from serving/metric_catalog.py.

Label values are bounded: `backend` is an engine name, `model` is a served model id
(anything else is reported as "unknown"), `status` an HTTP status code, `reason` a
serving.errors.FallbackReason, `tenant` and `adapter` registered names only (a request
for an unknown adapter is labelled before lookup with adapter "base" and fails with
404). Registered names are not few enough on their own (any tenant may register
adapters), so only the first server.metrics.max_tenant_labels tenants and
max_adapter_labels tenant/adapter pairs keep their names; later ones share OVERFLOW.
`replica` is a vLLM replica's URL, capped the same way at MAX_REPLICA_LABELS.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase

from serving import metric_catalog as catalog
from serving.engines.base import Engine
from serving.engines.replica_events import ReplicaOutcome, ReplicaState, RoutingDecision
from serving.errors import FallbackReason
from serving.limits import LimitsHealth
from tuneserve.config import MetricsConfig

NO_BACKEND = "none"
NO_TENANT = "none"
ADMIN_TENANT = "admin"  # what serving.access labels an admin's requests with (ADMIN_LABEL)
BASE_ADAPTER = "base"
# Not a valid tenant or adapter name (tuneserve/names.py): never mistaken for a real one.
OVERFLOW = "_other"
# vLLM replicas that keep their URL as a label (engines.vllm.replicas / discovery).
MAX_REPLICA_LABELS = 64
# Labels of requests that name no tenant or no adapter: never counted against the caps.
_FIXED_TENANTS = frozenset({NO_TENANT, ADMIN_TENANT})


class GatewayMetrics:
    def __init__(
        self,
        served_models: Iterable[str],
        registry: CollectorRegistry | None = None,
        labels: MetricsConfig | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self._models = set(served_models)
        caps = labels or MetricsConfig()
        self._max_tenants = caps.max_tenant_labels
        self._max_adapters = caps.max_adapter_labels
        # Both only grow, up to their caps: a name keeps its label for the process's life,
        # so a series never changes meaning between scrapes.
        self._tenants: set[str] = set()
        self._adapters: set[tuple[str, str]] = set()
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = catalog.REQUESTS.counter(r)
        self.latency = catalog.REQUEST_DURATION.histogram(r)
        self.ttft = catalog.TIME_TO_FIRST_TOKEN.histogram(r)
        self.itl = catalog.INTER_TOKEN_LATENCY.histogram(r)
        self.prompt_tokens = catalog.PROMPT_TOKENS.counter(r)
        self.completion_tokens = catalog.COMPLETION_TOKENS.counter(r)
        self.in_flight = catalog.REQUESTS_IN_FLIGHT.gauge(r)
        self.adapter_load = catalog.ADAPTER_LOAD.histogram(r)
        self.adapter_evictions = catalog.ADAPTER_EVICTIONS.counter(r)
        self.fallbacks = catalog.FALLBACKS.counter(r)
        self.replica_requests = catalog.VLLM_REPLICA_REQUESTS.counter(r)
        self.routing_decisions = catalog.VLLM_ROUTING_DECISIONS.counter(r)
        # Replica URLs come from config or DNS; pods that come and go bring new
        # addresses, so only the first MAX_REPLICA_LABELS keep theirs.
        self._replicas: set[str] = set()
        self._replica_states: list[Callable[[], Iterable[ReplicaState]]] = []
        self.registry.register(_ReplicaStateCollector(self))

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

    def request_labels(self, tenant: str, adapter: str) -> tuple[str, str]:
        """The (tenant, adapter) label values of a request of `tenant` for `adapter`."""
        if tenant not in self._tenants and tenant not in _FIXED_TENANTS:
            if len(self._tenants) >= self._max_tenants:
                # Its adapter's name must not show either: in the tenant's place it would
                # still tell which tenant the series is about.
                return OVERFLOW, BASE_ADAPTER if adapter == BASE_ADAPTER else OVERFLOW
            self._tenants.add(tenant)
        if adapter == BASE_ADAPTER or (tenant, adapter) in self._adapters:
            return tenant, adapter
        if len(self._adapters) >= self._max_adapters:
            return tenant, OVERFLOW
        self._adapters.add((tenant, adapter))
        return tenant, adapter

    def fell_back(self, from_backend: str, to_backend: str, reason: FallbackReason) -> None:
        self.fallbacks.labels(from_backend, to_backend, reason).inc()

    # AdapterObserver
    def adapter_loaded(self, backend: str, seconds: float) -> None:
        self.adapter_load.labels(backend).observe(seconds)

    def adapter_evicted(self, backend: str) -> None:
        self.adapter_evictions.labels(backend).inc()

    def replica_label(self, replica: str) -> str:
        if replica not in self._replicas:
            if len(self._replicas) >= MAX_REPLICA_LABELS:
                return OVERFLOW
            self._replicas.add(replica)
        return replica

    # ReplicaObserver
    def replica_request(self, replica: str, outcome: ReplicaOutcome) -> None:
        self.child(self.replica_requests, self.replica_label(replica), outcome).inc()

    def replica_routed(self, decision: RoutingDecision) -> None:
        self.child(self.routing_decisions, decision).inc()

    def watch_replicas(self, states: Callable[[], Iterable[ReplicaState]]) -> None:
        self._replica_states.append(states)

    def replica_states(self) -> Iterable[ReplicaState]:
        for states in self._replica_states:
            yield from states()

    def watch_engines(self, engines: Callable[[], Iterable[Engine]]) -> None:
        """Backend up/down and queue depth are read from the engines at scrape time."""
        self.registry.register(_EngineStateCollector(engines))

    def watch_limits(self, health: LimitsHealth | None) -> None:
        """The shared limits backend's state, read at scrape time (none for in-process limits)."""
        if health is not None:
            self.registry.register(_LimitsCollector(health))


class _LimitsCollector:
    def __init__(self, health: LimitsHealth) -> None:
        self._health = health

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        health = self._health
        up = catalog.LIMITS_BACKEND_UP.gauge_family()
        if health.up is not None:  # not yet asked: neither up nor down
            up.add_metric([health.backend], 1.0 if health.up else 0.0)
        yield up
        degraded = catalog.LIMITS_DEGRADED.counter_family()
        degraded.add_metric([health.policy], float(health.degraded))
        yield degraded


class _EngineStateCollector:
    def __init__(self, engines: Callable[[], Iterable[Engine]]) -> None:
        self._engines = engines

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up = catalog.BACKEND_UP.gauge_family()
        depth = catalog.QUEUE_DEPTH.gauge_family()
        capacity = catalog.QUEUE_CAPACITY.gauge_family()
        loaded = catalog.ADAPTERS_LOADED.gauge_family()
        for engine in self._engines():
            up.add_metric([engine.name], 1.0 if engine.is_ready() else 0.0)
            depth.add_metric([engine.name], float(engine.queue_depth()))
            capacity.add_metric([engine.name], float(engine.queue_capacity()))
            loaded.add_metric([engine.name], float(engine.loaded_adapters()))
        yield up
        yield depth
        yield capacity
        yield loaded


class _ReplicaStateCollector:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up = catalog.VLLM_REPLICA_UP.gauge_family()
        load = catalog.VLLM_REPLICA_LOAD.gauge_family()
        seen: set[str] = set()
        for state in self._metrics.replica_states():
            label = self._metrics.replica_label(state.replica)
            if label in seen:
                continue  # past the cap: one _other series, not one per replica
            seen.add(label)
            up.add_metric([label], 1.0 if state.ready else 0.0)
            load.add_metric([label], state.load)
        yield up
        yield load


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
        # Bounded here, not where tenant and adapter are set: the limiter needs the real tenant.
        return self.backend, self.model, *self.metrics.request_labels(self.tenant, self.adapter)

    def finish(self, status: int, prompt_tokens: int = 0, completion_tokens: int | None = None) -> None:
        """Record the request; without usage (cancelled, failed) count the tokens streamed."""
        if self._finished:
            return
        if completion_tokens is None:
            completion_tokens = self.tokens_seen
        self._finished = True
        m = self.metrics
        m.child(m.in_flight, self.backend).dec()
        labels = self._labels()
        backend, model, tenant, adapter = labels
        m.child(m.requests, self.endpoint, backend, model, str(status), tenant, adapter).inc()
        m.child(m.latency, self.endpoint, *labels).observe(time.perf_counter() - self.start)
        if prompt_tokens:
            m.child(m.prompt_tokens, *labels).inc(prompt_tokens)
        if completion_tokens:
            m.child(m.completion_tokens, *labels).inc(completion_tokens)
