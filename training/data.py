"""Training data: read JSONL, validate every line, tokenize with loss masks.

Accepted lines (the format is told apart per line):

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
  "tools": [...]}`` (``tools`` optional; an assistant turn may carry OpenAI
  ``tool_calls`` instead of content);
- alpaca: ``{"instruction": str, "input": str, "output": str, "system": str}``
  (``input`` and ``system`` optional);
- text: ``{"text": str}``: plain language-model data (every token trained), meant
  for replay of general text.

Every problem in every file is collected first and reported together as
``file:line: field: what is wrong``; nothing trains until the data is clean.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tuneserve.errors import TuneserveError
from tuneserve.tool_calls.render import call_text, with_tools

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
_MAX_REPORTED = 50

class DataError(TuneserveError):
    """Training data failed validation; the message lists each problem as file:line."""

    def __init__(self, problems: Sequence[str]) -> None:
        shown = list(problems[:_MAX_REPORTED])
        more = len(problems) - len(shown)
        tail = f"\n... and {more} more problems" if more > 0 else ""
        super().__init__(f"{len(problems)} problem(s) in the training data:\n" + "\n".join(shown) + tail)
        self.problems = list(problems)


class _Problem(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")


# ---------------------------------------------------------------- examples


@dataclass(frozen=True)
class Conversation:
    where: str  # file:line
    messages: list[dict[str, str]]
    tools: list[dict[str, Any]] | None = None
    lang: str | None = None  # from an optional "meta": {"lang": ...}; eval scores by it


@dataclass(frozen=True)
class Text:
    where: str
    text: str


@dataclass(frozen=True)
class Preference:
    where: str
    prompt: list[dict[str, str]]  # conversation up to the answer
    chosen: str
    rejected: str
    tools: list[dict[str, Any]] | None = None


SftExample = Conversation | Text


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(file:line, parsed JSON) for each non-blank line; bad JSON becomes a _Problem value."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError([f"{path}: cannot read: {exc.strerror}"]) from exc
    with handle:
        lineno = 0
        while True:
            try:
                line = handle.readline()
            except UnicodeDecodeError as exc:
                raise DataError([f"{path}:{lineno + 1}: not UTF-8 text ({exc.reason})"]) from exc
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, _Problem("(line)", f"bad JSON: {exc.msg} at column {exc.colno}")


def _string(value: Any, field_name: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _Problem(field_name, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _Problem(field_name, "is empty")
    return value


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """Normalise OpenAI-style {"type": "function", "function": {...}} or bare tool specs."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise _Problem("tools", "must be a list of tool specs")
    tools = []
    for i, tool in enumerate(value):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise _Problem(f"tools[{i}]", "needs a non-empty string 'name' (or function.name)")
        params = spec.get("parameters", {})
        if not isinstance(params, dict) or not isinstance(params.get("properties", {}), dict):
            raise _Problem(f"tools[{i}].parameters", "must be a JSON schema object with 'properties'")
        tools.append({"name": spec["name"], "description": spec.get("description", ""), "parameters": params})
    return tools


