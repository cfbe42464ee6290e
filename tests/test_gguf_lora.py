"""PEFT LoRA -> GGUF LoRA: real PEFT adapters of the default model, converted, loaded by
real llama.cpp on the f16 GGUF and compared token for token with transformers+PEFT.

Everything runs in float32 on the HF side: bf16 garbles this 135M model.
"""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path
from typing import Any, Iterator

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from llama_cpp import Llama
from peft import PeftModel
from safetensors.torch import load_file, save_file

from tests.support.adapters import make_adapter
from tests.support.servers import DATA_DIR
from tuneserve.gguf.llama_loader import load_llama
from tuneserve.gguf.lora import AdapterConversionError, convert_lora_to_gguf
from tuneserve.models.chat_template import ChatTemplate
from tuneserve.models.prepare import F16_GGUF_NAME

MODEL_DIR = DATA_DIR / "models" / "smollm2-135m-instruct"
HF_DIR = MODEL_DIR / "hf"
BASE_GGUF = MODEL_DIR / F16_GGUF_NAME

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
)
N_TOKENS = 12


def prompt_tokens(llama: Llama, text: str) -> list[int]:
    rendered = ChatTemplate.from_hf_dir(HF_DIR).render([{"role": "user", "content": text}])
    return llama.tokenize(rendered.encode(), add_bos=False, special=True)


