"""Evaluate a base model and adapters: function-calling accuracy and general perplexity.

Function calling: each test line is a chat example; its last assistant turn is the
expected answer, and the conversation before it (calls and tool results included) is
the prompt. The expected answer is either one call (`tool_calls`, or the JSON
{"name": ..., "arguments": {...}} as content, the generator's older format), or text:
the right answer makes no call (no offered tool fits, or the final answer after a tool
result). The model answers greedily, in process (rendered exactly as in training,
through the base model's tool format) or through a running gateway (`--base-url`: the
same conversation and `tools` over the OpenAI API, `tool_choice: auto`). Either way an
answer is a `ParsedOutput` (content and calls): in process, the model's text through
the gateway's own parser (tuneserve/tool_calls/parse.py); over HTTP, the response's
`message.tool_calls` and `content`. One scorer scores both, so the figures agree.

Scores (call metrics over the cases that expect a call):

- json_validity: the answer is a call (a well-formed call to an offered tool: what the
  gateway returns as `tool_calls`);
- tool_name_accuracy: its first call names the expected tool;
- argument_accuracy: expected arguments present with exactly the expected value
  (per argument, over all expected arguments);
- exact_call_accuracy: one call, name and the whole arguments object match;
- no_call_accuracy: over the cases whose answer is text: the answer makes no call.

Lines with "meta": {"lang": ...} are also scored per language, and by kind (`meta.kind`,
else call / multi_step / no_fit told from the line). Lines with "meta": {"split": ...}
(the generator writes seen_tools, unseen_tools, no_call, multi_step) are scored per
split too, and within each split per language (`by_split`): a tool the model never
trained on, or a weak language, hides behind a good average.

Forgetting, two ways: general perplexity, token-weighted over a JSONL text set; and
factual retention (training/retention.py): of short factual questions the base answers
right, the share an adapter still answers right (`factual_retained`).
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from training import data as D
from training import retention as R
from tuneserve.tool_calls.formats import ToolFormat
from tuneserve.tool_calls.parse import ParsedOutput, parse_output
from tuneserve.tool_calls.spec import ToolCall, ToolSpec

SPLITS = ("seen_tools", "unseen_tools", "no_call", "multi_step")  # training/datagen/function_calling.py's


@dataclass(frozen=True)
class CallCase:
    where: str
    prompt: list[D.Message]
    tools: list[ToolSpec] | None
    name: str | None  # the expected tool; None: the right answer is text, no call
    arguments: dict[str, Any] = field(default_factory=dict)
    lang: str | None = None
    kind: str | None = None  # call | multi_step | no_fit (meta.kind, or told from the line)
    content: str | None = None  # the expected text, when it is text
    split: str | None = None  # meta.split: seen_tools | unseen_tools | no_call | multi_step

    @property
    def tool_names(self) -> list[str]:
        return [t.name for t in self.tools or ()]


def _expected_call(answer: D.Message, where: str, index: int) -> tuple[str, dict[str, Any]] | None:
    """The expected call of an assistant turn, None when it is text."""
    calls = answer.get("tool_calls")
    if calls:
        if len(calls) > 1:
            raise D.DataError([f"{where}: messages[{index}].tool_calls: eval scores one expected call, got {len(calls)}"])
        return calls[0].name, calls[0].arguments_value()
    try:  # the older format: the call's JSON as content
        value = json.loads(answer["content"])
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(value.get("arguments", {}), dict):
        return value["name"], value.get("arguments", {})
    return None


def load_call_cases(path: Path, limit: int | None = None) -> list[CallCase]:
    """Chat examples ending in the expected answer; problems reported as file:line."""
    cases, problems = [], []
    for example in D.load_examples([path]):
        if not isinstance(example, D.Conversation) or example.messages[-1]["role"] != "assistant":
            problems.append(f"{example.where}: messages: the last turn must be the assistant's expected answer")
            continue
        last = len(example.messages) - 1
        try:
            call = _expected_call(example.messages[-1], example.where, last)
        except D.DataError as exc:
            problems += exc.problems
            continue
        prompt = example.messages[:-1]
        kind = example.kind or ("call" if call else "multi_step" if any(m["role"] == "tool" for m in prompt) else "no_fit")
        if call is None:
            cases.append(CallCase(example.where, prompt, example.tools, None, {}, example.lang, kind,
                                  example.messages[-1]["content"], example.split))
        else:
            cases.append(CallCase(example.where, prompt, example.tools, call[0], call[1], example.lang, kind,
                                  split=example.split))
    if problems:
        raise D.DataError(problems)
    return cases[:limit] if limit else cases


def load_texts(path: Path) -> list[str]:
    texts = []
    for example in D.load_examples([path]):
        if isinstance(example, D.Text):
            texts.append(example.text)
        else:  # a chat example: its rendered messages are text too
            texts.append("\n".join(m["content"] for m in example.messages if m.get("content")))
    return texts


# ---------------------------------------------------------------- models


def load_model(base: str, adapter: Path | None = None) -> Any:
    """float32, as the served GGUF (f16) and vLLM (float32) run the tiny model. `base` may
    be any model dir: a full fine-tune (GaLore's model/, a merge) is evaluated as a base."""
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
    device = next(model.parameters()).device  # a model in training may be on a GPU
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_length].to(device)
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        n = ids.shape[1] - 1  # predicted tokens
        total_nll += loss * n
        total_tokens += n
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")