def _tool_call_content(calls: Any, field_name: str) -> str:
    if not isinstance(calls, list) or not calls:
        raise _Problem(field_name, "must be a non-empty list")
    rendered = []
    for i, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _Problem(f"{field_name}[{i}]", "needs function.name")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise _Problem(f"{field_name}[{i}].function.arguments", "is not valid JSON") from None
        rendered.append({"name": fn["name"], "arguments": arguments})
    return call_text(rendered)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _Problem("messages", "must be a non-empty list")
    messages = []
    for i, message in enumerate(value):
        name = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _Problem(name, "must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise _Problem(f"{name}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "assistant" and message.get("tool_calls") and not message.get("content"):
            content = _tool_call_content(message["tool_calls"], f"{name}.tool_calls")
        else:
            content = _string(message.get("content"), f"{name}.content")
        if role == "assistant" and not content.strip():
            raise _Problem(f"{name}.content", "empty assistant turn")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise _Problem("messages", "no assistant turn: no trainable tokens")
    return messages


def _lang(meta: Any) -> str | None:
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise _Problem("meta", "must be a JSON object")
    lang = meta.get("lang")
    if lang is not None and not (isinstance(lang, str) and lang.strip()):
        raise _Problem("meta.lang", "must be a non-empty string")
    return lang


def parse_sft(obj: Any, where: str) -> SftExample:
    if isinstance(obj, _Problem):
        raise obj
    if not isinstance(obj, dict):
        raise _Problem("(line)", "must be a JSON object")
    if "messages" in obj:
        return Conversation(where, _messages(obj["messages"]), _tools(obj.get("tools")), _lang(obj.get("meta")))
    if "instruction" in obj or "output" in obj:
        instruction = _string(obj.get("instruction"), "instruction", allow_empty=False)
        extra = _string(obj.get("input", ""), "input")
        output = _string(obj.get("output"), "output")
        if not output.strip():
            raise _Problem("output", "empty assistant turn")
        messages = []
        if obj.get("system"):
            messages.append({"role": "system", "content": _string(obj["system"], "system")})
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Conversation(where, messages)
    if "text" in obj:
        return Text(where, _string(obj["text"], "text", allow_empty=False))
    raise _Problem("(line)", "unknown format: expected 'messages', 'instruction'/'output' or 'text'")


def parse_preference(obj: Any, where: str) -> Preference:
    if isinstance(obj, _Problem):
        raise obj
    if not isinstance(obj, dict):
        raise _Problem("(line)", "must be a JSON object")
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise _Problem(key, "missing (DPO lines need prompt, chosen, rejected)")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": _string(prompt, "prompt", allow_empty=False)}]
    else:
        prompt = _messages_without_answer(prompt)
    chosen = _string(obj["chosen"], "chosen", allow_empty=False)
    rejected = _string(obj["rejected"], "rejected", allow_empty=False)
    return Preference(where, prompt, chosen, rejected, _tools(obj.get("tools")))


def _messages_without_answer(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _Problem("prompt", "must be a string or a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise _Problem(f"prompt[{i}].role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        out.append({"role": message["role"], "content": _string(message.get("content"), f"prompt[{i}].content")})
    if out[-1]["role"] == "assistant":
        raise _Problem("prompt", "must end with a user turn (the answer goes in chosen/rejected)")
    return out


def load_examples(paths: Sequence[Path], preference: bool = False) -> list[Any]:
    """Parse every line of every file; raise one DataError listing all problems."""
    examples, problems = collect_examples(paths, preference)
    if problems:
        raise DataError(problems)
    return examples


def collect_examples(paths: Sequence[Path], preference: bool = False) -> tuple[list[Any], list[str]]:
    """The lines that parse, and a file:line problem for each that does not."""
    examples: list[Any] = []
    problems: list[str] = []
    parse = parse_preference if preference else parse_sft
    for path in paths:
        count = 0
        for where, obj in read_jsonl(Path(path)):
            try:
                examples.append(parse(obj, where))
                count += 1
            except _Problem as exc:
                problems.append(f"{where}: {exc}")
        if count == 0 and not any(p.startswith(f"{path}:") for p in problems):
            problems.append(f"{path}: no examples (the file is empty)")
    return examples, problems


def files_sha256(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def split_eval(items: Sequence[Any], ratio: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out `ratio` of the examples (at least one when ratio > 0), the same ones for a given seed."""
    if ratio <= 0 or len(items) < 2:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(items) - 1, max(1, round(ratio * len(items))))
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


# ---------------------------------------------------------------- rendering


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_text(tokenizer: Any, messages: list[dict[str, str]], tools: Sequence[dict[str, Any]] | None = None) -> str:
    """What the model sees before it answers: the same rendering training uses."""
    return render(tokenizer, with_tools(messages, tools), add_generation_prompt=True)


# ---------------------------------------------------------------- tokenizing


@dataclass
class Encoded:
    where: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def trainable(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
    """Character spans of each assistant answer (with its end-of-turn marker) in `full`.

    Rendered from the template itself: the prompt up to a turn (with the generation
    prompt) and the conversation through it; the answer is the difference. This
    needs no {% generation %} tags, which SmolLM2's template lacks.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise _Problem(
                f"messages[{i}]",
                "the chat template renders this turn differently in context; "
                "cannot tell the answer's tokens apart (set data.assistant_only_loss: false)",
            )
        spans.append((len(before), len(through)))
    return spans


def encode(tokenizer: Any, example: SftExample, max_length: int, assistant_only: bool = True) -> Encoded:
    if isinstance(example, Text):
        ids = tokenizer(example.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        messages = with_tools(example.messages, example.tools)
        full = render(tokenizer, messages)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if assistant_only:
            spans = _assistant_spans(tokenizer, messages, full)
            labels = [
                token if any(s <= start < e for s, e in spans) else IGNORE_INDEX
                for token, (start, _) in zip(ids, enc["offset_mapping"])
            ]
        else:
            labels = list(ids)
    truncated = len(ids) > max_length
    encoded = Encoded(example.where, ids[:max_length], labels[:max_length], truncated)
    if encoded.trainable == 0:
        cut = f" within data.max_length={max_length} tokens" if truncated else ""
        raise _Problem("messages" if isinstance(example, Conversation) else "text", f"no trainable tokens{cut}")
    return encoded


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated_where: list[str] = field(default_factory=list)

    def add(self, item: Encoded) -> None:
        self.examples += 1
        self.tokens += len(item.input_ids)
        self.trainable_tokens += item.trainable
        if item.truncated:
            self.truncated += 1
            if len(self.truncated_where) < 20:
                self.truncated_where.append(item.where)


def encode_all(
    tokenizer: Any, examples: Sequence[SftExample], max_length: int, assistant_only: bool = True
) -> tuple[list[Encoded], DataStats]:
    """Tokenize every example; raise one DataError listing every example left with nothing to train on."""
    encoded, problems, stats = [], [], DataStats()
    for example in examples:
        try:
            item = encode(tokenizer, example, max_length, assistant_only)
        except _Problem as exc:
            problems.append(f"{example.where}: {exc}")
            continue
        encoded.append(item)
        stats.add(item)
    if problems:
        raise DataError(problems)
    return encoded, stats


def pack(items: Sequence[Encoded], max_length: int) -> list[Encoded]:
    """Concatenate examples into sequences of at most max_length tokens.

    Packed examples attend to the ones before them in the same sequence (plain
    packing, no per-example attention mask); the labels stay per example.
    """
    packed: list[Encoded] = []
    ids: list[int] = []
    labels: list[int] = []
    for item in items:
        if ids and len(ids) + len(item.input_ids) > max_length:
            packed.append(Encoded("packed", ids, labels, False))
            ids, labels = [], []
        ids = ids + item.input_ids
        labels = labels + item.labels
    if ids:
        packed.append(Encoded("packed", ids, labels, False))
    return packed


class EncodedDataset:
    """A map-style dataset of Encoded examples, as the Trainer's dataloader wants."""

    def __init__(self, items: Sequence[Encoded]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        item = self.items[index]
        return {"input_ids": item.input_ids, "labels": item.labels}


class PadCollator:
    """Right-pads a batch to its longest example; padding never counts in the loss."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
