"""Real PEFT LoRA adapters of the prepared default model, for tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

from tests.support.servers import DATA_DIR

HF_DIR = DATA_DIR / "models" / "smollm2-135m-instruct" / "hf"
# lora_B starts at zero (a no-op adapter); this spread makes the adapter change the
# answers within a few tokens while they stay fluent enough to be precision-stable.
LORA_B_STD = 0.1


def make_adapter(out_dir: Path, seed: int = 0, b_std: float = LORA_B_STD, **lora: Any) -> Any:
    """Save a PEFT adapter with random non-zero lora_B to out_dir; return the PeftModel."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # lora_A's kaiming init
    base = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    options: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **lora}
    model = get_peft_model(base, LoraConfig(**options))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_std)
    model.save_pretrained(out_dir)
    return model.eval()


def tar_gz_bytes(adapter_dir: Path, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(adapter_dir, arcname="adapter")
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(f"adapter/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
