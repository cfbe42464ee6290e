"""Evaluate a base model and adapters: function-calling accuracy and general perplexity.

Function calling: each test line is a chat example whose last assistant turn is the
expected call, {"name": ..., "arguments": {...}} (the generator's format). The model
answers the conversation before it, greedily, rendered exactly as in training (tools
in the system prompt). Scores:

- json_validity: the answer parses as a JSON object;
- tool_name_accuracy: the object's "name" is the expected tool;
- argument_accuracy: expected arguments present with exactly the expected value
  (per argument, over all expected arguments);
- exact_call_accuracy: name and the whole arguments object match.

Lines with "meta": {"lang": ...} (the generator writes it) are also scored per language.

General perplexity (forgetting): token-weighted perplexity over a JSONL text set.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from training import data as D


@dataclass(frozen=True)
class CallCase:
    where: str
    prompt: list[dict[str, str]]
    tools: list[dict[str, Any]] | None
    name: str
    arguments: dict[str, Any]
    lang: str | None = None


def load_call_cases(path: Path, limit: int | None = None) -> list[CallCase]:
    """Chat examples ending in the expected call; problems reported as file:line."""
    cases, problems = [], []
    for example in D.load_examples([path]):
        if not isinstance(example, D.Conversation) or example.messages[-1]["role"] != "assistant":
            problems.append(f"{example.where}: messages: the last turn must be the assistant's expected call")
            continue
        try:
            call = json.loads(example.messages[-1]["content"])
        except json.JSONDecodeError:
            call = None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments", {}), dict)):
            problems.append(
                f"{example.where}: messages[{len(example.messages) - 1}].content: "
                'expected call must be JSON {"name": str, "arguments": object}'
            )
            continue
        cases.append(CallCase(example.where, example.messages[:-1], example.tools, call["name"], call.get("arguments", {}), example.lang))
    if problems:
        raise D.DataError(problems)
    return cases[:limit] if limit else cases


def load_texts(path: Path) -> list[str]:
    texts = []
    for example in D.load_examples([path]):
        if isinstance(example, D.Text):
            texts.append(example.text)
        else:  # a chat example: its rendered messages are text too
            texts.append("\n".join(m["content"] for m in example.messages))
    return texts


# ---------------------------------------------------------------- models


def load_model(base: str, adapter: Path | None = None) -> Any:
    """float32, as the served GGUF (f16) and vLLM (float32) run the tiny model."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
    import torch

    tokenizer.padding_side = "left"  # generation continues from the right edge
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int = 1024) -> float:
    import torch

    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_length]
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        n = ids.shape[1] - 1  # predicted tokens
        total_nll += loss * n
        total_tokens += n
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")


# ---------------------------------------------------------------- scoring


def parse_call(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _score(cases: Sequence[CallCase], answers: Sequence[str]) -> dict[str, Any]:
    valid = names = exact = args_hit = args_total = 0
    for case, answer in zip(cases, answers):
        call = parse_call(answer)
        args_total += len(case.arguments)
        if call is None:
            continue
        valid += 1
        arguments = call.get("arguments")
        got_args: dict[str, Any] = arguments if isinstance(arguments, dict) else {}
        if call.get("name") == case.name:
            names += 1
            args_hit += sum(1 for k, v in case.arguments.items() if k in got_args and got_args[k] == v)
            exact += int(got_args == case.arguments)
    n = len(cases) or 1
    return {
        "examples": len(cases),
        "json_validity": valid / n,
        "tool_name_accuracy": names / n,
        "argument_accuracy": args_hit / args_total if args_total else None,
        "exact_call_accuracy": exact / n,
    }


def score_calls(cases: Sequence[CallCase], answers: Sequence[str]) -> dict[str, Any]:
    """Scores over all cases, plus `by_language` when cases carry a language: a small
    model's weak language hides behind a good average."""
    scores = _score(cases, answers)
    langs = sorted({c.lang for c in cases if c.lang})
    if langs:
        by_language = {}
        for lang in langs:
            picked = [i for i, case in enumerate(cases) if case.lang == lang]
            by_language[lang] = _score([cases[i] for i in picked], [answers[i] for i in picked])
        scores["by_language"] = by_language
    return scores


def evaluate_model(
    model: Any,
    tokenizer: Any,
    cases: Sequence[CallCase],
    texts: Sequence[str],
    max_new_tokens: int = 96,
    batch_size: int = 8,
    keep_answers: int = 20,
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if cases:
        prompts = [D.prompt_text(tokenizer, c.prompt, c.tools) for c in cases]
        answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
        result["function_calling"] = score_calls(cases, answers)
        result["samples"] = [
            {"where": c.where, "expected": {"name": c.name, "arguments": c.arguments}, "answer": a}
            for c, a in list(zip(cases, answers))[:keep_answers]
        ]
    if texts:
        result["general_perplexity"] = perplexity(model, tokenizer, texts)
    return result


def evaluate(
    base: str,
    adapters: dict[str, Path],
    function_calling: Path | None,
    general: Path | None,
    limit: int | None = None,
    max_new_tokens: int = 96,
    batch_size: int = 8,
    include_base: bool = True,
) -> dict[str, Any]:
    """Base and each adapter side by side; adds perplexity change vs the base."""
    from training.model import load_tokenizer

    tokenizer = load_tokenizer(base)
    cases = load_call_cases(function_calling, limit) if function_calling else []
    texts = load_texts(general) if general else []
    models: dict[str, Any] = {}
    variants: list[tuple[str, Path | None]] = ([("base", None)] if include_base else []) + list(adapters.items())
    for name, adapter in variants:
        model = load_model(base, adapter)
        models[name] = {"adapter": str(adapter) if adapter else None, **evaluate_model(model, tokenizer, cases, texts, max_new_tokens, batch_size)}
        del model
    base_ppl = models.get("base", {}).get("general_perplexity")
    for name, result in models.items():
        if name != "base" and base_ppl and result.get("general_perplexity") is not None:
            result["perplexity_change_pct"] = 100 * (result["general_perplexity"] / base_ppl - 1)
    return {
        "base_model": base,
        "function_calling_file": str(function_calling) if function_calling else None,
        "general_file": str(general) if general else None,
        "models": models,
    }


def format_table(results: dict[str, Any]) -> str:
    columns = [
        ("model", lambda n, r: n),
        ("tool_name", lambda n, r: _pct(r.get("function_calling", {}).get("tool_name_accuracy"))),
        ("arguments", lambda n, r: _pct(r.get("function_calling", {}).get("argument_accuracy"))),
        ("exact_call", lambda n, r: _pct(r.get("function_calling", {}).get("exact_call_accuracy"))),
        ("json_valid", lambda n, r: _pct(r.get("function_calling", {}).get("json_validity"))),
        ("general_ppl", lambda n, r: f"{r['general_perplexity']:.3f}" if r.get("general_perplexity") else "-"),
        ("ppl_change", lambda n, r: f"{r['perplexity_change_pct']:+.2f}%" if "perplexity_change_pct" in r else "-"),
    ]
    labelled = []
    for name, result in results["models"].items():
        labelled.append((name, result))
        for lang, scores in result.get("function_calling", {}).get("by_language", {}).items():
            labelled.append((f"  {name} [{lang}]", {"function_calling": scores}))
    rows = [[c[0] for c in columns]] + [[str(f(n, r)) for _, f in columns] for n, r in labelled]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
