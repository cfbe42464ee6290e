"""Build the model to train: the base (4-bit NF4 for QLoRA, or full precision) plus PEFT LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.config import LoraConfig, QuantizationConfig, TrainConfig
from tuneserve.adapters.peft_format import is_adapter_dir
from tuneserve.config import Settings
from tuneserve.errors import ConfigError


def resolve_base(base_model: str | None, settings: Settings) -> str:
    """A local dir becomes an absolute path: adapter_config.json records it, and the
    adapter registry accepts the served model's path only when it matches."""
    base = base_model or str(settings.resolved_hf_path())
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"base_model: {path} is not an HF model dir (no config.json)")
        return str(path.resolve())
    if base_model is None:
        raise ConfigError(
            f"base_model: the prepared model {path} does not exist; run `tuneserve models prepare` "
            "or set base_model"
        )
    if base.startswith(("/", ".", "~")) or base.count("/") != 1:
        raise ConfigError(f"base_model: {base} is neither an existing dir nor a hub id (owner/name)")
    return base  # a hub id, for users with network


def load_tokenizer(base: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.chat_template is None:
        raise ConfigError(f"base_model: {base} has no chat template; chat and alpaca data need one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(base: str, quant: QuantizationConfig, gradient_checkpointing: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not quant.enabled:
        # float32: the tiny model's answers degrade in bf16, and CPUs without bf16
        # units run float32 faster anyway.
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        from peft import prepare_model_for_kbit_training

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            base, quantization_config=bnb, dtype=torch.float32, device_map={"": device}
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def peft_config(lora: LoraConfig) -> Any:
    import peft

    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT annotates int but scales by any number
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_model(config: TrainConfig, base: str) -> Any:
    """The base with a fresh LoRA adapter, or the method's `sft_adapter` made trainable."""
    from peft import PeftModel, get_peft_model

    model = load_base(base, config.quantization, config.optim.gradient_checkpointing)
    start = start_adapter(config)
    if start is not None:
        key, sft = start
        if not is_adapter_dir(sft):
            raise ConfigError(f"{key}: {sft} is not a PEFT adapter dir (no adapter_config.json)")
        # For dpo, TRL's DPOTrainer copies this adapter to a frozen "ref" one: the reference policy.
        return PeftModel.from_pretrained(model, str(sft), adapter_name="default", is_trainable=True)
    try:
        return get_peft_model(model, peft_config(config.lora))
    except ValueError as exc:  # e.g. target modules not found in the base
        raise ConfigError(f"lora.target_modules: {exc}") from exc


def start_adapter(config: TrainConfig) -> tuple[str, Path] | None:
    """(key, dir) of the adapter the method continues: its section's `sft_adapter`
    (dpo.sft_adapter, required; orpo.sft_adapter, optional), or None for a fresh one."""
    section = getattr(config, config.method, None)
    path = getattr(section, "sft_adapter", None)
    return (f"{config.method}.sft_adapter", Path(path)) if path is not None else None
