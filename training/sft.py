"""Supervised fine-tuning: chat, alpaca and text lines, replay mixed in, HF Trainer with eval perplexity."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel

from training import data as D
from training.arguments import training_arguments
from training.config import TrainConfig
from training.method import BuiltTrainer
from training.model import build_model

logger = logging.getLogger("tuneserve.train")


class SftDataSummary(BaseModel):
    train_examples: int  # task examples, replay not counted
    replay_examples: int
    replay_pool: int
    eval_examples: int
    train_sequences: int  # after packing
    truncated: int
    truncated_examples: list[str]
    tokens: int
    trainable_tokens: int
    max_length: int
    packing: bool
    assistant_only_loss: bool


@dataclass
class Prepared:
    """Validated, tokenized data ready for a Trainer."""

    train: D.EncodedDataset
    eval: D.EncodedDataset | None
    stats: SftDataSummary
    files: list[Path] = field(default_factory=list)


def mix_replay(task: list[Any], replay: list[Any], ratio: float, seed: int) -> list[Any]:
    """Add replay examples so they make up `ratio` of the mix (drawn again if there are too few)."""
    if not replay or ratio <= 0:
        return task
    wanted = round(len(task) * ratio / (1 - ratio))
    if wanted > len(replay):
        # Measured on the tiny model: a 20-text pool drawn 5x per epoch for 2 epochs is
        # memorized (its perplexity fell 41 -> 1.8) and general perplexity rose 140%.
        logger.warning(
            "replay.ratio=%.2f needs %d replay examples but replay.path has %d: each repeats about %.1f "
            "times per epoch; a small pool is memorized and raises perplexity on other text "
            "(give at least %d texts or lower replay.ratio)",
            ratio, wanted, len(replay), wanted / len(replay), wanted,
        )
    rng = random.Random(seed + 1)
    picked = rng.sample(replay, wanted) if wanted <= len(replay) else [rng.choice(replay) for _ in range(wanted)]
    return task + picked


def prepare_sft_data(config: TrainConfig, tokenizer: Any) -> Prepared:
    """Validate every file and every example, then tokenize; one DataError lists all problems."""
    cfg = config.data
    problems: list[str] = []

    def load(paths: Sequence[Path]) -> list[Any]:
        # Lines that parse are still tokenized, so one report lists every problem.
        examples, found = D.collect_examples(paths)
        problems.extend(found)
        return examples

    def encode(examples: Sequence[Any]) -> tuple[list[D.Encoded], D.DataStats]:
        try:
            return D.encode_all(tokenizer, examples, cfg.max_length, cfg.assistant_only_loss)
        except D.DataError as exc:
            problems.extend(exc.problems)
            return [], D.DataStats()

    train_examples = load(cfg.train)
    eval_examples = load(cfg.eval)
    replay_examples = load([config.replay.path]) if config.replay.path else []
    train, train_stats = encode(train_examples)
    evaluation, eval_stats = encode(eval_examples)
    replay, replay_stats = encode(replay_examples)
    if problems:
        raise D.DataError(problems)
    if not cfg.eval:
        train, evaluation = D.split_eval(train, cfg.eval_ratio, config.optim.seed)
    task_examples = len(train)
    train = mix_replay(train, replay, config.replay.ratio, config.optim.seed)
    sequences = D.pack(train, cfg.max_length) if config.packing_on() else train
    files = [*cfg.train, *cfg.eval, *([config.replay.path] if config.replay.path else [])]
    stats = SftDataSummary(
        train_examples=task_examples,
        replay_examples=len(train) - task_examples,
        replay_pool=len(replay),
        eval_examples=len(evaluation),
        train_sequences=len(sequences),
        truncated=train_stats.truncated + eval_stats.truncated + replay_stats.truncated,
        truncated_examples=(train_stats.truncated_where + eval_stats.truncated_where + replay_stats.truncated_where)[:20],
        tokens=train_stats.tokens + replay_stats.tokens,
        trainable_tokens=train_stats.trainable_tokens + replay_stats.trainable_tokens,
        max_length=cfg.max_length,
        packing=config.packing_on(),
        assistant_only_loss=cfg.assistant_only_loss,
    )
    return Prepared(
        D.EncodedDataset(sequences), D.EncodedDataset(evaluation) if evaluation else None, stats, files
    )


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def perplexity_trainer_class() -> Any:
    from transformers import Trainer

    class PerplexityTrainer(Trainer):
        """Adds eval_perplexity = exp(eval_loss) to every eval log (TensorBoard included)."""

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "eval_loss" in logs:
                logs["eval_perplexity"] = _perplexity(logs["eval_loss"])
            super().log(logs, *args, **kwargs)

    return PerplexityTrainer


def sft_trainer(model: Any, args: Any, prepared: Prepared, tokenizer: Any) -> Any:
    """The Trainer of token-level training on prepared SFT data (sft, and galore's full model)."""
    return perplexity_trainer_class()(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=D.PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )


def build_sft_trainer(config: TrainConfig, base: str, tokenizer: Any) -> BuiltTrainer:
    prepared = prepare_sft_data(config, tokenizer)
    model = build_model(config, base)
    trainer = sft_trainer(model, training_arguments(config, prepared.eval is not None), prepared, tokenizer)
    return BuiltTrainer(trainer, prepared.stats, prepared.files)
