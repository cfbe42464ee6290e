"""`tuneserve export`: GGUF exports and quantizations behind the quality gate, a GGUF
LoRA that llama.cpp loads, and `tuneserve serve` on an exported GGUF."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from openai import OpenAI

from tests.support.adapters import HF_DIR
from tests.support.merges import GGUF, adapters, cli, full_models, job_of, merge_work  # noqa: F401
from tests.support.servers import gateway
from tuneserve.gguf.llama_loader import load_llama

PROBE = "What is the capital of France?"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


def _export(export_dir: Path, source: Path, out: str, *args: str, check: bool = True):
    return cli("export", str(source), "--out", str(export_dir / out), *args, data_dir=export_dir / "data", check=check)


@pytest.mark.parametrize("qtype", ["f16", "Q8_0"])
def test_export_passes_the_gate(export_dir, qtype):
    job = job_of(_export(export_dir, HF_DIR, f"base-{qtype}.gguf", "--type", qtype))
    assert job["status"] == "succeeded" and Path(job["outputs"][0]).is_file()
    gate = job["report"]["gate"]
    assert gate["passed"] and gate["perplexity_ratio"] <= 1.05 and gate["token_agreement"] >= 0.9
    assert gate["prompts"] == 8 and gate["continuation_tokens"] > 50


def test_q4_k_m_fails_the_gate_on_this_cpu_and_is_not_published(export_dir):
    """llama.cpp's Q4_K_M of the 135M model answers differently on this CPU (perplexity
    +8% on the held-out text): the job fails, the report says why, no file appears."""
    result = _export(export_dir, HF_DIR, "base-Q4_K_M.gguf", "--type", "Q4_K_M", check=False)
    assert result.returncode == 2
    assert "quality gate failed" in result.stderr and "not published" in result.stderr
    assert not (export_dir / "base-Q4_K_M.gguf").exists()
    assert not list(export_dir.glob(".base-Q4_K_M.gguf.tmp-*"))
    failed = job_of(cli("jobs", "list", data_dir=export_dir / "data"))[0]
    assert failed["status"] == "failed" and "perplexity" in failed["error"]
    shown = job_of(cli("jobs", "show", failed["id"], data_dir=export_dir / "data"))
    assert shown["report"]["gate"]["passed"] is False and shown["report"]["gate"]["perplexity_ratio"] > 1.05


def test_damaged_gguf_fails_the_gate(export_dir):
    import gguf

    damaged = export_dir / "damaged-f16.gguf"
    shutil.copy(GGUF, damaged)
    reader = gguf.GGUFReader(damaged, "r+")
    for tensor in reader.tensors:
        if tensor.name.endswith("ffn_down.weight"):  # every layer's MLP output, x1.5
            tensor.data[...] = (tensor.data.astype(np.float32) * 1.5).astype(tensor.data.dtype)
    del reader
    result = _export(export_dir, damaged, "damaged-Q8_0.gguf", "--type", "Q8_0", "--reference", str(HF_DIR), check=False)
    assert result.returncode == 2 and "quality gate failed" in result.stderr
    assert not (export_dir / "damaged-Q8_0.gguf").exists()


def test_adapter_exports_to_a_gguf_lora_that_llama_cpp_applies(export_dir, adapters, full_models):
    """The GGUF LoRA passes the gate against HF+PEFT, and llama.cpp with it on the f16 base
    answers like llama.cpp on the f16 GGUF of the merged model (adapter folded into the base).

    Both sides are f16: against the Q8_0 base, rounding alone flips the first token of this
    prompt on some CPUs (AVX-512 builds answer "L'Étoile..." from the plain Q8_0 base)."""
    from tuneserve.gguf.agreement import greedy_texts
    from tuneserve.models.chat_template import ChatTemplate

    job = job_of(_export(export_dir, adapters[0], "adapter1.gguf"))
    assert job["report"]["gate"]["passed"]
    # The gate is not the subject here; f16 of the merged model is the engine-side truth.
    merged = job_of(_export(export_dir, full_models[0], "full1-f16.gguf", "--type", "f16", "--no-gate"))
    assert merged["report"]["gate"] == "disabled"
    base = job_of(_export(export_dir, HF_DIR, "base-f16-ungated.gguf", "--type", "f16", "--no-gate"))
    base_gguf = base["outputs"][0]

    prompt = ChatTemplate.from_hf_dir(HF_DIR).render([{"role": "user", "content": PROBE}])
    merged_text = greedy_texts(export_dir / "full1-f16.gguf", [prompt])[0]
    llama = load_llama(base_gguf, lora_path=str(export_dir / "adapter1.gguf"), n_ctx=256)
    tokens = llama.tokenize(prompt.encode(), add_bos=False, special=True)
    out = []
    for token in llama.generate(tokens, temp=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0):
        if token == llama.token_eos() or len(out) >= 16:
            break
        out.append(token)
    llama.close()
    assert llama_text(out, export_dir) == merged_text
    assert merged_text != greedy_texts(Path(base_gguf), [prompt])[0]


def llama_text(tokens: list[int], export_dir: Path) -> str:
    llama = load_llama(GGUF, n_ctx=64, vocab_only=True)
    try:
        return llama.detokenize(tokens).decode("utf-8", "replace")
    finally:
        llama.close()


def test_gateway_serves_an_exported_gguf(export_dir, full_models):
    """`tuneserve serve --model.gguf_path` on the merged model's export answers like it."""
    exported = export_dir / "full1-f16.gguf"
    if not exported.is_file():
        job_of(_export(export_dir, full_models[0], "full1-f16.gguf", "--type", "f16", "--no-gate"))
    from tuneserve.gguf.agreement import greedy_texts
    from tuneserve.models.chat_template import ChatTemplate

    prompt = ChatTemplate.from_hf_dir(HF_DIR).render([{"role": "user", "content": PROBE}])
    expected = greedy_texts(exported, [prompt], max_tokens=12)[0]
    server = gateway("gw-exported", {"model.gguf_path": str(exported)}).start()
    try:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": PROBE}],
            temperature=0, max_tokens=12,
        )
    finally:
        server.stop()
    assert reply.choices[0].message.content == expected
