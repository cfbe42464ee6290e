"""Two tenants on a gateway with auth: keys, uploads, isolation, hot-loading on llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.support.adapters import make_adapter, tar_gz_bytes
from tests.support.metrics import scrape, value
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, gateway

ADMIN_KEY = "admin-key-for-tests-0123456789"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def cli(data_dir: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tuneserve.cli.main", *args],
        capture_output=True, text=True, env={"TUNESERVE_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


class Env:
    def __init__(self, server: ServerProcess, keys: dict[str, str], adapters: dict[str, Path], data_dir: Path) -> None:
        self.server = server
        self.data_dir = data_dir
        self.keys = keys
        self.adapters = adapters

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def chat(self, who: str, model: str, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": QUESTION, "max_tokens": 12, "temperature": 0, **extra}
        return httpx.post(self.server.base_url + "/v1/chat/completions", json=body, headers=self.headers(who), timeout=120)

    def upload(self, who: str, name: str, archive: bytes, **fields: str) -> httpx.Response:
        return httpx.post(
            self.server.base_url + "/v1/adapters",
            headers=self.headers(who),
            data={"name": name, **fields},
            files={"file": ("adapter.tar.gz", archive, "application/gzip")},
            timeout=120,
        )

    def get(self, who: str, path: str) -> httpx.Response:
        return httpx.get(self.server.base_url + path, headers=self.headers(who), timeout=30)

    def delete(self, who: str, path: str) -> httpx.Response:
        return httpx.delete(self.server.base_url + path, headers=self.headers(who), timeout=30)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    data_dir = tmp_path_factory.mktemp("tenants-data")
    keys = {name: cli(data_dir, "tenants", "create", name) for name in ("acme", "globex", "tiny")}
    keys["admin"] = ADMIN_KEY
    adapters = {}
    for seed, name in enumerate(("acme-v1", "globex", "acme-v2")):
        adapters[name] = tmp_path_factory.mktemp(name) / "adapter"
        # A strong adapter: every one of them must visibly change the answer.
        make_adapter(adapters[name], seed=seed * 10, b_std=0.3)
    model_dir = DATA_DIR / "models" / MODEL
    server = gateway(
        "gw-tenants",
        {
            "data_dir": data_dir,
            "model.hf_path": model_dir / "hf",
            "model.gguf_path": model_dir / "model.gguf",
            "auth.enabled": "true",
            "auth.admin_key": ADMIN_KEY,
            "limits.per_tenant": json.dumps({"tiny": {"requests_per_minute": 2}}),
            # One adapter per llama.cpp instance: switching tenants evicts and reloads.
            "engines.llamacpp.max_loras": 1,
        },
        env={"TUNESERVE_DATA_DIR": str(data_dir)},
    ).start()
    try:
        yield Env(server, keys, adapters, data_dir)
    finally:
        server.stop()


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    return error


def test_requests_need_a_valid_key(env: Env) -> None:
    url = env.server.base_url + "/v1/chat/completions"
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2}
    assert_error(httpx.post(url, json=body, timeout=30), 401, "invalid_api_key")
    assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer ts-nope"}, timeout=30), 401)
    assert_error(httpx.get(env.server.base_url + "/v1/models", timeout=30), 401)
    assert env.chat("acme", MODEL).status_code == 200
    assert env.chat("admin", MODEL).status_code == 200


def test_isolation_matrix(env: Env) -> None:
    base_text = env.chat("acme", MODEL).json()["choices"][0]["message"]["content"]
    r = env.upload("acme", "support", tar_gz_bytes(env.adapters["acme-v1"]))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["tenant"] == "acme"
    assert env.upload("globex", "support", tar_gz_bytes(env.adapters["globex"])).status_code == 201

    # Listing: each tenant sees the base and its own adapters, parented to the base.
    for who in ("acme", "globex"):
        models = env.get(who, "/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [(MODEL, None), ("support", MODEL)]
        assert [a["tenant"] for a in env.get(who, "/v1/adapters").json()["data"]] == [who]
    admin_ids = {m["id"] for m in env.get("admin", "/v1/models").json()["data"]}
    assert admin_ids == {MODEL, "acme/support", "globex/support"}

    # Use: each tenant's "support" is its own weights; both differ from the base.
    acme = env.chat("acme", "support")
    globex = env.chat("globex", "support")
    assert acme.status_code == globex.status_code == 200
    acme_text = acme.json()["choices"][0]["message"]["content"]
    globex_text = globex.json()["choices"][0]["message"]["content"]
    assert acme_text != base_text and globex_text != base_text and acme_text != globex_text
    assert acme.json()["model"] == "support"
    # acme's adapter was evicted for globex's; reloaded, it answers exactly as before.
    assert env.chat("admin", "acme/support").json()["choices"][0]["message"]["content"] == acme_text
    assert value(scrape(env.server.base_url), "tuneserve_adapter_evictions_total", backend="llamacpp") >= 1

    # Another tenant's adapter is exactly a missing one: same status, type, code, param.
    foreign = assert_error(env.chat("globex", "acme/support"), 404, "model_not_found")
    missing = assert_error(env.chat("globex", "acme/nothing"), 404, "model_not_found")
    assert (foreign["type"], foreign["param"]) == (missing["type"], missing["param"])
    assert_error(env.delete("globex", "/v1/adapters/acme/support"), 404, "model_not_found")
    assert env.chat("acme", "support").status_code == 200  # untouched

    # Delete: gone for its owner, the other tenant's adapter of the same name stays.
    r = env.delete("acme", "/v1/adapters/support")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert_error(env.chat("acme", "support"), 404, "model_not_found")
    assert env.chat("globex", "support").json()["choices"][0]["message"]["content"] == globex_text
    assert [m["id"] for m in env.get("acme", "/v1/models").json()["data"]] == [MODEL]

    audit = [json.loads(line) for line in (env.data_dir / "audit.log").read_text().splitlines()]
    actions = {(a["actor"], a["action"], a["target"], a["result"]) for a in audit}
    assert ("tenant:acme", "adapter.add", "acme/support", "ok") in actions
    assert ("tenant:acme", "adapter.delete", "acme/support", "ok") in actions
    assert all(a["ts"].endswith(("Z", "+00:00")) for a in audit)

    samples = scrape(env.server.base_url)
    assert value(samples, "tuneserve_requests_total", tenant="globex", adapter="support", status="200") >= 2
    assert value(samples, "tuneserve_adapter_load_seconds_count", backend="llamacpp") >= 2
    assert value(samples, "tuneserve_adapters_loaded", backend="llamacpp") >= 1


def test_new_version_never_serves_stale_state(env: Env) -> None:
    assert env.upload("acme", "writer", tar_gz_bytes(env.adapters["acme-v1"])).status_code == 201
    v1 = env.chat("acme", "writer").json()["choices"][0]["message"]["content"]
    assert env.chat("acme", "writer").json()["choices"][0]["message"]["content"] == v1  # warm, same answer
    r = env.upload("acme", "writer", tar_gz_bytes(env.adapters["acme-v2"]))
    assert r.status_code == 201 and r.json()["version"] == 2
    v2 = env.chat("acme", "writer").json()["choices"][0]["message"]["content"]
    assert v2 != v1


def test_bad_uploads_are_4xx_and_store_nothing(env: Env) -> None:
    before = env.get("admin", "/v1/adapters").json()
    good = tar_gz_bytes(env.adapters["acme-v1"])
    error = assert_error(env.upload("acme", "evil", tar_gz_bytes(env.adapters["acme-v1"], {"pytorch_model.bin": b"x"})), 400)
    assert error["code"] == "pickle_file"
    assert_error(env.upload("acme", "Bad Name", good), 400, "invalid_name")
    assert_error(env.upload("acme", "junk", b"not an archive"), 400)
    assert_error(env.upload("acme", "other", good, tenant="globex"), 403)
    r = httpx.post(env.server.base_url + "/v1/adapters", headers=env.headers("acme"), data={"name": "x", "path": "/etc"}, timeout=30)
    assert_error(r, 403)
    r = httpx.post(env.server.base_url + "/v1/adapters", headers=env.headers("acme"), json={"name": "x"}, timeout=30)
    assert_error(r, 400)
    assert env.get("admin", "/v1/adapters").json() == before


def test_per_tenant_rate_limit(env: Env) -> None:
    assert env.chat("tiny", MODEL, max_tokens=1).status_code == 200
    assert env.chat("tiny", MODEL, max_tokens=1).status_code == 200
    r = env.chat("tiny", MODEL, max_tokens=1)
    assert_error(r, 429, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1
    assert env.chat("acme", MODEL, max_tokens=1).status_code == 200  # others unaffected
