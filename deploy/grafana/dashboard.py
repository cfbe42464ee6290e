"""Writes deploy/grafana/dashboards/tuneserve.json (dashboard as code).

Run `python deploy/grafana/dashboard.py` after editing; tests/test_deploy.py fails when
the committed JSON differs from what this prints, and tests/test_observability.py
evaluates every query below against a real Prometheus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "tuneserve.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
# Every gateway query filters on the three template variables (All = ".*").
SEL = 'tenant=~"$tenant", adapter=~"$adapter", backend=~"$backend"'


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def panel(title: str, targets: list[tuple[str, str]], unit: str, description: str, kind: str = "timeseries") -> dict[str, Any]:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}}
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"},
        "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
    }


def quantiles(metric: str, by: str, qs: tuple[float, ...], selector: str = SEL) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in qs
    ]


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def sections() -> list[tuple[str, list[dict[str, Any]]]]:
    by3 = "tenant, adapter, backend"
    return [
        ("Traffic", [
            panel("Requests/s by tenant, adapter, backend", [
                (f"sum by ({by3}) (rate(tuneserve_requests_total{{{SEL}}}[{RATE}]))", "{{tenant}}/{{adapter}} on {{backend}}"),
            ], "reqps", "Finished requests per second (any status)."),
            panel("Error ratio by tenant, adapter, backend", [
                (f'sum by ({by3}) (rate(tuneserve_requests_total{{status!~"2..", {SEL}}}[{RATE}]))'
                 f" / sum by ({by3}) (rate(tuneserve_requests_total{{{SEL}}}[{RATE}]))",
                 "{{tenant}}/{{adapter}} on {{backend}}"),
            ], "percentunit", "Share of requests that did not end in 2xx (backend 'none': rejected before routing)."),
            panel("Errors/s by status", [
                (f'sum by (status, backend) (rate(tuneserve_requests_total{{status!~"2..", {SEL}}}[{RATE}]))', "{{status}} on {{backend}}"),
            ], "reqps", "4xx are client mistakes or limits (429), 5xx the service's; 499 = client went away."),
        ]),
        ("Latency", [
            panel("End-to-end latency", quantiles("tuneserve_request_duration_seconds", "backend", (0.5, 0.95, 0.99)),
                  "s", "From request body read to last byte."),
            panel("Time to first token", quantiles("tuneserve_time_to_first_token_seconds", "backend", (0.5, 0.95)),
                  "s", "SLO: p95 under 2 s (alert TuneserveTTFTOverSLO)."),
            panel("Inter-token latency", quantiles("tuneserve_inter_token_latency_seconds", "backend", (0.5, 0.95)),
                  "s", "Gap between consecutive generated tokens."),
        ]),
        ("Throughput", [
            panel("Generation tokens/s by backend", [
                (f"sum by (backend) (rate(tuneserve_completion_tokens_total{{{SEL}}}[{RATE}]))", "{{backend}}"),
            ], "short", "Completion tokens generated per second."),
            panel("Generation tokens/s by tenant", [
                (f"sum by (tenant) (rate(tuneserve_completion_tokens_total{{{SEL}}}[{RATE}]))", "{{tenant}}"),
            ], "short", "Completion tokens generated per second."),
        ]),
        ("Engines", [
            panel("Fallbacks/s", [
                (f'sum by (from_backend, to_backend, reason) (rate(tuneserve_fallbacks_total{{from_backend=~"$backend"}}[{RATE}]))',
                 "{{from_backend}} -> {{to_backend}} ({{reason}})"),
            ], "reqps", "Requests moved to the next engine before their first token."),
            panel("Backend up", [
                ('min by (backend) (tuneserve_backend_up{backend=~"$backend"})', "{{backend}}"),
                ('min by (job) (up{job=~"gateway|vllm"})', "scrape {{job}}"),
            ], "bool_on_off", "1: the engine takes requests (health probe passing, circuit closed).", kind="stat"),
            panel("Queue depth and in-flight", [
                ('sum by (backend) (tuneserve_queue_depth{backend=~"$backend"})', "queued {{backend}}"),
                ('sum by (backend) (tuneserve_queue_capacity{backend=~"$backend"} > 0)', "capacity {{backend}}"),
                ('sum by (backend) (tuneserve_requests_in_flight{backend=~"$backend"})', "in flight {{backend}}"),
            ], "short", "Requests waiting for a llama.cpp worker, the queue's size, and requests being served."),
        ]),
        ("Adapters", [
            panel("Adapter loads and evictions/s", [
                (f'sum by (backend) (rate(tuneserve_adapter_load_seconds_count{{backend=~"$backend"}}[{RATE}]))', "loads {{backend}}"),
                (f'sum by (backend) (rate(tuneserve_adapter_evictions_total{{backend=~"$backend"}}[{RATE}]))', "evictions {{backend}}"),
            ], "ops", "Cold loads of an adapter into an engine, and LRU evictions."),
            panel("Adapter load latency", quantiles("tuneserve_adapter_load_seconds", "backend", (0.5, 0.95), 'backend=~"$backend"'),
                  "s", "Time to load an adapter (added to its cold first request)."),
            panel("Adapters loaded", [
                ('max by (backend) (tuneserve_adapters_loaded{backend=~"$backend"})', "{{backend}}"),
            ], "short", "Adapters resident in each engine now."),
        ]),
        ("vLLM", [
            panel("vLLM KV-cache usage", [
                ("max by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}"),
            ], "percentunit", "Share of vLLM's KV-cache blocks in use; at 1 requests wait or are preempted."),
            panel("vLLM running and waiting requests", [
                ("sum by (instance) (vllm:num_requests_running)", "running {{instance}}"),
                ("sum by (instance) (vllm:num_requests_waiting)", "waiting {{instance}}"),
            ], "short", "vLLM's own scheduler queue."),
            panel("vLLM tokens/s and TTFT", [
                (f"sum by (instance) (rate(vllm:generation_tokens_total[{RATE}]))", "generation tokens/s {{instance}}"),
                (f"histogram_quantile(0.95, sum by (le, instance) (rate(vllm:time_to_first_token_seconds_bucket[{RATE}])))",
                 "p95 TTFT (s) {{instance}}"),
            ], "short", "As vLLM measures them, without the gateway."),
        ]),
    ]


def variable(name: str, label: str) -> dict[str, Any]:
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DS,
        "query": {"query": f"label_values(tuneserve_requests_total, {name})", "refId": name},
        "definition": f"label_values(tuneserve_requests_total, {name})",
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    pid = 1
    for title, items in sections():
        panels.append({**row(title), "id": pid, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid += 1
        y += 1
        width = 24 // len(items)
        for i, item in enumerate(items):
            panels.append({**item, "id": pid, "gridPos": {"h": 8, "w": width, "x": i * width, "y": y}})
            pid += 1
        y += 8
    return {
        "uid": "tuneserve",
        "title": "tuneserve",
        "description": "Gateway (tuneserve_*) and vLLM (vllm:*) metrics; names in README, section Metrics.",
        "tags": ["tuneserve", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
                 "current": {"text": "Prometheus", "value": "prometheus"}},
                variable("tenant", "Tenant"),
                variable("adapter", "Adapter"),
                variable("backend", "Backend"),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
