"""Two tenants on a gateway with auth: keys, uploads, isolation, hot-loading on llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.support.adapters import make_adapter, tar_gz_bytes
from tests.support.metrics import scrape, value
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, gateway

ADMIN_KEY = "admin-key-for-tests-0123456789"
UPLOAD_CAP = 16 * 1024 * 1024  # the test adapters are about 10 MB
UPLOAD_TIMEOUT_S = 8  # a local 10 MB upload takes well under a second, even on a loaded machine
METRICS_TOKEN = "metrics-token-for-tests-0123456789"  # with auth on, /metrics needs one
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
            "server.metrics.token": METRICS_TOKEN,
            "limits.per_tenant": json.dumps({"tiny": {"requests_per_minute": 2}}),
            # One adapter per llama.cpp instance: switching tenants evicts and reloads.
            "engines.llamacpp.max_loras": 1,
            "adapters.max_bytes": UPLOAD_CAP,
            "adapters.reconcile_interval_s": 0.3,
            "adapters.upload_timeout_s": UPLOAD_TIMEOUT_S,
            # One upload validated at a time: one still arriving must not hold that place.
            "adapters.max_concurrent_uploads": 1,
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
    assert value(scrape(env.server.base_url, METRICS_TOKEN), "tuneserve_adapter_evictions_total", backend="llamacpp") >= 1

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

    samples = scrape(env.server.base_url, METRICS_TOKEN)
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


def audit_records(env: Env) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (env.data_dir / "audit.log").read_text().splitlines()]


def wait_until(predicate: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def loaded_on_llamacpp(env: Env) -> float:
    return value(scrape(env.server.base_url, METRICS_TOKEN), "tuneserve_adapters_loaded", backend="llamacpp")


def test_deleted_tenant_leaves_nothing_for_a_new_one_of_its_name(env: Env) -> None:
    key = cli(env.data_dir, "tenants", "create", "ephemeral")
    env.keys["ephemeral"] = key
    assert env.upload("ephemeral", "support", tar_gz_bytes(env.adapters["acme-v1"])).status_code == 201
    old_answer = env.chat("ephemeral", "support")
    assert old_answer.status_code == 200
    assert loaded_on_llamacpp(env) >= 1

    said = cli(env.data_dir, "tenants", "delete", "ephemeral")
    assert "1 adapter(s)" in said
    assert not (env.data_dir / "adapters" / "ephemeral").exists()
    deletion = [a for a in audit_records(env) if a["action"] == "tenant.delete" and a["target"] == "ephemeral"]
    assert deletion[-1]["result"] == "ok" and deletion[-1]["removed_adapters"] == ["support"]
    assert_error(env.chat("ephemeral", "support"), 401)  # the old key is dead at once
    assert_error(env.chat("admin", "ephemeral/support"), 404, "model_not_found")
    # The running gateway unloads the deleted tenant's adapter from its engine.
    wait_until(lambda: loaded_on_llamacpp(env) == 0)

    env.keys["ephemeral"] = cli(env.data_dir, "tenants", "create", "ephemeral")
    assert [m["id"] for m in env.get("ephemeral", "/v1/models").json()["data"]] == [MODEL]
    assert env.get("ephemeral", "/v1/adapters").json()["data"] == []
    assert_error(env.chat("ephemeral", "support"), 404, "model_not_found")
    # Its own "support" starts from v1, and is its own weights, not the old tenant's.
    again = env.upload("ephemeral", "support", tar_gz_bytes(env.adapters["globex"]))
    assert again.status_code == 201 and again.json()["version"] == 1
    new_answer = env.chat("ephemeral", "support").json()["choices"][0]["message"]["content"]
    globex_answer = env.chat("globex", MODEL)  # any request: the engine switches adapters
    assert globex_answer.status_code == 200
    assert new_answer != old_answer.json()["choices"][0]["message"]["content"]
    assert env.chat("ephemeral", "support").json()["choices"][0]["message"]["content"] == new_answer


def _multipart_chunks(name: str, payload_mib: int, hold: threading.Event | None = None) -> Iterator[bytes]:
    boundary = "tuneserve-test-boundary"
    yield (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.tar.gz\"\r\n"
        "Content-Type: application/gzip\r\n\r\n"
    ).encode()
    for index in range(payload_mib):
        if hold is not None and index == 1:
            hold.wait(60)
        yield b"\0" * (1 << 20)
    yield f"\r\n--{boundary}--\r\n".encode()


def _chunked_upload(
    env: Env, who: str, name: str, payload_mib: int, hold: threading.Event | None = None,
    client: httpx.Client | None = None,
) -> httpx.Response:
    headers = {**env.headers(who), "Content-Type": "multipart/form-data; boundary=tuneserve-test-boundary"}
    # A generator body goes out chunked: no Content-Length for the gateway to check.
    send = client.post if client is not None else httpx.post
    return send(env.server.base_url + "/v1/adapters", headers=headers,
                content=_multipart_chunks(name, payload_mib, hold), timeout=120)


def test_chunked_upload_stops_at_the_cap_and_leaves_nothing(env: Env) -> None:
    spool = env.data_dir / "tmp"
    before = set(spool.iterdir()) if spool.exists() else set()
    with httpx.Client() as client:
        r = _chunked_upload(env, "acme", "huge", payload_mib=41, client=client)
        assert_error(r, 413, "request_too_large")
        assert r.headers["connection"] == "close"
        # The same client's next request is answered, not lost in the unread upload.
        assert client.get(env.server.base_url + "/v1/models", headers=env.headers("acme"), timeout=30).status_code == 200
    assert r.json()["error"]["param"] == "file" and str(UPLOAD_CAP) in r.json()["error"]["message"]
    assert (set(spool.iterdir()) if spool.exists() else set()) == before
    assert not list(env.data_dir.glob(".adapter-upload-*"))
    assert all(a["id"] != "huge" for a in env.get("admin", "/v1/adapters").json()["data"])
    refused = [a for a in audit_records(env) if a["action"] == "adapter.add" and a["target"] == "acme/huge"]
    assert refused and refused[-1]["result"] == "refused" and refused[-1]["status"] == 413
    assert env.chat("acme", MODEL, max_tokens=1).status_code == 200


def test_uploads_in_progress_are_bounded_per_tenant(env: Env) -> None:
    hold = threading.Event()
    answers: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: answers.append(_chunked_upload(env, "globex", "slow", 2, hold)))
    slow.start()
    spool = env.data_dir / "tmp"
    try:
        # The first upload holds globex's one slot while its body trickles in; its spool
        # file shows it is being read.
        wait_until(lambda: spool.exists() and any(spool.iterdir()), timeout_s=30)
        r = env.upload("globex", "second", tar_gz_bytes(env.adapters["globex"]))
        assert_error(r, 429, "too_many_uploads")
        assert int(r.headers["retry-after"]) >= 1
        # Another tenant is not held up by globex's upload, though only one upload may be
        # processed at a time: a body still arriving holds no processing place.
        assert env.upload("acme", "parallel", tar_gz_bytes(env.adapters["acme-v1"])).status_code == 201
    finally:
        hold.set()
        slow.join(120)
    # 2 MiB of zeros is no archive (or, held too long on a slow machine, a 408).
    assert answers and answers[0].status_code in (400, 408)
    assert env.upload("globex", "second", tar_gz_bytes(env.adapters["globex"])).status_code == 201


def test_refusals_are_audited(env: Env) -> None:
    good = tar_gz_bytes(env.adapters["acme-v1"])
    assert_error(env.upload("acme", "other", good, tenant="globex"), 403)
    r = httpx.post(env.server.base_url + "/v1/adapters", headers=env.headers("acme"), data={"name": "x", "path": "/etc"}, timeout=30)
    assert_error(r, 403)
    assert_error(env.upload("acme", "", good), 400)
    assert_error(env.delete("acme", "/v1/adapters/globex/support"), 404)
    assert_error(env.delete("acme", f"/v1/adapters/{MODEL}"), 400)
    records = [(a["actor"], a["action"], a["target"], a["result"], a.get("status")) for a in audit_records(env)]
    for expected in (
        ("tenant:acme", "adapter.add", "globex/other", "refused", 403),
        ("tenant:acme", "adapter.add", "acme/x", "refused", 403),
        ("tenant:acme", "adapter.add", "acme/", "refused", 400),
        ("tenant:acme", "adapter.delete", "globex/support", "refused", 404),
        ("tenant:acme", "adapter.delete", MODEL, "refused", 400),
    ):
        assert expected in records, expected
    assert ADMIN_KEY not in (env.data_dir / "audit.log").read_text()
    assert not any(k in (env.data_dir / "audit.log").read_text() for k in env.keys.values())


def test_adapter_routes_are_documented(env: Env) -> None:
    paths = httpx.get(env.server.base_url + "/openapi.json", timeout=30).json()["paths"]
    upload = paths["/v1/adapters"]["post"]
    assert set(upload["responses"]) >= {"201", "400", "401", "403", "404", "413", "429"}
    assert "multipart/form-data" in upload["requestBody"]["content"]
    fields = upload["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert fields["file"]["format"] == "binary" and "name" in fields
    delete = paths["/v1/adapters/{model}"]["delete"]
    assert set(delete["responses"]) == {"200", "400", "401", "404"}


def test_stalled_upload_times_out_and_leaves_nothing(env: Env) -> None:
    spool = env.data_dir / "tmp"
    hold = threading.Event()
    start = time.monotonic()
    try:
        r = _chunked_upload(env, "tiny", "stalled", payload_mib=3, hold=hold)
    finally:
        hold.set()
    assert_error(r, 408)
    assert time.monotonic() - start >= UPLOAD_TIMEOUT_S
    assert not (spool.exists() and any(spool.iterdir()))
    refused = [a for a in audit_records(env) if a["target"] == "tiny/stalled"]
    assert refused and refused[-1]["result"] == "refused" and refused[-1]["status"] == 408