# ---------------------------------------------------------------- scoring


def parse_answers(fmt: ToolFormat, cases: Sequence[CallCase], texts: Sequence[str]) -> list[ParsedOutput]:
    """Model text as the gateway reads it: the same parser, the same offered tool names."""
    return [parse_output(text, fmt, case.tool_names) for case, text in zip(cases, texts)]


def _score(cases: Sequence[CallCase], answers: Sequence[ParsedOutput]) -> dict[str, Any]:
    valid = names = exact = args_hit = args_total = calls = no_calls = no_call_right = 0
    for case, answer in zip(cases, answers):
        if case.name is None:
            no_calls += 1
            no_call_right += not answer.calls  # a call where text was right is an error
            continue
        calls += 1
        args_total += len(case.arguments)
        if not answer.calls:
            continue
        valid += 1
        call = answer.calls[0]
        arguments = call.arguments_value()
        got_args: dict[str, Any] = arguments if isinstance(arguments, dict) else {}
        if call.name == case.name:
            names += 1
            args_hit += sum(1 for k, v in case.arguments.items() if k in got_args and got_args[k] == v)
            exact += int(got_args == case.arguments and len(answer.calls) == 1)

    def share(hits: int, total: int) -> float | None:
        return hits / total if total else None

    return {
        "examples": len(cases),
        "call_examples": calls,
        "no_call_examples": no_calls,
        "json_validity": share(valid, calls),
        "tool_name_accuracy": share(names, calls),
        "argument_accuracy": share(args_hit, args_total),
        "exact_call_accuracy": share(exact, calls),
        "no_call_accuracy": share(no_call_right, no_calls),
    }


def score_calls(cases: Sequence[CallCase], answers: Sequence[ParsedOutput]) -> dict[str, Any]:
    """Scores over all cases, plus `by_language`, `by_kind` and `by_split` (each split
    also `by_language`) when cases carry them: a small model's weak language (or kind,
    or the tools it never trained on) hides behind a good average."""
    scores = _score(cases, answers)
    for key, attribute in (("by_language", "lang"), ("by_kind", "kind"), ("by_split", "split")):
        groups = _grouped(cases, answers, attribute)
        if groups:
            scores[key] = {group: _score(*picked) for group, picked in groups.items()}
    for split, picked in _grouped(cases, answers, "split").items():
        by_language = _grouped(*picked, "lang")
        if by_language:
            scores["by_split"][split]["by_language"] = {lang: _score(*p) for lang, p in by_language.items()}
    return scores


