"""/metrics is protected and its labels stay bounded (server.metrics; README, Metrics).

Real gateways (`tuneserve serve` subprocesses) with auth on: one that asks for a bearer
token on the API port, one that serves /metrics on a listener of its own, scraped by a
real Prometheus (`make deploy-tools`) with the token from a file, as deploy/k8s does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from serving.access import ADMIN_LABEL
from serving.metrics import ADMIN_TENANT, BASE_ADAPTER, NO_TENANT, OVERFLOW, GatewayMetrics
from serving.metrics_access import MetricsAccess
from tests.support.adapters import make_adapter, tar_gz_bytes
from tests.support.metrics import scrape
from tests.support.prometheus import Prometheus, bearer_token_file
from tests.support.servers import DATA_DIR, MODEL, ROOT, ServerProcess, free_port, gateway
from tests.test_tenant_gateway import cli
from tuneserve.config import MetricsConfig, load_settings
from tuneserve.errors import ConfigError
from tuneserve.names import is_valid_name

ADMIN_KEY = "admin-key-for-metrics-tests-0123"
TOKEN = "metrics-token-for-tests-abcdefgh"
MODEL_DIR = DATA_DIR / "models" / MODEL
REQUEST_LABELS = ("tenant", "adapter", "model")


def base_settings(data_dir: Path) -> dict[str, Any]:
    return {
        "data_dir": data_dir,
        "model.hf_path": MODEL_DIR / "hf",
        "model.gguf_path": MODEL_DIR / "model.gguf",
        "auth.enabled": "true",
        "auth.admin_key": ADMIN_KEY,
    }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def chat(server: ServerProcess, key: str | None, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    headers = bearer(key) if key else {}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=120).status_code


# --- unit: the caps, the config rules ----------------------------------------------


def test_overflow_and_fixed_labels_never_collide_with_real_names() -> None:
    assert not is_valid_name(OVERFLOW)
    assert ADMIN_TENANT == ADMIN_LABEL  # serving.access labels admins so; never capped


def test_label_caps_keep_first_names_and_fold_the_rest() -> None:
    metrics = GatewayMetrics([MODEL], labels=MetricsConfig(max_tenant_labels=2, max_adapter_labels=3))
    assert metrics.request_labels("t0", "a") == ("t0", "a")
    assert metrics.request_labels("t1", BASE_ADAPTER) == ("t1", BASE_ADAPTER)
    seen = {metrics.request_labels(f"t{i}", f"a{j}") for i in range(50) for j in range(50)}
    tenants = {t for t, _ in seen}
    assert tenants == {"t0", "t1", OVERFLOW}
    named = {pair for pair in seen if OVERFLOW not in pair}
    assert len(named) == 2  # with ("t0", "a"): the three pairs the cap allows
    # A folded tenant's adapter is folded too: its name would say whose series it is.
    assert metrics.request_labels("t9", "a7") == (OVERFLOW, OVERFLOW)
    assert metrics.request_labels("t9", BASE_ADAPTER) == (OVERFLOW, BASE_ADAPTER)
    # Names that got a label keep it; requests without a tenant are never capped.
    assert metrics.request_labels("t0", "a") == ("t0", "a")
    assert metrics.request_labels(NO_TENANT, BASE_ADAPTER) == (NO_TENANT, BASE_ADAPTER)
    assert metrics.request_labels(ADMIN_TENANT, BASE_ADAPTER) == (ADMIN_TENANT, BASE_ADAPTER)


@pytest.mark.parametrize(
    ("overrides", "open_on_api_port"),
    [
        ({"auth.enabled": False}, True),  # dev mode: everything is open anyway
        ({"auth.enabled": True, "server.metrics.token": TOKEN}, False),
        ({"auth.enabled": True, "server.metrics.port": 9464}, False),
        ({"auth.enabled": True, "server.metrics.enabled": False}, False),
    ],
)
def test_metrics_access_from_settings(overrides: dict[str, Any], open_on_api_port: bool) -> None:
    access = MetricsAccess.from_settings(load_settings(overrides=overrides, environ={}))
    assert (access.on_api_port and access.token is None) == open_on_api_port


def test_auth_without_metrics_protection_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"server\.metrics\.token_file.*server\.metrics\.port"):
        MetricsAccess.from_settings(load_settings(overrides={"auth.enabled": True}, environ={}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"server.metrics.token": "too-short"}, "server.metrics.token': Value error, must be at least 16"),
        ({"server.metrics.token": TOKEN, "server.metrics.token_file": "/t"}, "not both"),
        ({"server.metrics.port": 8000}, "metrics.port must differ from port"),
    ],
)
def test_bad_metrics_config_is_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(overrides=overrides, environ={})


def test_the_token_never_shows_in_the_settings() -> None:
    settings = load_settings(overrides={"server.metrics.token": TOKEN}, environ={})
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())
    assert TOKEN not in settings.model_dump_json()


def serve_fails(tmp_path: Path, *flags: str) -> str:
    """`tuneserve serve` that must refuse to start (before loading any model)."""
    command = [sys.executable, "-m", "tuneserve.cli.main", "serve", "--server.port", str(free_port())]
    for key, value in base_settings(tmp_path).items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "TUNESERVE_DATA_DIR": str(tmp_path)}
    result = subprocess.run([*command, *flags], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    return result.stderr


def test_serve_refuses_auth_with_open_metrics(tmp_path: Path) -> None:
    assert "server.metrics" in serve_fails(tmp_path)


def test_serve_refuses_an_unreadable_or_short_token_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-token"
    assert f"server.metrics.token_file ({missing}): cannot read it" in serve_fails(
        tmp_path, "--server.metrics.token_file", str(missing)
    )
    short = tmp_path / "short-token"
    short.write_text("short\n")
    assert "at least 16" in serve_fails(tmp_path, "--server.metrics.token_file", str(short))


# --- a gateway with the token on the API port ----------------------------------------


class Tokened:
    def __init__(self, server: ServerProcess, keys: dict[str, str], token_file: Path) -> None:
        self.server, self.keys, self.token_file = server, keys, token_file

    def metrics(self, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.get(self.server.base_url + "/metrics", headers=headers or {}, timeout=10)


@pytest.fixture(scope="module")
def tokened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tokened]:
    data_dir = tmp_path_factory.mktemp("metrics-access-data")
    keys = {tenant: cli(data_dir, "tenants", "create", tenant) for tenant in ("acme", "globex", "initech")}
    token_file = data_dir / "metrics-token"
    token_file.write_text(f"  {TOKEN}\n")  # as a Secret or an editor may leave it
    server = gateway(
        "gw-metrics-token",
        {
            **base_settings(data_dir),
            "server.metrics.token_file": token_file,
            "server.metrics.max_tenant_labels": 2,
            "server.metrics.max_adapter_labels": 1,
        },
        env={"TUNESERVE_DATA_DIR": str(data_dir)},
    ).start()
    try:
        adapter = tmp_path_factory.mktemp("metrics-adapter") / "adapter"
        make_adapter(adapter, seed=7)
        for name in ("one", "two"):
            r = httpx.post(
                server.base_url + "/v1/adapters", headers=bearer(keys["acme"]), data={"name": name},
                files={"file": ("a.tar.gz", tar_gz_bytes(adapter), "application/gzip")}, timeout=300,
            )
            assert r.status_code == 201, r.text
        yield Tokened(server, keys, token_file)
    finally:
        server.stop()


def test_metrics_refuse_without_the_token(tokened: Tokened) -> None:
    for headers in (
        {},
        bearer("metrics-token-for-tests-abcdefgX"),  # one character off
        bearer(TOKEN[:-1]),
        bearer(ADMIN_KEY),  # the scrape token is the only credential, not the admin's
        bearer(tokened.keys["acme"]),
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
    ):
        r = tokened.metrics(headers)
        error = assert_openai_error(r, 401)
        assert error["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert "tuneserve_" not in r.text and TOKEN not in r.text
    r = tokened.metrics(bearer(TOKEN))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "# TYPE tuneserve_requests_total counter" in r.text and "tuneserve_backend_up" in r.text
    # Documented as protected, and the token appears in no log line.
    responses = httpx.get(tokened.server.base_url + "/openapi.json", timeout=10).json()["paths"]["/metrics"]["get"]["responses"]
    assert "401" in responses
    assert TOKEN not in tokened.server.log_tail(10**7)


def request_label_values(samples: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, set[str]]:
    series = samples.get("tuneserve_requests_total", [])
    return {label: {labels[label] for labels, _ in series} for label in REQUEST_LABELS}


def test_label_values_stay_bounded(tokened: Tokened) -> None:
    server, keys = tokened.server, tokened.keys
    # First come, first labelled: acme and globex get the two tenant labels, acme's
    # "one" the one adapter label; initech and acme's "two" are folded into _other.
    assert chat(server, keys["acme"], MODEL) == 200
    assert chat(server, keys["globex"], MODEL) == 200
    assert chat(server, keys["initech"], MODEL) == 200
    assert chat(server, keys["acme"], "one") == 200
    assert chat(server, keys["acme"], "two") == 200

    def unknown_models(start: int, count: int) -> None:
        for i in range(start, start + count):
            for key, model in (
                (keys["acme"], f"no-such-model-{i}"),
                (keys["acme"], f"acme/no-such-adapter-{i}"),
                (keys["globex"], f"acme/one-{i}"),
                (keys["globex"], "acme/one"),  # another tenant's adapter: a 404 like a missing one
                (keys["initech"], f"initech/x{i}"),
                (ADMIN_KEY, f"tenant{i}/adapter{i}"),
                (None, f"anonymous-{i}"),  # 401 before the body is read
                ("ts-not-a-key", f"bad-key-{i}"),
            ):
                assert chat(server, key, model) in (401, 404)

    unknown_models(0, 3)
    before = scrape(server.base_url, TOKEN)
    unknown_models(3, 30)
    after = scrape(server.base_url, TOKEN)

    values = request_label_values(after)
    assert values["model"] == {MODEL, "unknown"}
    assert values["tenant"] == {"acme", "globex", OVERFLOW, ADMIN_TENANT, NO_TENANT}
    assert values["adapter"] == {BASE_ADAPTER, "one", OVERFLOW}
    # 240 requests naming models that do not exist added no series, to any metric.
    for name in {*before, *after}:
        assert len(after.get(name, [])) == len(before.get(name, [])), name
    assert sum(v for l, v in after["tuneserve_requests_total"] if l["status"] == "404") > sum(
        v for l, v in before["tuneserve_requests_total"] if l["status"] == "404"
    )


def test_a_rotated_token_file_takes_effect_without_a_restart(tokened: Tokened) -> None:
    new = "rotated-metrics-token-0123456789"
    staged = tokened.token_file.with_suffix(".new")
    try:
        staged.write_text(new)
        os.replace(staged, tokened.token_file)  # as Kubernetes swaps a Secret's files
        assert_openai_error(tokened.metrics(bearer(TOKEN)), 401)
        assert tokened.metrics(bearer(new)).status_code == 200
        # A rotation to a bad file keeps the last good token rather than opening or locking.
        tokened.token_file.write_text("short")
        assert tokened.metrics(bearer(new)).status_code == 200
        assert_openai_error(tokened.metrics(bearer("short")), 401)
    finally:
        tokened.token_file.write_text(TOKEN)
    assert tokened.metrics(bearer(TOKEN)).status_code == 200
    log = tokened.server.log_tail(10**7)
    assert "keeps accepting the previous token" in log and new not in log


# --- a gateway with a metrics listener of its own, scraped by Prometheus -------------


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    data_dir = tmp_path_factory.mktemp("metrics-listener-data")
    port = free_port()
    server = gateway(
        "gw-metrics-listener",
        {**base_settings(data_dir), "server.metrics.port": port},
        # From the environment, as a container would take it from a Secret.
        env={"TUNESERVE_DATA_DIR": str(data_dir), "TUNESERVE_SERVER__METRICS__TOKEN": TOKEN},
    ).start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.stop()


def test_api_port_never_serves_metrics(listener: tuple[ServerProcess, str]) -> None:
    server, metrics_at = listener
    for headers in ({}, bearer(TOKEN), bearer(ADMIN_KEY)):
        assert_openai_error(httpx.get(server.base_url + "/metrics", headers=headers, timeout=10), 404)
    assert "/metrics" not in httpx.get(server.base_url + "/openapi.json", timeout=10).json()["paths"]
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200

    url = f"http://{metrics_at}"
    assert_openai_error(httpx.get(url + "/metrics", timeout=10), 401)
    assert_openai_error(httpx.get(url + "/metrics", headers=bearer(ADMIN_KEY), timeout=10), 401)
    ok = httpx.get(url + "/metrics", headers=bearer(TOKEN), timeout=10)
    assert ok.status_code == 200 and "tuneserve_backend_up" in ok.text
    # The metrics port serves nothing else, not even with a valid key.
    for path in ("/health", "/ready", "/v1/models", "/openapi.json", "/docs"):
        assert_openai_error(httpx.get(url + path, headers=bearer(ADMIN_KEY), timeout=10), 404)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    assert_openai_error(httpx.post(url + "/v1/chat/completions", json=body, headers=bearer(ADMIN_KEY), timeout=10), 404)


def test_prometheus_scrapes_the_listener_with_the_token_file(
    listener: tuple[ServerProcess, str], tmp_path: Path
) -> None:
    server, metrics_at = listener
    token_file = tmp_path / "metrics-token"
    token_file.write_text(TOKEN + "\n")
    prometheus = Prometheus(
        tmp_path,
        {"gateway": [metrics_at], "no-token": [metrics_at], "api-port": [server.base_url.removeprefix("http://")]},
        jobs={"gateway": bearer_token_file(token_file), "api-port": bearer_token_file(token_file)},
    ).start()
    try:
        deadline = time.monotonic() + 30
        while True:
            targets = {t["labels"]["job"]: t for t in prometheus.get("/api/v1/targets")["activeTargets"]}
            if len(targets) == 3 and all(t["health"] != "unknown" for t in targets.values()):
                break
            assert time.monotonic() < deadline, targets
            time.sleep(0.5)
        assert targets["gateway"]["health"] == "up", targets["gateway"]
        assert targets["no-token"]["health"] == "down" and "401" in targets["no-token"]["lastError"]
        assert targets["api-port"]["health"] == "down" and "404" in targets["api-port"]["lastError"]
        up = prometheus.query('tuneserve_backend_up{job="gateway", backend="llamacpp"}')
        assert [s["value"][1] for s in up] == ["1"]
    finally:
        prometheus.stop()
