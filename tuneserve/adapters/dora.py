"""DoRA adapters (PEFT's `use_dora`): served only merged into their base.

DoRA rescales each adapted weight, `m * (W + s*BA) / ||W + s*BA||`, by a trained
magnitude vector `m` (tensors `...lora_magnitude_vector`). vLLM's LoRA kernels and
llama.cpp's GGUF LoRA only add `s*B(Ax)`, so a DoRA adapter loaded as an adapter would
answer like some other model. Folded into its base by `tuneserve merge` (operation
`merge_adapter`: PEFT's `merge_and_unload`, which applies the magnitude) it is a full
model that every engine serves. Every place that would hand a DoRA adapter to an
engine (training's --publish, the registry, GGUF LoRA export, adapter combination)
refuses it with `merge_advice`, so the way out reads the same everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from tuneserve.adapters.peft_format import PeftFormatError, read_config_json

MAGNITUDE_TENSOR = "lora_magnitude_vector"


def merge_advice(adapter: str = "ADAPTER_DIR", base: str = "BASE_DIR") -> str:
    """What to do with a DoRA adapter; `adapter` and `base` fill in the merge config
    when the caller knows them (never a server path in what a tenant reads)."""
    return (
        "DoRA adapters cannot be served as adapters: merge it into its base with "
        "`tuneserve merge MERGE.yaml --out MERGED_DIR` (MERGE.yaml: `operation: merge_adapter`, "
        f"`base: {base}`, `adapter: {adapter}`) and serve the merged model "
        "(`tuneserve serve --model.hf_path MERGED_DIR`, or its `tuneserve export` GGUF)"
    )


def is_dora_config(raw: Mapping[str, Any]) -> bool:
    # Truthy, as PEFT reads it.
    return bool(raw.get("use_dora"))


def is_dora_tensor(key: str) -> bool:
    return MAGNITUDE_TENSOR in key


def is_dora_adapter(adapter_dir: Path) -> bool:
    """Whether the adapter dir's config says DoRA. False when there is no readable
    config: the caller's own checks say what is wrong with it."""
    try:
        return is_dora_config(read_config_json(Path(adapter_dir)))
    except (PeftFormatError, OSError):
        return False
