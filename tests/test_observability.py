"""The Grafana dashboard and the alert rules against a real Prometheus.

Prometheus (Debian's package, installed by `make deploy-tools`) scrapes two gateways
and the session's vLLM every second while traffic runs through both engines: two
tenants with adapters on vLLM (a one-slot LoRA cache, so adapters are evicted and
reloaded), and a gateway whose vLLM is unreachable, so requests fall back to llama.cpp
and some time out (504). Then every PromQL expression of the dashboard and of the
alert rules is evaluated through Prometheus's HTTP API and must parse and return data.
Prometheus scrapes the gateways as deploy/k8s does: on their metrics listener, with the
metrics bearer token from a file.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from tests.support.adapters import make_adapter, tar_gz_bytes
from tests.support.prometheus import ALERTS, Prometheus, bearer_token_file, host
from tests.support.servers import DATA_DIR, MODEL, ROOT, ServerProcess, free_port, gateway
from tests.test_tenant_gateway import cli

pytestmark = pytest.mark.vllm

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tuneserve.json"
ADMIN_KEY = "admin-key-for-observability-tests"
METRICS_TOKEN = "metrics-token-for-observability-tests"
TENANTS = {"acme": "support", "globex": "sales"}
# Traffic runs until every kind of request happened a few times (rate() needs a counter
# to grow between scrapes), at least MIN_S and at most MAX_S: the CPU may be shared.
MIN_S, MAX_S, EACH = 15, 150, 3
LONG_TENANT = "acme"  # sends the requests that outlast the fallback gateway's timeout
COMPARISON = re.compile(r"\s(>=|<=|==|!=|>|<)\s*([0-9.]+)\s*$")


def model_settings(data_dir: Path, metrics_port: int) -> dict[str, Any]:
    model_dir = DATA_DIR / "models" / MODEL
    return {
        "data_dir": data_dir,
        "model.hf_path": model_dir / "hf",
        "model.gguf_path": model_dir / "model.gguf",
        "auth.enabled": "true",
        "auth.admin_key": ADMIN_KEY,
        "server.metrics.port": metrics_port,
        "server.metrics.token_file": token_file(data_dir),
    }


def token_file(data_dir: Path) -> Path:
    return data_dir / "metrics-token"


def metrics_host(server: ServerProcess) -> str:
    """Where Prometheus scrapes `server`: its metrics listener, the `instance` label."""
    return f"127.0.0.1:{server.command[server.command.index('--server.metrics.port') + 1]}"


class Traffic:
    """Clients that keep both gateways busy for a bounded time."""

    def __init__(self, primary: ServerProcess, fallback: ServerProcess, keys: dict[str, str]) -> None:
        self.primary, self.fallback, self.keys = primary, fallback, keys
        self.statuses: dict[str, list[int]] = {}
        self.lock = threading.Lock()

    def chat(self, server: ServerProcess, tenant: str, model: str, max_tokens: int, stream: bool) -> int:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
        }
        return self.send(server, "/v1/chat/completions", tenant, body)

    def outlast_timeout(self, server: ServerProcess, tenant: str) -> int:
        # A chat answer ends after a sentence; a counting completion runs to max_tokens
        # (~45 s here), far past the gateway's 5 s timeout even on a much faster CPU.
        body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 1900, "temperature": 0}
        return self.send(server, "/v1/completions", tenant, body)

    def send(self, server: ServerProcess, path: str, tenant: str, body: dict[str, Any]) -> int:
        model = body["model"]
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        with httpx.stream("POST", server.base_url + path, json=body, headers=headers, timeout=120) as r:
            for _ in r.iter_bytes():
                pass
            status = r.status_code
        with self.lock:
            self.statuses.setdefault(f"{server.name}:{tenant}:{model}", []).append(status)
        return status

    def done(self) -> bool:
        now = time.monotonic()
        if now > self.max_deadline:
            return True
        with self.lock:
            enough = all(len(self.statuses.get(key, [])) >= n for key, n in self.expected.items())
        return now > self.min_deadline and enough

    def vllm_client(self) -> None:
        # One after the other, so with one LoRA slot each adapter evicts the idle other.
        i = 0
        while not self.done():
            for tenant, adapter in TENANTS.items():
                self.chat(self.primary, tenant, adapter if i % 2 == 0 else MODEL, 16, stream=True)
            i += 1

    def fallback_client(self, tenant: str) -> None:
        i = 0
        while not self.done():
            self.chat(self.fallback, tenant, TENANTS[tenant], 8, stream=i % 2 == 0)
            if i % 3 == 0:
                self.chat(self.primary, tenant, "no-such-model", 4, stream=False)  # 404
            if tenant == LONG_TENANT and i % 4 == 0:
                self.outlast_timeout(self.fallback, tenant)  # 504
            i += 1

    def run(self) -> None:
        self.min_deadline, self.max_deadline = time.monotonic() + MIN_S, time.monotonic() + MAX_S
        self.expected = {
            f"{server.name}:{tenant}:{model}": EACH
            for tenant, adapter in TENANTS.items()
            for server, model in (
                (self.primary, adapter), (self.primary, MODEL), (self.primary, "no-such-model"), (self.fallback, adapter),
            )
        }
        # Two timeouts, scraped apart, make the 504 series grow.
        self.expected[f"{self.fallback.name}:{LONG_TENANT}:{MODEL}"] = 2
        threads = [threading.Thread(target=self.vllm_client)]
        threads += [threading.Thread(target=self.fallback_client, args=(t,)) for t in TENANTS]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Stands in for Grafana's $__rate_interval: the whole traffic and a few scrapes.
        self.window = f"{int(time.monotonic() - start) + 10}s"


@pytest.fixture(scope="module")
def observed(vllm: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Prometheus, Traffic]]:
    data_dir = tmp_path_factory.mktemp("observability-data")
    keys = {tenant: cli(data_dir, "tenants", "create", tenant) for tenant in TENANTS}
    token_file(data_dir).write_text(METRICS_TOKEN + "\n")  # Prometheus and the gateway strip it
    primary = gateway(
        "gw-observed",
        {
            **model_settings(data_dir, free_port()),
            "engines.vllm.enabled": "true",
            "engines.vllm.url": vllm.base_url,
            "engines.vllm.max_loras": 1,
            "engines.vllm.max_cpu_loras": 1,
        },
        env={"TUNESERVE_DATA_DIR": str(data_dir)},
    ).start(ready_path="/ready")
    fallback = gateway(
        "gw-observed-fallback",
        {
            **model_settings(data_dir, free_port()),
            "engines.vllm.enabled": "true",
            "engines.vllm.url": f"http://127.0.0.1:{free_port()}",
            "server.request_timeout_s": 5,
            # The long requests hold one worker until they time out; the other keeps serving.
            "engines.llamacpp.workers": 2,
        },
        env={"TUNESERVE_DATA_DIR": str(data_dir)},
    )
    prometheus: Prometheus | None = None
    try:
        fallback.start(ready_path="/ready")
        for seed, (tenant, name) in enumerate(TENANTS.items()):
            adapter = tmp_path_factory.mktemp(name) / "adapter"
            make_adapter(adapter, seed=300 + seed)
            r = httpx.post(
                primary.base_url + "/v1/adapters",
                headers={"Authorization": f"Bearer {keys[tenant]}"},
                data={"name": name},
                files={"file": ("a.tar.gz", tar_gz_bytes(adapter), "application/gzip")},
                timeout=120,
            )
            assert r.status_code == 201, r.text
        prometheus = Prometheus(
            tmp_path_factory.mktemp("prometheus"),
            {"gateway": [metrics_host(primary), metrics_host(fallback)], "vllm": [host(vllm)]},
            jobs={"gateway": bearer_token_file(token_file(data_dir))},
        ).start()
        # The first scrapes see every series before traffic, so rate() covers all of it.
        wait_for_targets(prometheus)
        traffic = Traffic(primary, fallback, keys)
        traffic.run()
        time.sleep(3)  # a few more scrapes and rule evaluations
        yield prometheus, traffic
    finally:
        if prometheus is not None:
            prometheus.stop()
        fallback.stop()
        primary.stop()


def wait_for_targets(prometheus: Prometheus) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        targets = prometheus.get("/api/v1/targets")["activeTargets"]
        if len(targets) == 3 and all(t["health"] == "up" for t in targets):
            return
        time.sleep(0.5)
    raise AssertionError(f"targets not up: {targets}")


def dashboard_queries(window: str) -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", window)
            for var in ("tenant", "adapter", "backend"):
                expr = expr.replace(f"${var}", ".*")
            out.append((f"{panel['title']} [{t['refId']}]", expr))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def has_finite(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(s["value"][1])) for s in result)


def test_traffic_reached_both_engines_with_errors_and_adapters(observed: tuple[Prometheus, Traffic]) -> None:
    _, traffic = observed
    ok = {k: v.count(200) for k, v in traffic.statuses.items()}
    for tenant, adapter in TENANTS.items():
        assert ok[f"gw-observed:{tenant}:{adapter}"] > 0, traffic.statuses
        assert ok[f"gw-observed-fallback:{tenant}:{adapter}"] > 0, traffic.statuses
    codes = {c for v in traffic.statuses.values() for c in v}
    assert {200, 404, 504} <= codes, traffic.statuses


def scrape_health(prometheus: Prometheus, window: str) -> str:
    return json.dumps({
        q: [(s["metric"].get("instance"), s["value"][1]) for s in prometheus.query(q)]
        for q in (f"count_over_time(up[{window}])", f"sum_over_time(up[{window}])", f"max_over_time(scrape_duration_seconds[{window}])")
    })


def test_every_dashboard_query_returns_data(observed: tuple[Prometheus, Traffic]) -> None:
    prometheus, traffic = observed
    empty = []
    for title, expr in dashboard_queries(traffic.window):
        result = prometheus.query(expr)
        if not has_finite(result):
            empty.append(f"{title}: {expr} -> {result}")
    assert not empty, "\n".join(empty + [scrape_health(prometheus, traffic.window), str(traffic.statuses)])


def test_dashboard_variables_list_tenants_adapters_backends(observed: tuple[Prometheus, Traffic]) -> None:
    prometheus, _ = observed
    board = json.loads(DASHBOARD.read_text())
    seen = {}
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"]["query"]).groups()
        seen[label] = set(prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": metric}))
    assert set(TENANTS) <= seen["tenant"]
    assert set(TENANTS.values()) <= seen["adapter"]
    assert {"vllm", "llamacpp"} <= seen["backend"]


def test_every_alert_expression_returns_data(observed: tuple[Prometheus, Traffic]) -> None:
    prometheus, _ = observed
    empty = []
    for rule in alert_rules():
        # "signal > 0.8" as "signal > bool 0.8": a 0/1 per series, so quiet alerts return data too.
        expr, count = COMPARISON.subn(r" \1 bool \2", rule["expr"].strip())
        assert count == 1, f"{rule['alert']}: expected '<signal> <op> <threshold>': {rule['expr']}"
        if not has_finite(prometheus.query(expr)):
            empty.append(f"{rule['alert']}: {expr}")
    assert not empty, "\n".join(empty)


def test_outage_alerts_go_active(observed: tuple[Prometheus, Traffic]) -> None:
    """The gateway whose vLLM is unreachable raises BackendDown and FallbackActive (pending: their `for`)."""
    prometheus, traffic = observed
    active = {(a["labels"]["alertname"], a["labels"].get("instance", "")) for a in prometheus.get("/api/v1/alerts")["alerts"]}
    names = {name for name, _ in active}
    assert {"TuneserveBackendDown", "TuneserveFallbackActive"} <= names, active
    down = {instance for name, instance in active if name == "TuneserveBackendDown"}
    assert down == {metrics_host(traffic.fallback)}, active  # only the gateway whose vLLM is gone
    assert "TuneserveTargetDown" not in names, active  # every target is scraped
