"""GaLore: full-parameter SFT whose optimizer keeps low-rank states (Zhao et al. 2024, arXiv:2403.03507).

Every weight of the base trains, in float32, without LoRA or quantization (the lora
and quantization sections do not apply). The gradient of each target linear layer
(galore.target_modules) is projected onto its top galore.rank singular directions,
recomputed every galore.update_proj_gap steps; Adam's moments live in that small
space and the update is projected back at full size. What it saves is the optimizer
state of those layers, not the weights or their gradients.

Same data as sft (chat, alpaca and text lines, replay, eval perplexity). The run
writes a whole HF model dir (model/), served as a base model, not an adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from training.arguments import training_arguments
from training.config import GaloreConfig, QuantizationConfig, TrainConfig
from training.method import BuiltTrainer
from training.model import load_base
from training.sft import prepare_sft_data, sft_trainer
from tuneserve.errors import ConfigError

logger = logging.getLogger("tuneserve.train")


def galore_arguments(galore: GaloreConfig) -> dict[str, Any]:
    """The TrainingArguments that make the HF Trainer build GaLore's optimizer."""
    return {
        "optim": f"galore_{galore.optimizer}",
        "optim_target_modules": galore.target_modules,
        "optim_args": f"rank={galore.rank},update_proj_gap={galore.update_proj_gap},"
        f"scale={galore.scale},proj_type={galore.proj_type}",
    }


def build_galore_trainer(config: TrainConfig, base: str, tokenizer: Any) -> BuiltTrainer:
    return build_full_trainer(config, base, tokenizer, galore_arguments(config.galore))


def build_full_trainer(config: TrainConfig, base: str, tokenizer: Any, optimizer: dict[str, Any]) -> BuiltTrainer:
    """SFT of every weight with the optimizer `optimizer` names (TrainingArguments fields);
    benchmarks/training_memory.py also runs it with plain AdamW."""
    prepared = prepare_sft_data(config, tokenizer)
    model = load_base(base, QuantizationConfig(enabled=False), config.optim.gradient_checkpointing)
    if "optim_target_modules" in optimizer:
        _check_targets(model, optimizer["optim_target_modules"])
    _allow_projectors_in_checkpoints()
    args = training_arguments(config, prepared.eval is not None, **optimizer)
    trainer = sft_trainer(model, args, prepared, tokenizer)
    trainer.add_callback(compact_projections_callback())
    return BuiltTrainer(trainer, prepared.stats, prepared.files, full_model=True)


def _check_targets(model: Any, targets: list[str] | str) -> None:
    """Fail now, not at the first step, when galore.target_modules matches no linear layer."""
    from torch import nn
    from transformers.trainer_utils import check_target_module_exists

    all_linear = isinstance(targets, str) and targets.replace("_", "-") == "all-linear"
    params = dict(model.named_parameters())  # tied weights once
    # The Trainer's own matching (transformers' _setup_low_rank_optimizer).
    projected = [
        name + ".weight" for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (all_linear or check_target_module_exists(targets, name))
        and name + ".weight" in params
    ]
    if not projected:
        raise ConfigError(f"galore.target_modules: {targets!r} matches no linear layer of the base")
    share = sum(params[n].numel() for n in projected) / sum(p.numel() for p in params.values())
    logger.info("galore: %d linear layers (%.0f%% of the weights) train with projected optimizer states",
                len(projected), 100 * share)


def _allow_projectors_in_checkpoints() -> None:
    """GaLore keeps a GaLoreProjector object in each target's optimizer state; the Trainer
    loads a checkpoint's optimizer.pt with weights_only=True, which refuses any class not
    allow-listed, so --resume would fail without this."""
    import torch
    from galore_torch.galore_projector import GaLoreProjector

    torch.serialization.add_safe_globals([GaLoreProjector])


def compact_projections_callback() -> Any:
    from transformers import TrainerCallback

    class CompactProjections(TrainerCallback):
        """galore-torch 1.0 keeps a float32 layer's projection as a slice of the full SVD factor
        (U[:, :rank] or Vh[:rank]), so the whole min(m, n)-square factor stays allocated, as large
        as a full Adam moment of a square layer, and is pickled whole into every checkpoint
        (measured on the tiny model at rank 16: optimizer.pt 461 MB, 260 MB with this). Copying
        the slice out after each step frees the factor."""

        def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            for param_state in getattr(inner, "state", {}).values():
                projector = param_state.get("projector")
                if projector is not None and projector.ortho_matrix is not None:
                    projector.ortho_matrix = _compact(projector.ortho_matrix)

    return CompactProjections()


def _compact(ortho: Any) -> Any:
    if isinstance(ortho, list):  # proj_type full: [left, right]
        return [_compact(t) for t in ortho]
    if ortho.untyped_storage().nbytes() > ortho.numel() * ortho.element_size():
        return ortho.clone()
    return ortho


def save_full_model(trainer: Any, path: Path) -> None:
    """A self-contained HF model dir: weights, config, generation config, tokenizer and chat
    template, loadable as `model.hf_path` and by `tuneserve export`."""
    model = trainer.model
    # Off for training (gradient checkpointing); generation wants the KV cache.
    model.config.use_cache = True
    model.save_pretrained(str(path))
    trainer.processing_class.save_pretrained(str(path))
