"""Tenants' adapters on vLLM: hot-loading, single flight, LRU, parity with llama.cpp,
and fallback to llama.cpp that keeps the adapter."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.support.adapters import make_adapter, tar_gz_bytes
from tests.support.metrics import scrape, value
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, free_port, gateway
from tuneserve.models.prepare import F16_GGUF_NAME

pytestmark = pytest.mark.vllm

PROMPTS = ("What is the capital of France?", "Name three primary colors.", "Write one sentence about the sea.")
MODEL_DIR = DATA_DIR / "models" / MODEL


def common(data_dir: Path) -> dict[str, object]:
    # llama.cpp on the f16 GGUF: parity checks the adapter conversion, not a quant.
    return {"data_dir": data_dir, "model.hf_path": MODEL_DIR / "hf", "model.gguf_path": MODEL_DIR / F16_GGUF_NAME}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-adapters-data")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for seed, name in enumerate(("support", "burst", "a1", "a2", "a3")):
        out[name] = tmp_path_factory.mktemp(name) / "adapter"
        make_adapter(out[name], seed=100 + seed, b_std=0.3)
    return out


@pytest.fixture(scope="module")
def vllm_gw(vllm: ServerProcess, data_dir: Path) -> Iterator[ServerProcess]:
    server = gateway(
        "gw-vllm-adapters",
        {
            **common(data_dir),
            "engines.vllm.enabled": "true",
            "engines.vllm.url": vllm.base_url,
            # A small LRU in the gateway, so three adapters force an eviction.
            "engines.vllm.max_loras": 1,
            "engines.vllm.max_cpu_loras": 2,
        },
    ).start(ready_path="/ready", timeout_s=120)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llama_gw(data_dir: Path) -> Iterator[ServerProcess]:
    server = gateway("gw-llama-adapters", common(data_dir)).start()
    yield server
    server.stop()


def upload(server: ServerProcess, name: str, adapter: Path) -> None:
    r = httpx.post(
        server.base_url + "/v1/adapters",
        data={"name": name},
        files={"file": ("a.tar.gz", tar_gz_bytes(adapter), "application/gzip")},
        timeout=120,
    )
    assert r.status_code == 201, r.text


def chat(server: ServerProcess, model: str, prompt: str = PROMPTS[0], max_tokens: int = 12) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_hot_load_on_vllm_matches_llama_cpp(vllm_gw: ServerProcess, llama_gw: ServerProcess, adapters: dict[str, Path]) -> None:
    upload(vllm_gw, "support", adapters["support"])
    before = scrape(vllm_gw.base_url)
    first = chat(vllm_gw, "support")
    assert first.headers["x-tuneserve-backend"] == "vllm"
    after = scrape(vllm_gw.base_url)
    assert value(after, "tuneserve_adapter_load_seconds_count", backend="vllm") == value(
        before, "tuneserve_adapter_load_seconds_count", backend="vllm"
    ) + 1
    assert answer(first) != answer(chat(vllm_gw, MODEL))
    # The same adapter on both engines: the GGUF LoRA on llama.cpp answers like vLLM.
    agree = 0
    for prompt in PROMPTS:
        on_vllm = answer(chat(vllm_gw, "support", prompt))
        on_llama = chat(llama_gw, "support", prompt)
        assert on_llama.headers["x-tuneserve-backend"] == "llamacpp"
        agree += on_vllm == answer(on_llama)
    # float32 vLLM vs f16 llama.cpp: allow one prompt to drift on a near-tie.
    assert agree >= len(PROMPTS) - 1


def test_concurrent_first_requests_load_once(vllm_gw: ServerProcess, adapters: dict[str, Path]) -> None:
    upload(vllm_gw, "burst", adapters["burst"])
    before = scrape(vllm_gw.base_url)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=vllm_gw.base_url, timeout=120) as client:
            body = {"model": "burst", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(6)))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 and r.headers["x-tuneserve-backend"] == "vllm" for r in responses)
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1
    after = scrape(vllm_gw.base_url)
    loads = value(after, "tuneserve_adapter_load_seconds_count", backend="vllm") - value(
        before, "tuneserve_adapter_load_seconds_count", backend="vllm"
    )
    assert loads == 1


def test_lru_evicts_and_reloads(vllm_gw: ServerProcess, adapters: dict[str, Path]) -> None:
    for name in ("a1", "a2", "a3"):
        upload(vllm_gw, name, adapters[name])
    before = scrape(vllm_gw.base_url)
    texts = {name: answer(chat(vllm_gw, name)) for name in ("a1", "a2", "a3")}
    after = scrape(vllm_gw.base_url)
    assert value(after, "tuneserve_adapter_evictions_total", backend="vllm") > value(
        before, "tuneserve_adapter_evictions_total", backend="vllm"
    )
    assert value(after, "tuneserve_adapters_loaded", backend="vllm") <= 2
    assert answer(chat(vllm_gw, "a1")) == texts["a1"]  # evicted, reloaded, same weights


def test_delete_unloads_from_vllm(vllm_gw: ServerProcess) -> None:
    assert chat(vllm_gw, "burst").status_code == 200
    loaded = value(scrape(vllm_gw.base_url), "tuneserve_adapters_loaded", backend="vllm")
    assert httpx.delete(vllm_gw.base_url + "/v1/adapters/burst", timeout=30).status_code == 200
    assert value(scrape(vllm_gw.base_url), "tuneserve_adapters_loaded", backend="vllm") == loaded - 1
    assert chat(vllm_gw, "burst").status_code == 404


def test_fallback_keeps_the_adapter(data_dir: Path, llama_gw: ServerProcess) -> None:
    """vLLM down: the tenant's request is served by llama.cpp with its adapter, never the bare base."""
    server = gateway(
        "gw-adapter-fallback",
        {**common(data_dir), "engines.vllm.enabled": "true", "engines.vllm.url": f"http://127.0.0.1:{free_port()}"},
    ).start()
    try:
        r = chat(server, "support")
        assert r.headers["x-tuneserve-backend"] == "llamacpp"
        assert answer(r) == answer(chat(llama_gw, "support"))
        assert answer(r) != answer(chat(server, MODEL))
    finally:
        server.stop()