def peft_greedy(model: torch.nn.Module, tokens: list[int], eos: int) -> tuple[list[int], np.ndarray]:
    """Greedy ids and the logits of the first generated position (KV-cached forward loop;
    generate() adds seconds of first-call overhead on this CPU)."""
    out: list[int] = []
    with torch.inference_mode():
        result = model(input_ids=torch.tensor([tokens]), use_cache=True)
        first_logits = result.logits[0, -1].numpy().copy()
        while len(out) < N_TOKENS:
            token = int(result.logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            result = model(
                input_ids=torch.tensor([[token]]), past_key_values=result.past_key_values, use_cache=True
            )
    return out, first_logits


def set_adapter(llama: Llama, adapter: Any | None) -> None:
    if adapter is None:
        assert llama_cpp.llama_set_adapters_lora(llama.ctx, None, 0, None) == 0
    else:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(1.0)
        assert llama_cpp.llama_set_adapters_lora(llama.ctx, adapters, 1, scales) == 0


def llama_greedy(llama: Llama, tokens: list[int]) -> tuple[list[int], np.ndarray]:
    """Greedy ids as the serving engine samples them, and the first-position logits."""
    # The prompt cache is keyed on tokens only: without a reset, a run with another
    # adapter would reuse this prompt's KV computed under the previous one.
    llama.reset()
    llama.eval(tokens)
    first_logits = np.ctypeslib.as_array(
        llama_cpp.llama_get_logits_ith(llama.ctx, -1), shape=(llama.n_vocab(),)
    ).copy()
    llama.reset()
    out: list[int] = []
    for token in llama.generate(tokens, temp=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0):
        if token == llama.token_eos() or len(out) >= N_TOKENS:
            break
        out.append(token)
    return out, first_logits


@pytest.fixture(scope="module", autouse=True)
def one_thread_each() -> Iterator[None]:
    # torch and llama.cpp each keep an OpenMP pool whose idle threads spin; taking turns
    # in one process on 2 cores they starve each other (seconds per 12 tokens instead
    # of ~0.4 s). One thread each keeps both fast and the timing steady.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def llama() -> Iterator[Llama]:
    model = load_llama(BASE_GGUF, n_ctx=512, n_threads=1, n_threads_batch=1)
    yield model
    set_adapter(model, None)
    model.close()


@pytest.fixture()
def load_adapter(llama: Llama) -> Iterator[Any]:
    loaded: list[Any] = []

    def load(path: Path) -> Any:
        adapter = llama_cpp.llama_adapter_lora_init(llama.model, str(path).encode())
        assert adapter, f"llama.cpp refused {path}"
        loaded.append(adapter)
        return adapter

    yield load
    set_adapter(llama, None)
    for adapter in loaded:
        llama_cpp.llama_adapter_lora_free(adapter)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def assert_parity(llama: Llama, adapter: Any, model: PeftModel, prompts: tuple[str, ...]) -> None:
    late = []
    for text in prompts:
        tokens = prompt_tokens(llama, text)
        set_adapter(llama, None)
        base_ids, base_logits = llama_greedy(llama, tokens)
        set_adapter(llama, adapter)
        lora_ids, lora_logits = llama_greedy(llama, tokens)
        peft_ids, peft_logits = peft_greedy(model, tokens, llama.token_eos())

        assert lora_ids != base_ids, f"the adapter does not change the answer to {text!r}"
        # The logits at the first generated position: llama.cpp with the adapter lies far
        # closer to PEFT than the adapter moves them (measured: ~1% of the effect). An
        # unpermuted q/k lora_b or an ignored alpha_pattern measured 50-100%.
        error = np.abs(lora_logits - peft_logits).max()
        effect = np.abs(lora_logits - base_logits).max()
        assert error < 0.1 * effect, f"{text!r}: logit error {error:.3f}, adapter effect {effect:.3f}"

        diverged = first_divergence(lora_ids, peft_ids)
        if diverged is not None:
            late.append((text, diverged, lora_ids, peft_ids))
    # llama.cpp runs the base in f16 and PEFT in float32; in a 135M model that is
    # enough to flip a near-tie late in a continuation. Allow it on one prompt, and
    # only after the 8th token; anything earlier is a conversion bug.
    assert len(late) <= 1 and all(i >= 8 for _, i, _, _ in late), f"token mismatch: {late}"


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    reader = gguf.GGUFReader(path)
    kv = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return kv, tensors


def test_converted_adapter_matches_peft(tmp_path: Path, llama: Llama, load_adapter: Any) -> None:
    model = make_adapter(tmp_path / "adapter")
    out = tmp_path / "out" / "adapter.gguf"
    convert_lora_to_gguf(tmp_path / "adapter", HF_DIR, out)

    kv, tensors = read_gguf(out)
    assert kv["general.architecture"] == "llama"
    assert kv["general.type"] == "adapter"
    assert kv["adapter.type"] == "lora"
    assert kv["adapter.lora.alpha"] == 16.0
    # 30 layers x 7 linear modules (q k v o gate up down), an A and a B each
    assert len(tensors) == 30 * 7 * 2
    q_a, q_b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    assert list(q_a.shape) == [576, 8] and list(q_b.shape) == [8, 576]  # GGML order: ne0 first
    assert q_a.tensor_type == gguf.GGMLQuantizationType.F32
    assert list(tensors["blk.29.ffn_down.weight.lora_a"].shape) == [1536, 8]
    assert [p.name for p in out.parent.iterdir()] == ["adapter.gguf"]

    assert_parity(llama, load_adapter(out), model, PROMPTS)


def test_rslora_scale(tmp_path: Path, llama: Llama, load_adapter: Any) -> None:
    # PEFT scales rsLoRA by alpha/sqrt(r), llama.cpp by alpha/r: alpha must become alpha*sqrt(r).
    model = make_adapter(tmp_path / "adapter", seed=1, use_rslora=True)
    out = tmp_path / "rslora.gguf"
    convert_lora_to_gguf(tmp_path / "adapter", HF_DIR, out)

    kv, _ = read_gguf(out)
    assert kv["adapter.lora.alpha"] == pytest.approx(16 * math.sqrt(8))
    assert_parity(llama, load_adapter(out), model, PROMPTS[:1])


def test_rank_and_alpha_patterns(tmp_path: Path, llama: Llama, load_adapter: Any) -> None:
    # Per-module rank and alpha: llama.cpp reads each rank from its tensor and has one
    # alpha, so the converter folds the other modules' scale into their lora_b.
    model = make_adapter(
        tmp_path / "adapter", seed=2, rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 48}
    )
    out = tmp_path / "patterns.gguf"
    convert_lora_to_gguf(tmp_path / "adapter", HF_DIR, out)

    _, tensors = read_gguf(out)
    assert list(tensors["blk.3.attn_q.weight.lora_b"].shape) == [4, 576]
    assert_parity(llama, load_adapter(out), model, PROMPTS[1:2])


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "adapter"
    make_adapter(path, target_modules=["q_proj", "v_proj"])
    return path


def copy_adapter(
    src: Path, dest: Path, config: dict[str, Any] | None = None, rename: dict[str, str] | None = None
) -> Path:
    dest.mkdir()
    raw = json.loads((src / "adapter_config.json").read_text())
    (dest / "adapter_config.json").write_text(json.dumps({**raw, **(config or {})}))
    weights = load_file(src / "adapter_model.safetensors")
    for old, new in (rename or {}).items():
        weights[new] = weights.pop(old)
    save_file(weights, dest / "adapter_model.safetensors")
    return dest


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _missing_config(good: Path, tmp: Path) -> Path:
    path = copy_adapter(good, tmp / "bad")
    (path / "adapter_config.json").unlink()
    return path


def _not_lora(good: Path, tmp: Path) -> Path:
    return copy_adapter(good, tmp / "bad", config={"peft_type": "IA3"})


