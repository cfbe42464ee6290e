"""DPO on prompt/chosen/rejected JSONL with TRL's DPOTrainer, starting from an SFT adapter.

The SFT adapter is loaded as "default", which trains; TRL copies it to a frozen
"ref" adapter, the reference policy. Only "default" is saved.

Lines: see training/preference.py (shared with ORPO).
"""

from __future__ import annotations

from typing import Any

from training.arguments import training_arguments
from training.config import TrainConfig
from training.method import BuiltTrainer
from training.model import build_model
from training.preference import load_preference_rows


def build_dpo_trainer(config: TrainConfig, base: str, tokenizer: Any) -> BuiltTrainer:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = load_preference_rows(config, tokenizer)
    model = build_model(config, base)
    args = training_arguments(
        config,
        bool(rows.eval),
        args_class=DPOConfig,
        beta=config.dpo.beta,
        max_length=config.data.max_length,
        gradient_checkpointing=False,  # set on the model already (training.model.load_base)
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(rows.train),
        eval_dataset=Dataset.from_list(rows.eval) if rows.eval else None,
        processing_class=tokenizer,
    )
    return BuiltTrainer(trainer, rows.summary, rows.files)
