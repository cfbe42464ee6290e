"""Every metric the gateway exports, declared once.

serving/metrics.py builds the Prometheus objects from these specs and
scripts/metrics_table.py renders README's Metrics table from them, so the names,
labels and the closed label sets a dashboard may rely on cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serving.engines.replica_events import REPLICA_OUTCOMES, ROUTING_DECISIONS
from serving.errors import FALLBACK_REASONS
from serving.limits import UNREACHABLE_POLICIES

# Buckets fit LLM serving: tiny CPU models answer in tens of ms, big GPU ones in minutes.
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUEST_LABELS = ("tenant", "adapter")

MetricKind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as registered: prometheus_client exposes a counter as `<name>_total`
    kind: MetricKind
    help: str  # the HELP line of /metrics
    labels: tuple[str, ...]
    meaning: str  # README's wording, which may say more than a HELP line should
    buckets: tuple[float, ...] = ()
    # Labels whose values are a closed set that README lists.
    label_values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def exposed_name(self) -> str:
        return f"{self.name}_total" if self.kind == "counter" else self.name

    def counter(self, registry: CollectorRegistry) -> Counter:
        assert self.kind == "counter", self.name
        return Counter(self.name, self.help, list(self.labels), registry=registry)

    def gauge(self, registry: CollectorRegistry) -> Gauge:
        assert self.kind == "gauge", self.name
        return Gauge(self.name, self.help, list(self.labels), registry=registry)

    def histogram(self, registry: CollectorRegistry) -> Histogram:
        assert self.kind == "histogram" and self.buckets, self.name
        return Histogram(self.name, self.help, list(self.labels), buckets=self.buckets, registry=registry)

    def gauge_family(self) -> GaugeMetricFamily:
        """For gauges read from the engines at scrape time."""
        assert self.kind == "gauge", self.name
        return GaugeMetricFamily(self.name, self.help, labels=list(self.labels))

    def counter_family(self) -> CounterMetricFamily:
        """For counters kept outside prometheus_client and read at scrape time."""
        assert self.kind == "counter", self.name
        return CounterMetricFamily(self.name, self.help, labels=list(self.labels))


REQUESTS = MetricSpec(
    "tuneserve_requests",
    "counter",
    "Finished requests by endpoint, backend, model and HTTP status.",
    ("endpoint", "backend", "model", "status", *REQUEST_LABELS),
    'finished requests (`backend="none"` when rejected before routing; status 499 = client went away)',
)
REQUEST_DURATION = MetricSpec(
    "tuneserve_request_duration_seconds",
    "histogram",
    "End-to-end request latency, from body read to last byte.",
    ("endpoint", "backend", "model", *REQUEST_LABELS),
    "end-to-end latency, 50 ms … 10 min buckets",
    buckets=E2E_BUCKETS,
)
TIME_TO_FIRST_TOKEN = MetricSpec(
    "tuneserve_time_to_first_token_seconds",
    "histogram",
    "Time from request start to the first generated text.",
    ("backend", "model", *REQUEST_LABELS),
    "TTFT, 10 ms … 60 s (vLLM: streamed requests only, unless `engines.vllm.always_stream`)",
    buckets=TTFT_BUCKETS,
)
INTER_TOKEN_LATENCY = MetricSpec(
    "tuneserve_inter_token_latency_seconds",
    "histogram",
    "Time between consecutive generated tokens of one request.",
    ("backend", "model", *REQUEST_LABELS),
    "gap between tokens, 1 ms … 2.5 s (same scope as TTFT)",
    buckets=ITL_BUCKETS,
)
PROMPT_TOKENS = MetricSpec(
    "tuneserve_prompt_tokens",
    "counter",
    "Prompt tokens processed.",
    ("backend", "model", *REQUEST_LABELS),
    "prompt tokens",
)
COMPLETION_TOKENS = MetricSpec(
    "tuneserve_completion_tokens",
    "counter",
    "Completion tokens generated (rate() gives tokens/s).",
    ("backend", "model", *REQUEST_LABELS),
    "generated tokens: `rate()` is tokens/s",
)
REQUESTS_IN_FLIGHT = MetricSpec(
    "tuneserve_requests_in_flight",
    "gauge",
    "Requests being served now, by backend ('none' until routed).",
    ("backend",),
    "requests being served",
)
QUEUE_DEPTH = MetricSpec(
    "tuneserve_queue_depth",
    "gauge",
    "Requests waiting for a backend worker.",
    ("backend",),
    "requests waiting for a llama.cpp worker",
)
# Exported so alerts can say "queue 80% full" without knowing the config.
QUEUE_CAPACITY = MetricSpec(
    "tuneserve_queue_capacity",
    "gauge",
    "Requests a backend's queue holds before rejecting (0: no queue).",
    ("backend",),
    "`engines.llamacpp.queue_size` (0 for vLLM, which queues itself); beyond it clients get 429",
)
FALLBACKS = MetricSpec(
    "tuneserve_fallbacks",
    "counter",
    "Requests moved from one backend to the next, by reason.",
    ("from_backend", "to_backend", "reason"),
    "requests moved to the next engine",
    label_values={"reason": FALLBACK_REASONS},
)
BACKEND_UP = MetricSpec(
    "tuneserve_backend_up",
    "gauge",
    "1 when the backend can take requests, else 0.",
    ("backend",),
    "1 when the engine can take requests",
)
ADAPTER_LOAD = MetricSpec(
    "tuneserve_adapter_load_seconds",
    "histogram",
    "Time to load an adapter into an engine (cold start of its first request).",
    ("backend",),
    "time to load an adapter into an engine (a cold first request)",
    buckets=LOAD_BUCKETS,
)
ADAPTERS_LOADED = MetricSpec(
    "tuneserve_adapters_loaded",
    "gauge",
    "Adapters loaded in an engine now.",
    ("backend",),
    "adapters loaded in an engine now",
)
ADAPTER_EVICTIONS = MetricSpec(
    "tuneserve_adapter_evictions",
    "counter",
    "Adapters evicted from an engine's cache to make room.",
    ("backend",),
    "adapters evicted (LRU) to make room",
)
VLLM_REPLICA_REQUESTS = MetricSpec(
    "tuneserve_vllm_replica_requests",
    "counter",
    "Requests tried on each vLLM replica, by outcome.",
    ("replica", "outcome"),
    "requests tried on a vLLM replica (`engines.vllm.replicas` or `discovery`; `replica` is its URL, "
    "past 64 replicas `_other`): served there, moved to the next replica, moved on a 404 for the adapter, "
    "or refused as invalid",
    label_values={"outcome": REPLICA_OUTCOMES},
)
VLLM_ROUTING_DECISIONS = MetricSpec(
    "tuneserve_vllm_routing_decisions",
    "counter",
    "How each request's first vLLM replica was chosen.",
    ("decision",),
    "first replica of a request: the adapter's rendezvous owner, a spill past it (over the load bound), "
    "or the least loaded (base model)",
    label_values={"decision": ROUTING_DECISIONS},
)
VLLM_REPLICA_UP = MetricSpec(
    "tuneserve_vllm_replica_up",
    "gauge",
    "1 when the vLLM replica can take requests (healthy, circuit not open), else 0.",
    ("replica",),
    "1 when a vLLM replica can take requests (its own health probe and circuit breaker)",
)
VLLM_REPLICA_LOAD = MetricSpec(
    "tuneserve_vllm_replica_load",
    "gauge",
    "Running + waiting requests on the vLLM replica, as routing sees it.",
    ("replica",),
    "a replica's running + waiting requests (its last `/metrics` scrape plus what this gateway sent since)",
)
LIMITS_BACKEND_UP = MetricSpec(
    "tuneserve_limits_backend_up",
    "gauge",
    "1 when the shared limits backend answers, else 0 (absent with limits.backend local).",
    ("backend",),
    "1 when Redis holding the shared tenant limits answers (`limits.backend: redis`), else 0",
)
LIMITS_DEGRADED = MetricSpec(
    "tuneserve_limits_degraded",
    "counter",
    "Requests of limited tenants decided without the shared limits backend, by policy.",
    ("policy",),
    "requests decided while Redis was unreachable: refused with 503 (fail_closed) or "
    "admitted against limit/`limits.redis.gateways` in-process (local_share)",
    label_values={"policy": UNREACHABLE_POLICIES},
)

# README's order: traffic, latency, tokens, capacity, routing, adapters, limits.
CATALOG: tuple[MetricSpec, ...] = (
    REQUESTS,
    REQUEST_DURATION,
    TIME_TO_FIRST_TOKEN,
    INTER_TOKEN_LATENCY,
    PROMPT_TOKENS,
    COMPLETION_TOKENS,
    REQUESTS_IN_FLIGHT,
    QUEUE_DEPTH,
    QUEUE_CAPACITY,
    FALLBACKS,
    BACKEND_UP,
    VLLM_REPLICA_REQUESTS,
    VLLM_ROUTING_DECISIONS,
    VLLM_REPLICA_UP,
    VLLM_REPLICA_LOAD,
    ADAPTER_LOAD,
    ADAPTERS_LOADED,
    ADAPTER_EVICTIONS,
    LIMITS_BACKEND_UP,
    LIMITS_DEGRADED,
)
