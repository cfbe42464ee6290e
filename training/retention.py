"""Factual retention: does an adapter still answer the short factual questions its base
answers right?

A factual file has one question a line (training/datagen/factual.py writes one):
``{"question": str, "answers": [str, ...], "lang": str}`` (``lang`` optional). Each
question is asked as one user turn through the chat template, no tools, greedily. A
reply is right when one of the accepted answers appears as whole words in its first
sentence, both normalized (Unicode NFKC, case folded, punctuation to spaces): a short
answer comes wrapped in a sentence ("The capital of Japan is Tokyo."), and what follows
is where a small model wanders off ("... is 1. A square has four sides.").

`factual_retained`: of the questions the base answers right, the share an adapter also
answers right. A question the base misses says nothing about forgetting, so it is left
out rather than counted either way.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from training import data as D

MAX_NEW_TOKENS = 24  # a short answer's first line fits; more is time spent on rambling


@dataclass(frozen=True)
class FactualQuestion:
    where: str  # file:line
    question: str
    answers: tuple[str, ...]
    lang: str | None = None


def load_questions(path: Path) -> list[FactualQuestion]:
    """Every line checked; problems reported together as file:line: field: what is wrong."""
    questions, problems = [], []
    for where, obj in D.read_jsonl(path):
        try:
            questions.append(_question(obj, where))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    if not questions and not problems:
        problems.append(f"{path}: no questions (the file is empty)")
    if problems:
        raise D.DataError(problems)
    return questions


def _question(obj: Any, where: str) -> FactualQuestion:
    if isinstance(obj, Exception):  # read_jsonl's bad-JSON problem
        raise ValueError(str(obj))
    if not isinstance(obj, dict):
        raise ValueError("(line): must be a JSON object")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question: must be a non-empty string")
    answers = obj.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and normalize(a) for a in answers):
        raise ValueError("answers: must be a non-empty list of non-empty strings")
    lang = obj.get("lang")
    if lang is not None and not (isinstance(lang, str) and lang.strip()):
        raise ValueError("lang: must be a non-empty string")
    return FactualQuestion(where, question, tuple(answers), lang)


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).casefold()).split())


def first_sentence(reply: str) -> str:
    """Up to the first . ! or ? before a space, within the first non-empty line ("1.5" stays whole)."""
    line = next((line for line in reply.splitlines() if line.strip()), "")
    return re.split(r"(?<=[.!?])\s", line.strip(), maxsplit=1)[0]


def is_right(reply: str, answers: Sequence[str]) -> bool:
    sentence = f" {normalize(first_sentence(reply))} "
    return any(f" {normalize(answer)} " in sentence for answer in answers if normalize(answer))


def prompts(tokenizer: Any, questions: Sequence[FactualQuestion]) -> list[str]:
    return [D.prompt_text(tokenizer, [{"role": "user", "content": q.question}]) for q in questions]


def score(questions: Sequence[FactualQuestion], replies: Sequence[str]) -> dict[str, Any]:
    """Accuracy over all questions, and each reply (what retention compares)."""
    answers: list[dict[str, Any]] = [
        {"question": q.question, "reply": reply, "right": is_right(reply, q.answers)}
        for q, reply in zip(questions, replies)
    ]
    right = sum(a["right"] for a in answers)
    return {
        "questions": len(answers),
        "right": right,
        "accuracy": right / len(answers) if answers else None,
        "answers": answers,
    }


def retention(base: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """`model`'s score (as `score` returns it) against the base's on the same questions."""
    pairs = list(zip(base["answers"], model["answers"]))
    if any(b["question"] != m["question"] for b, m in pairs) or len(base["answers"]) != len(model["answers"]):
        raise ValueError("retention compares answers to the same questions")
    known = [(b, m) for b, m in pairs if b["right"]]
    kept = sum(m["right"] for _, m in known)
    return {
        "base_right": len(known),
        "retained": kept / len(known) if known else None,
        "lost": [m["question"] for _, m in known if not m["right"]],
    }
