"""What `tuneserve merge` makes is servable: a merged HF dir as vLLM's base, answering
on the engine exactly like the base with the adapter hot-loaded."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.support.adapters import HF_DIR, tar_gz_bytes
from tests.support.merges import GGUF, adapters, full_models, merge_work  # noqa: F401
from tests.support.servers import MODEL, TEST_VLLM_LAUNCH, ServerProcess, free_port, gateway

pytestmark = pytest.mark.vllm

PROMPTS = ("What is the capital of France?", "Name three primary colors.")


def greedy(server: ServerProcess, model: str, prompt: str) -> tuple[str, str]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.headers["x-tuneserve-backend"]


def test_vllm_serves_a_merged_dir_like_base_plus_adapter(
    vllm: ServerProcess, full_models: list[Path], adapters: list[Path], tmp_path: Path
) -> None:
    with_adapter = gateway(
        "gw-base-plus-adapter",
        {"data_dir": tmp_path / "a", "model.hf_path": HF_DIR, "model.gguf_path": GGUF,
         "engines.vllm.enabled": "true", "engines.vllm.url": vllm.base_url},
    ).start(ready_path="/ready")
    try:
        r = httpx.post(with_adapter.base_url + "/v1/adapters", data={"name": "merged-in"},
                       files={"file": ("a.tar.gz", tar_gz_bytes(adapters[0]), "application/gzip")}, timeout=120)
        assert r.status_code == 201, r.text
        expected = [greedy(with_adapter, "merged-in", p) for p in PROMPTS]
        base = [greedy(with_adapter, MODEL, p) for p in PROMPTS]
    finally:
        with_adapter.stop()
    assert all(backend == "vllm" for _, backend in expected + base)
    assert [t for t, _ in expected] != [t for t, _ in base]  # the adapter matters

    # vLLM only: an answer from llama.cpp's base GGUF would prove nothing.
    merged = gateway(
        "gw-merged",
        {"data_dir": tmp_path / "b", "model.hf_path": full_models[0], "engines.llamacpp.enabled": "false",
         "engines.vllm.enabled": "true", "engines.vllm.launch.enabled": "true",
         "engines.vllm.launch.port": free_port(), "engines.vllm.launch.dtype": TEST_VLLM_LAUNCH["dtype"],
         "engines.vllm.launch.extra_args": json.dumps(TEST_VLLM_LAUNCH["extra_args"])},
    ).start(ready_path="/ready", timeout_s=400)
    try:
        answers = [greedy(merged, MODEL, p) for p in PROMPTS]
    finally:
        merged.stop()
    assert answers == expected