def _dora(good: Path, tmp: Path) -> Path:
    make_adapter(tmp / "bad", target_modules=["q_proj"], use_dora=True)
    return tmp / "bad"


def _dora_tensors_only(good: Path, tmp: Path) -> Path:
    # A DoRA checkpoint whose config lies: the tensor check still catches it.
    path = _dora(good, tmp)
    raw = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**raw, "use_dora": False}))
    return path


def _layer_beyond_model(good: Path, tmp: Path) -> Path:
    return copy_adapter(good, tmp / "bad", rename={
        f"{Q0}.lora_A.weight": Q0.replace("layers.0.", "layers.99.") + ".lora_A.weight",
        f"{Q0}.lora_B.weight": Q0.replace("layers.0.", "layers.99.") + ".lora_B.weight",
    })


def _unknown_key(good: Path, tmp: Path) -> Path:
    return copy_adapter(good, tmp / "bad", rename={f"{Q0}.lora_A.weight": f"{Q0}.lora_A.default.weight"})


def _embedding_lora(good: Path, tmp: Path) -> Path:
    return copy_adapter(good, tmp / "bad", rename={
        f"{Q0}.lora_A.weight": "base_model.model.model.embed_tokens.lora_embedding_A",
    })


def _modules_to_save(good: Path, tmp: Path) -> Path:
    return copy_adapter(good, tmp / "bad", config={"modules_to_save": ["lm_head"]})


def _tied_lm_head(good: Path, tmp: Path) -> Path:
    return copy_adapter(good, tmp / "bad", rename={
        f"{Q0}.lora_A.weight": "base_model.model.lm_head.lora_A.weight",
        f"{Q0}.lora_B.weight": "base_model.model.lm_head.lora_B.weight",
    })


def _wrong_shape(good: Path, tmp: Path) -> Path:
    path = copy_adapter(good, tmp / "bad")
    weights = load_file(path / "adapter_model.safetensors")
    weights[f"{Q0}.lora_A.weight"] = weights[f"{Q0}.lora_A.weight"][:, :512].contiguous()
    save_file(weights, path / "adapter_model.safetensors")
    return path


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (_missing_config, "adapter_config.json does not exist"),
        (_not_lora, "peft_type is 'IA3'; only 'LORA'"),
        (_dora, "DoRA (use_dora)"),
        (_dora_tensors_only, "DoRA adapters are not supported"),
        (_layer_beyond_model, "adapter module 'model.layers.99.self_attn.q_proj' has no llama.cpp counterpart"),
        (_unknown_key, "unknown adapter tensor"),
        (_embedding_lora, "embedding LoRA is not supported"),
        (_modules_to_save, "modules_to_save stores fully trained copies"),
        (_tied_lm_head, "ties it to the embeddings"),
        (_wrong_shape, "is 576x512 but the base weight is 576x576"),
    ],
)
def test_bad_adapters_are_refused(good_adapter: Path, tmp_path: Path, make_bad: Any, message: str) -> None:
    adapter = make_bad(good_adapter, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(AdapterConversionError) as raised:
        convert_lora_to_gguf(adapter, HF_DIR, out_dir / "adapter.gguf")
    assert message in str(raised.value)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(good_adapter: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    # GPU-trained adapters are usually saved in bf16, which numpy cannot read directly.
    adapter = copy_adapter(good_adapter, tmp_path / "half")
    weights = {k: v.to(dtype) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    save_file(weights, adapter / "adapter_model.safetensors")
    out = tmp_path / "half.gguf"
    convert_lora_to_gguf(adapter, HF_DIR, out)

    _, tensors = read_gguf(out)
    v0 = Q0.replace("q_proj", "v_proj")
    for gguf_name, key in [
        ("blk.0.attn_q.weight.lora_a", f"{Q0}.lora_A.weight"),  # lora_a is never permuted
        ("blk.0.attn_v.weight.lora_b", f"{v0}.lora_B.weight"),
    ]:
        assert tensors[gguf_name].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(tensors[gguf_name].data, weights[key].float().numpy())


def test_failed_write_leaves_nothing(good_adapter: Path, tmp_path: Path) -> None:
    # The final rename fails (a directory is in the way) after the GGUF was written.
    out = tmp_path / "adapter.gguf"
    (out / "busy").mkdir(parents=True)
    with pytest.raises(AdapterConversionError, match="cannot write"):
        convert_lora_to_gguf(good_adapter, HF_DIR, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.gguf"]
    assert [p.name for p in out.iterdir()] == ["busy"]


def test_unsupported_base_architecture(good_adapter: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    config = json.loads((HF_DIR / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(AdapterConversionError, match="'GPT2LMHeadModel' is not supported"):
        convert_lora_to_gguf(good_adapter, base, tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()
