"""Continued pre-training: a LoRA adapter on raw `{"text"}` lines of a domain, loss on every token.

Only text lines are taken (a chat or alpaca line is an error: that is SFT data).
Each text ends with the end-of-sequence token; with packing (cpt's default) the
texts are concatenated into one stream cut into max_length sequences, so nothing
is padded and nothing is dropped. Without packing a text longer than max_length is
cut into several sequences; it is never truncated. After training, the report gets
the base's and the adapter's perplexity on the held-out texts.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import BaseModel

from training import data as D
from training.arguments import training_arguments
from training.config import TrainConfig
from training.evaluate import perplexity
from training.method import BuiltTrainer
from training.model import build_model
from training.report import HeldOutPerplexity
from training.sft import mix_replay, perplexity_trainer_class

logger = logging.getLogger("tuneserve.train")


class CptDataSummary(BaseModel):
    train_texts: int  # replay not counted
    replay_texts: int
    replay_pool: int
    eval_texts: int
    train_sequences: int
    long_texts: int  # longer than max_length: cut across sequences, not truncated
    truncated: int  # always 0; the run's DataSummary
    truncated_examples: list[str]
    tokens: int  # every one trained
    max_length: int
    packing: bool


def load_texts(paths: Sequence[Path], problems: list[str]) -> list[D.Text]:
    """The text lines of `paths`; every other line adds a file:line problem."""
    examples, found = D.collect_examples(paths)
    problems += found
    texts = []
    for example in examples:
        if isinstance(example, D.Text):
            texts.append(example)
        else:
            problems.append(
                f'{example.where}: (line): method cpt takes {{"text"}} lines only, this is a chat/alpaca '
                "example (train those with method sft)"
            )
    return texts


def _encode(tokenizer: Any, texts: Sequence[D.Text]) -> list[D.Encoded]:
    # Whole: long texts are cut into sequences below, not truncated.
    return D.encode_all(tokenizer, texts, sys.maxsize, assistant_only=False)[0]


def cut_sequences(items: Sequence[D.Encoded], max_length: int, packing: bool) -> list[D.Encoded]:
    """max_length sequences: of one stream of every item (packing), or of each item alone."""
    if packing:
        items = [D.Encoded("packed", [t for i in items for t in i.input_ids], [t for i in items for t in i.labels], False)]
    out = []
    for item in items:
        for start in range(0, len(item.input_ids), max_length):
            ids = item.input_ids[start : start + max_length]
            if len(ids) > 1:  # one token predicts nothing
                out.append(D.Encoded(item.where, ids, item.labels[start : start + max_length], False))
    return out


def _held_out(tokenizer: Any, texts: list[str], max_length: int) -> Callable[[Any], HeldOutPerplexity]:
    def measure(model: Any) -> HeldOutPerplexity:
        model.eval()
        adapter = perplexity(model, tokenizer, texts, max_length)
        with model.disable_adapter():  # the base the adapter trained on (4-bit under QLoRA)
            base = perplexity(model, tokenizer, texts, max_length)
        return HeldOutPerplexity(texts=len(texts), base=base, adapter=adapter, change_pct=100 * (adapter / base - 1))

    return measure


def build_cpt_trainer(config: TrainConfig, base: str, tokenizer: Any) -> BuiltTrainer:
    cfg = config.data
    problems: list[str] = []
    train = load_texts(cfg.train, problems)
    held = load_texts(cfg.eval, problems)
    replay = load_texts([config.replay.path], problems) if config.replay.path else []
    if problems:
        raise D.DataError(problems)
    if not cfg.eval:  # the texts themselves, held out before encoding: perplexity needs them
        train, held = D.split_eval(train, cfg.eval_ratio, config.optim.seed)
    encoded = _encode(tokenizer, train)
    mixed = mix_replay(encoded, _encode(tokenizer, replay), config.replay.ratio, config.optim.seed)
    packing = config.packing_on()
    sequences = cut_sequences(mixed, cfg.max_length, packing)
    evaluation = cut_sequences(_encode(tokenizer, held), cfg.max_length, packing=False)
    stats = CptDataSummary(
        train_texts=len(train),
        replay_texts=len(mixed) - len(encoded),
        replay_pool=len(replay),
        eval_texts=len(held),
        train_sequences=len(sequences),
        long_texts=sum(len(i.input_ids) > cfg.max_length for i in mixed),
        truncated=0,
        truncated_examples=[],
        tokens=sum(len(i.input_ids) for i in mixed),
        max_length=cfg.max_length,
        packing=packing,
    )
    if not held:
        logger.warning("no held-out text (data.eval empty, data.eval_ratio 0): the report gets no held_out_perplexity")

    model = build_model(config, base)
    trainer = perplexity_trainer_class()(
        model=model,
        args=training_arguments(config, bool(evaluation)),
        train_dataset=D.EncodedDataset(sequences),
        eval_dataset=D.EncodedDataset(evaluation) if evaluation else None,
        data_collator=D.PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    files = [*cfg.train, *cfg.eval, *([config.replay.path] if config.replay.path else [])]
    measure = _held_out(tokenizer, [t.text for t in held], cfg.max_length) if held else None
    return BuiltTrainer(trainer, stats, files, held_out_perplexity=measure)
