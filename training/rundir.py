"""The run dir (`output_dir`) of a training job, and whether a run may use it.

    adapter/               the PEFT adapter (adapter_config.json, adapter_model.safetensors)
    model/                 instead of adapter/ for full-parameter methods (galore): a whole HF model dir
    checkpoints/           checkpoint-<step>/ for --resume (optimizer, scheduler, RNG, data position)
    tensorboard/           TensorBoard event files
    training_report.json   config, data hash, base, steps, curves, perplexity, speed, memory
"""

from __future__ import annotations

from pathlib import Path

from training.config import TrainConfig
from tuneserve.errors import ConfigError

REPORT_FILE = "training_report.json"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"


def run_dir(config: TrainConfig) -> Path:
    return Path(config.output_dir or ".")


def check_output_dir(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuse to mix runs."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = run_dir(config) / CHECKPOINT_DIR
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if config.resume:
        if last is None:
            raise ConfigError(f"resume: no checkpoint in {checkpoints} to resume from")
        return Path(last)
    if last is not None:
        raise ConfigError(
            f"output_dir: {config.output_dir} holds checkpoints of an earlier run; pass --resume "
            "to continue it or choose another output_dir"
        )
    return None
