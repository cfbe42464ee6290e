"""The Trainer arguments every method shares, from one TrainConfig."""

from __future__ import annotations

from typing import Any

from training.config import TrainConfig
from training.rundir import CHECKPOINT_DIR, run_dir
from tuneserve.errors import ConfigError


def training_arguments(config: TrainConfig, has_eval: bool, args_class: type[Any] | None = None, **extra: Any) -> Any:
    """`args_class` is a TrainingArguments subclass (TRL's DPOConfig); `extra` its own fields."""
    import torch
    from transformers import TrainingArguments

    optim, run = config.optim, config.run
    early = run.early_stopping_patience is not None
    if early and not has_eval:
        raise ConfigError("run.early_stopping_patience: early stopping needs eval data (data.eval or data.eval_ratio > 0)")
    cls = args_class or TrainingArguments
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
        optim="adamw_torch",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        **extra,
    )
