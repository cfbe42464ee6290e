"""The Trainer arguments every method shares, from one TrainConfig."""

from __future__ import annotations

from typing import Any

from training.config import TrainConfig
from training.rundir import CHECKPOINT_DIR, run_dir
from tuneserve.errors import ConfigError

# bitsandbytes' paged optimizers -> what does the same unpaged, for a CPU host.
UNPAGED = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_torch", "paged_lion_8bit": "lion_8bit"}


def check_optimizer_host(config: TrainConfig) -> None:
    """Refuse, before anything loads, an optimizer that needs CUDA on a host without it."""
    import torch

    if torch.cuda.is_available():
        return
    name = config.optim.optimizer
    if name in UNPAGED:
        # On CPU bitsandbytes would only warn and run the unpaged optimizer under the paged name.
        raise ConfigError(
            f"optim.optimizer: {name} is a paged optimizer, which needs CUDA (it pages optimizer states "
            f"out of GPU memory) and torch sees no CUDA device here; on CPU use {UNPAGED[name]}"
        )
    if config.method == "galore" and config.galore.optimizer == "adamw_8bit":
        # galore-torch 1.0's GaLoreAdamW8bit calls torch.cuda.synchronize() in every step.
        raise ConfigError(
            "galore.optimizer: adamw_8bit (galore_adamw_8bit) needs CUDA and torch sees no CUDA device "
            "here; on CPU use adamw or adafactor"
        )


def training_arguments(config: TrainConfig, has_eval: bool, args_class: type[Any] | None = None, **extra: Any) -> Any:
    """`args_class` is a TrainingArguments subclass (TRL's DPOConfig); `extra` its own fields."""
    import torch
    from transformers import TrainingArguments

    optim, run = config.optim, config.run
    early = run.early_stopping_patience is not None
    if early and not has_eval:
        raise ConfigError("run.early_stopping_patience: early stopping needs eval data (data.eval or data.eval_ratio > 0)")
    cls = args_class or TrainingArguments
    extra.setdefault("optim", optim.optimizer)  # galore passes its own
    return cls(
        output_dir=str(run_dir(config) / CHECKPOINT_DIR),
        per_device_train_batch_size=optim.batch_size,
        per_device_eval_batch_size=optim.batch_size,
        gradient_accumulation_steps=optim.grad_accum,
        learning_rate=optim.learning_rate,
        lr_scheduler_type=optim.scheduler if optim.scheduler != "constant" else "constant_with_warmup",
        warmup_steps=optim.warmup_ratio,  # a float < 1 is a share of the steps
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        num_train_epochs=optim.epochs,
        max_steps=optim.max_steps,
        seed=optim.seed,
        data_seed=optim.seed,
        logging_steps=run.logging_steps,
        save_strategy="steps",
        save_steps=run.save_steps,
        save_total_limit=run.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=run.eval_steps,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        report_to="none",  # TensorBoard is added as a callback with our own log dir
        disable_tqdm=not run.progress_bar,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        **extra,
    )
