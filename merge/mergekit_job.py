"""Run a validated mergekit config into a staged output dir.

Memory stays bounded the way mergekit bounds it: tensors are read lazily from the
inputs' safetensors (`lazy_unpickle`), merged one at a time, and written in shards of
at most `out_shard_size` bytes, so peak RSS is about one shard plus the tensors being
merged, not the sum of the models.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tuneserve.fsutil import require_free_space, staged_dir
from tuneserve.jobs.runner import JobContext

DEFAULT_SHARD_SIZE = "1B"
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def weights_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) or sum(
        f.stat().st_size for f in model_dir.glob("*.bin")
    )


def estimate_output_bytes(config: Any) -> int:
    """Largest local input's weights, rescaled to the output dtype if one is set."""
    sizes = []
    for ref in config.referenced_models():
        path = Path(ref.model.path).expanduser()
        if path.is_dir():
            sizes.append(weights_bytes(path))
    size = max(sizes, default=0)
    dtype = config.out_dtype or config.dtype
    if dtype in _DTYPE_BYTES and size:
        # The inputs' dtype is unknown here; assume float32 inputs (the worst case).
        size = max(size * _DTYPE_BYTES[dtype] // 4, size // 2)
    return size


def run_mergekit(
    config: Any,
    config_text: str,
    out: Path,
    ctx: JobContext,
    lora_cache: Path,
    shard_size: str = DEFAULT_SHARD_SIZE,
) -> list[str]:
    from mergekit.common import parse_kmb
    from mergekit.merge import MergeOptions, run_merge

    out_bytes = estimate_output_bytes(config)
    lora_refs = [r for r in config.referenced_models() if r.lora is not None]
    # Each base+adapter reference is first written as a full model to the LoRA cache.
    require_free_space(out.parent, int(out_bytes * 1.1), "the merged model")
    if lora_refs:
        lora_cache.mkdir(parents=True, exist_ok=True)
        require_free_space(lora_cache, int(out_bytes * 1.1) * len(lora_refs), "merging adapters into their bases")
    options = MergeOptions(
        lora_merge_cache=str(lora_cache),
        lazy_unpickle=True,
        out_shard_size=parse_kmb(shard_size),
        copy_tokenizer=True,
        safe_serialization=True,
        quiet=not sys.stderr.isatty(),
    )
    ctx.progress(0.05, f"merging {len(config.referenced_models())} models ({config.merge_method})")
    with staged_dir(out) as stage:
        ctx.staging(stage)
        run_merge(config, str(stage), options=options, config_source=config_text)
        if not (stage / "config.json").is_file():
            raise RuntimeError("mergekit finished without writing config.json")
        ctx.progress(0.95, "publishing")
    ctx.add_report(output_bytes=weights_bytes(out), merge_method=config.merge_method)
    return [str(out)]
