"""training_report.json: what a run did, returned to the CLI and written into the run dir.

The keys on disk are documented in the README and read by the benchmarks; the
fields below are in the order they are written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from training.config import TrainConfig
from tuneserve.adapters.registry import AdapterRecord
from tuneserve.fsutil import write_atomic


class LossPoint(BaseModel):
    step: int
    loss: float
    learning_rate: float | None


class EvalPoint(BaseModel):
    step: int
    eval_loss: float
    eval_perplexity: float | None  # None where the method's Trainer does not compute it (DPO)


class RewardPoint(BaseModel):
    """GRPO: the mean reward of one logged step's completions, and each reward function's mean."""

    step: int
    reward: float | None  # the weighted sum (grpo.reward_weights) of the functions that applied
    reward_std: float | None
    rewards: dict[str, float | None]  # by function name: those that applied to a completion of the step


class HeldOutPerplexity(BaseModel):
    """Token-weighted perplexity on held-out text of the training domain (data.eval, or the
    data.eval_ratio split), of the base (the adapter disabled) and of the adapter."""

    texts: int
    base: float
    adapter: float
    change_pct: float  # adapter against base; negative: the adapter predicts the domain better


class TrainingReport(BaseModel):
    status: Literal["completed", "interrupted"]
    method: str
    base_model: str
    config: TrainConfig
    # The method's own DataSummary fields, then sha256 and files: methods count different things.
    data: dict[str, Any]
    steps: int
    max_steps: int
    resumed_from: Path | None
    resumed_at_step: int
    epochs: float | None
    loss_curve: list[LossPoint]
    eval_curve: list[EvalPoint]
    reward_curve: list[RewardPoint] = Field(default_factory=list)  # grpo's; empty for methods that do not sample
    eval_loss: float | None
    eval_perplexity: float | None
    held_out_perplexity: HeldOutPerplexity | None = None  # cpt; None for the other methods
    best_checkpoint: str | None
    wall_time_s: float  # of this session: a resumed run's tokens/s are its own
    total_time_s: float
    train_tokens: int
    tokens_per_s: float | None
    peak_rss_bytes: int
    peak_gpu_bytes: int | None
    threads: int
    adapter_dir: Path | None  # None when the method trains the whole model (galore): see model_dir
    model_dir: Path | None = None  # galore: the whole trained model, an HF model dir
    published: AdapterRecord | None = None

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"

    @property
    def final_loss(self) -> float | None:
        return self.loss_curve[-1].loss if self.loss_curve else None

    def write(self, path: Path) -> None:
        """Atomically: a reader never sees half a report."""
        # Not model_dump_json: that writes an infinite perplexity as null, json.dumps as Infinity.
        write_atomic(path, json.dumps(self.model_dump(mode="json"), indent=2, default=str) + "\n")


def loss_curve(log_history: list[dict[str, Any]]) -> list[LossPoint]:
    return [
        LossPoint(step=e["step"], loss=e["loss"], learning_rate=e.get("learning_rate"))
        for e in log_history if "loss" in e
    ]


def eval_curve(log_history: list[dict[str, Any]]) -> list[EvalPoint]:
    return [
        EvalPoint(step=e["step"], eval_loss=e["eval_loss"], eval_perplexity=e.get("eval_perplexity"))
        for e in log_history if "eval_loss" in e
    ]


_REWARD_PREFIX, _REWARD_SUFFIX = "rewards/", "/mean"


def reward_curve(log_history: list[dict[str, Any]]) -> list[RewardPoint]:
    """From TRL's GRPO logs: `reward`, `reward_std` and `rewards/<function>/mean` per logged step."""
    return [
        RewardPoint(
            step=e["step"],
            reward=e["reward"],
            reward_std=e.get("reward_std"),
            rewards={
                k[len(_REWARD_PREFIX) : -len(_REWARD_SUFFIX)]: v
                for k, v in e.items() if k.startswith(_REWARD_PREFIX) and k.endswith(_REWARD_SUFFIX)
            },
        )
        for e in log_history if "reward" in e
    ]
