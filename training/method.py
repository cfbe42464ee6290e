"""What a training method's module hands the run: a ready Trainer and what it made of the data.

A method is one module with a `Builder` and one entry in `training.run.METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from training.config import TrainConfig
from training.report import HeldOutPerplexity


class DataSummary(Protocol):
    """A method's data counts (a pydantic model, written into the report as they are).

    Each method declares its own fields; the run reads only the truncation ones."""

    truncated: int
    truncated_examples: list[str]

    def model_dump(self, *, mode: str = ..., exclude: set[str] | None = ...) -> dict[str, Any]: ...


@dataclass(frozen=True)
class BuiltTrainer:
    trainer: Any  # a transformers.Trainer; typed loosely so importing this needs no torch
    data: DataSummary
    files: list[Path]  # every data file read, for the report's hash
    # After a completed run, on the trained model (cpt): the report's held_out_perplexity.
    held_out_perplexity: Callable[[Any], HeldOutPerplexity] | None = None
    # A full-parameter method (galore): the run writes the whole model to model/, not adapter/.
    full_model: bool = False


# (config, resolved base model, tokenizer) -> trainer. The data is validated before
# the model loads: a typo on line 900 must not wait for it.
Builder = Callable[[TrainConfig, str, Any], BuiltTrainer]
