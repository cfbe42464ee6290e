"""Preference data for DPO and ORPO: prompt/chosen/rejected lines, validated and rendered as TRL rows.

Lines: {"prompt": str | [messages ending with a user or tool turn], "chosen": str |
assistant message, "rejected": str | assistant message, "tools": [...]} (tools optional;
the prompt may hold calls and tool results, an answer may be `tool_calls`; all rendered
through the same tool format as SFT, eval and serving).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from training import data as D
from training.config import TrainConfig


class PreferenceDataSummary(BaseModel):
    train_examples: int
    eval_examples: int
    truncated: int
    truncated_examples: list[str]
    max_length: int


@dataclass(frozen=True)
class PreferenceRows:
    """TRL's conversational preference rows: "prompt" (messages), "chosen" and "rejected"
    (one assistant turn each), "tools" (JSON text) where the template renders tools itself."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    summary: PreferenceDataSummary
    files: list[Path]


def load_preference_rows(config: TrainConfig, tokenizer: Any) -> PreferenceRows:
    """Validate and render every line of data.train and data.eval; one DataError lists all problems."""
    cfg = config.data
    problems: list[str] = []
    examples: dict[str, list[D.Preference]] = {}
    for split, paths in (("train", cfg.train), ("eval", cfg.eval)):
        examples[split], found = D.collect_examples(paths, preference=True)
        problems += found
    train_rows, train_cut, p1 = _rows(tokenizer, examples["train"], cfg.max_length)
    eval_rows, eval_cut, p2 = _rows(tokenizer, examples["eval"], cfg.max_length)
    problems += p1 + p2
    if problems:
        raise D.DataError(problems)
    if not cfg.eval:
        train_rows, eval_rows = D.split_eval(train_rows, cfg.eval_ratio, config.optim.seed)
    summary = PreferenceDataSummary(
        train_examples=len(train_rows),
        eval_examples=len(eval_rows),
        truncated=train_cut + eval_cut,
        truncated_examples=[],
        max_length=cfg.max_length,
    )
    return PreferenceRows(train_rows, eval_rows, summary, [*cfg.train, *cfg.eval])


def _rows(tokenizer: Any, examples: list[D.Preference], max_length: int) -> tuple[list[dict[str, Any]], int, list[str]]:
    rows, truncated, problems = [], 0, []
    for ex in examples:
        chat = D.render_chat(tokenizer, ex.prompt, ex.tools)
        prompt_len = len(tokenizer(D.prompt_text(tokenizer, ex.prompt, ex.tools), add_special_tokens=False)["input_ids"])
        if prompt_len >= max_length:
            problems.append(f"{ex.where}: prompt: no trainable tokens within data.max_length={max_length} (the prompt alone has {prompt_len})")
            continue
        # Each answer as the format writes it: for the compact one a call becomes its JSON text.
        answers = [D.render_chat(tokenizer, [*ex.prompt, a], ex.tools).messages[-1] for a in (ex.chosen, ex.rejected)]
        longest = max(len(tokenizer(_answer_text(tokenizer, a), add_special_tokens=False)["input_ids"]) for a in answers)
        truncated += prompt_len + longest + 2 > max_length  # +2: end-of-turn tokens
        row: dict[str, Any] = {"prompt": chat.messages, "chosen": answers[:1], "rejected": answers[1:]}
        if chat.tools:  # a template that renders tools itself; TRL passes a row's tools on
            row["tools"] = json.dumps(chat.tools, ensure_ascii=False)  # one Arrow type for every schema
        rows.append(row)
    return rows, truncated, problems


def _answer_text(tokenizer: Any, turn: dict[str, Any]) -> str:
    calls = turn.get("tool_calls")
    if not calls:
        return turn.get("content") or ""
    # A template that writes calls itself (Hermes) gets them as mappings; count their JSON.
    return (turn.get("content") or "") + json.dumps([c.get("function", c) for c in calls], ensure_ascii=False)