def _grouped(
    cases: Sequence[CallCase], answers: Sequence[ParsedOutput], attribute: str
) -> dict[str, tuple[list[CallCase], list[ParsedOutput]]]:
    """The cases (and their answers) per value of `attribute`, cases without one left out."""
    groups: dict[str, tuple[list[CallCase], list[ParsedOutput]]] = {}
    for case, answer in zip(cases, answers):
        label = getattr(case, attribute)
        if label:
            picked = groups.setdefault(label, ([], []))
            picked[0].append(case)
            picked[1].append(answer)
    if attribute == "split":  # the generator's splits in report order, then any others
        order = {split: i for i, split in enumerate(SPLITS)}
        return dict(sorted(groups.items(), key=lambda g: (order.get(g[0], len(SPLITS)), g[0])))
    return dict(sorted(groups.items()))


def _samples(cases: Sequence[CallCase], answers: Sequence[ParsedOutput], raw: Sequence[Any], keep: int) -> list[dict[str, Any]]:
    return [
        {
            "where": c.where,
            "kind": c.kind,
            "split": c.split,
            "expected": {"name": c.name, "arguments": c.arguments} if c.name else {"content": c.content},
            "answer": r,
            "parsed": {"content": a.content, "tool_calls": [call.as_openai()["function"] for call in a.calls]},
        }
        for c, a, r in list(zip(cases, answers, raw))[:keep]
    ]


def evaluate_model(
    model: Any,
    tokenizer: Any,
    cases: Sequence[CallCase],
    texts: Sequence[str],
    max_new_tokens: int = 96,
    batch_size: int = 8,
    keep_answers: int = 20,
    questions: Sequence[R.FactualQuestion] = (),
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if questions:
        replies = generate(model, tokenizer, R.prompts(tokenizer, questions), R.MAX_NEW_TOKENS, batch_size)
        result["factual"] = R.score(questions, replies)
    if cases:
        prompts = [D.prompt_text(tokenizer, c.prompt, c.tools) for c in cases]
        raw = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
        answers = parse_answers(D.tool_format(tokenizer), cases, raw)
        result["function_calling"] = score_calls(cases, answers)
        result["samples"] = _samples(cases, answers, raw, keep_answers)
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
    factual: Path | None = None,
    full_models: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Base, each adapter and each full model (a fine-tune of the base sharing its tokenizer)
    side by side; adds perplexity change and factual retention vs the base."""
    from training.model import load_tokenizer

    tokenizer = load_tokenizer(base)
    cases = load_call_cases(function_calling, limit) if function_calling else []
    texts = load_texts(general) if general else []
    questions = R.load_questions(factual) if factual else []
    models: dict[str, Any] = {}
    # (name, model dir, adapter)
    variants: list[tuple[str, str, Path | None]] = [("base", base, None)] if include_base else []
    variants += [(name, base, adapter) for name, adapter in adapters.items()]
    variants += [(name, str(path), None) for name, path in (full_models or {}).items()]
    for name, model_dir, adapter in variants:
        model = load_model(model_dir, adapter)
        labels = {"adapter": str(adapter) if adapter else None} | ({"model": model_dir} if model_dir != base else {})
        models[name] = labels | evaluate_model(
            model, tokenizer, cases, texts, max_new_tokens, batch_size, questions=questions)
        del model
    base_ppl = models.get("base", {}).get("general_perplexity")
    for name, result in models.items():
        if name != "base" and base_ppl and result.get("general_perplexity") is not None:
            result["perplexity_change_pct"] = 100 * (result["general_perplexity"] / base_ppl - 1)
    base_factual = models.get("base", {}).get("factual")
    if questions and base_factual is None:  # --no-base: retention still needs the base's answers
        model = load_model(base)
        base_factual = evaluate_model(model, tokenizer, [], [], batch_size=batch_size, questions=questions)["factual"]
        del model
    for name, result in models.items():
        if name != "base" and base_factual is not None:
            result["factual"] |= R.retention(base_factual, result["factual"])
            result["factual_retained"] = result["factual"]["retained"]
    return {
        "base_model": base,
        "function_calling_file": str(function_calling) if function_calling else None,
        "general_file": str(general) if general else None,
        "factual_file": str(factual) if factual else None,
        "factual_base_right": base_factual["right"] if base_factual else None,
        "models": models,
    }


# ---------------------------------------------------------------- through a gateway


def openai_messages(messages: Sequence[D.Message]) -> list[dict[str, Any]]:
    """Structured turns as OpenAI's chat API takes them."""
    out = []
    for message in messages:
        turn: dict[str, Any] = {"role": message["role"], "content": message.get("content")}
        if message.get("tool_calls"):
            turn["tool_calls"] = [call.as_openai() for call in message["tool_calls"]]
        if message["role"] == "tool":
            turn["tool_call_id"] = message["tool_call_id"]
        out.append(turn)
    return out


def answer_over_http(client: Any, model: str, case: CallCase, max_new_tokens: int) -> tuple[ParsedOutput, dict[str, Any]]:
    """One case through the gateway: (the answer as the scorer reads it, the message as sent back)."""
    tools: dict[str, Any] = {}
    if case.tools:
        tools = {"tools": [t.as_openai() for t in case.tools], "tool_choice": "auto"}
    response = client.chat.completions.create(
        model=model, messages=openai_messages(case.prompt), temperature=0, max_tokens=max_new_tokens, **tools
    )
    message = response.choices[0].message
    calls = tuple(
        ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or () if c.type == "function"
    )
    return ParsedOutput(message.content, calls), message.model_dump(exclude_none=True)


def evaluate_gateway(
    base_url: str,
    models: Sequence[str],
    function_calling: Path,
    api_key: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 96,
    concurrency: int = 4,
    keep_answers: int = 20,
    timeout_s: float = 600,
) -> dict[str, Any]:
    """The same cases and scores as `evaluate`, answered by a running gateway (or any
    OpenAI-compatible server) over HTTP, with the official `openai` client."""
    from openai import OpenAI

    url = base_url.rstrip("/")
    url = url if url.endswith("/v1") else url + "/v1"
    client = OpenAI(base_url=url, api_key=api_key or "unused", max_retries=2, timeout=timeout_s)
    cases = load_call_cases(function_calling, limit)
    results: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for model in models:
            replies = list(pool.map(answer_over_http, [client] * len(cases), [model] * len(cases), cases,
                                    [max_new_tokens] * len(cases)))
            answers = [answer for answer, _ in replies]
            results[model] = {
                "function_calling": score_calls(cases, answers),
                "samples": _samples(cases, answers, [raw for _, raw in replies], keep_answers),
            }
    return {
        "base_url": url,
        "function_calling_file": str(function_calling),
        "general_file": None,
        "factual_file": None,
        "models": results,
    }


def format_table(results: dict[str, Any]) -> str:
    columns = [
        ("model", lambda n, r: n),
        ("tool_name", lambda n, r: _pct(r.get("function_calling", {}).get("tool_name_accuracy"))),
        ("arguments", lambda n, r: _pct(r.get("function_calling", {}).get("argument_accuracy"))),
        ("exact_call", lambda n, r: _pct(r.get("function_calling", {}).get("exact_call_accuracy"))),
        ("json_valid", lambda n, r: _pct(r.get("function_calling", {}).get("json_validity"))),
        ("no_call", lambda n, r: _pct(r.get("function_calling", {}).get("no_call_accuracy"))),
        ("general_ppl", lambda n, r: f"{r['general_perplexity']:.3f}" if r.get("general_perplexity") else "-"),
        ("ppl_change", lambda n, r: f"{r['perplexity_change_pct']:+.2f}%" if "perplexity_change_pct" in r else "-"),
        ("factual", lambda n, r: _pct(r["factual"]["accuracy"]) if "factual" in r else "-"),
        ("factual_kept", lambda n, r: _pct(r.get("factual_retained"))),
    ]
    labelled = []
    for name, result in results["models"].items():
        labelled.append((name, result))
        fc = result.get("function_calling", {})
        # Splits refine kinds (call: seen or unseen tools), so a file with splits shows those.
        for group in ("by_language", "by_split" if "by_split" in fc else "by_kind"):
            for label, scores in fc.get(group, {}).items():
                labelled.append((f"  {name} [{label}]", {"function_calling": scores}))
                for lang, by_lang in scores.get("by_language", {}).items() if group == "by_split" else ():
                    labelled.append((f"  {name} [{label}/{lang}]", {"function_calling": by_lang}))
    rows = [[c[0] for c in columns]] + [[str(f(n, r)) for _, f in columns] for n, r in labelled]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
