"""Training data: read JSONL, validate every line, tokenize with loss masks.

Accepted lines (the format is told apart per line):

- chat: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
  "tools": [...], "meta": {"lang": str, "kind": str, "split": str}}`` (``tools`` and ``meta``
  optional; ``meta`` labels the line for eval's breakdowns, training ignores it).
  An assistant turn may carry OpenAI ``tool_calls`` (``content`` null or text;
  ``function.arguments`` a JSON string or an object); a ``tool`` turn is a tool's result,
  after an assistant turn that made a call (its ``tool_call_id``, if given, names one).
  Calls and results stay structured until rendering, which goes through the base
  model's tool format (tuneserve/tool_calls/formats.py), as in eval and serving;
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
from tuneserve.tool_calls.formats import RenderedChat, ToolFormat, format_for_template
from tuneserve.tool_calls.spec import ToolCall, ToolSpec

ROLES = ("system", "user", "assistant", "tool")
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


# One turn, OpenAI-shaped as formats.ToolFormat.render takes it: "role", "content"
# (str, or None for an assistant turn that only calls), an assistant's "tool_calls"
# (a tuple of ToolCall) and a tool turn's "tool_call_id".
Message = dict[str, Any]


@dataclass(frozen=True)
class Conversation:
    where: str  # file:line
    messages: list[Message]
    tools: list[ToolSpec] | None = None
    lang: str | None = None  # from an optional "meta": {"lang": ...}; eval scores by it
    kind: str | None = None  # from "meta": {"kind": ...} (the generator's: call, multi_step, no_fit)
    split: str | None = None  # "meta": {"split": ...}: seen_tools, unseen_tools, no_call, multi_step


@dataclass(frozen=True)
class Text:
    where: str
    text: str


@dataclass(frozen=True)
class Preference:
    where: str
    prompt: list[Message]  # conversation up to the answer
    chosen: Message  # an assistant turn: text, or tool_calls
    rejected: Message
    tools: list[ToolSpec] | None = None


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


def _tools(value: Any) -> list[ToolSpec] | None:
    """Normalise OpenAI-style {"type": "function", "function": {...}} or bare tool specs."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise _Problem("tools", "must be a list of tool specs")
    tools: list[ToolSpec] = []
    for i, tool in enumerate(value):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise _Problem(f"tools[{i}]", "needs a non-empty string 'name' (or function.name)")
        if any(t.name == spec["name"] for t in tools):
            raise _Problem(f"tools[{i}].name", f"duplicate tool name {spec['name']!r}")
        params = spec.get("parameters", {})
        if not isinstance(params, dict) or not isinstance(params.get("properties", {}), dict):
            raise _Problem(f"tools[{i}].parameters", "must be a JSON schema object with 'properties'")
        description = spec.get("description") or ""
        if not isinstance(description, str):
            raise _Problem(f"tools[{i}].description", f"must be a string, got {type(description).__name__}")
        tools.append(ToolSpec(spec["name"], description, params))
    return tools


def _tool_calls(calls: Any, field_name: str, index: int, taken: set[str]) -> tuple[ToolCall, ...]:
    """OpenAI `tool_calls` as ToolCall values. A call without an id gets `call_<turn>_<n>`:
    deterministic, so the same line renders the same everywhere."""
    if not isinstance(calls, list) or not calls:
        raise _Problem(field_name, "must be a non-empty list")
    parsed = []
    for i, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _Problem(f"{field_name}[{i}]", "needs function.name")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
            try:
                value = json.loads(arguments)
            except json.JSONDecodeError:
                raise _Problem(f"{field_name}[{i}].function.arguments", "is not valid JSON") from None
        else:
            value, arguments = arguments, json.dumps(arguments, ensure_ascii=False)
        if not isinstance(value, dict):
            raise _Problem(f"{field_name}[{i}].function.arguments", "must be a JSON object")
        call_id = call.get("id") if isinstance(call, dict) else None
        if call_id is None:
            call_id = f"call_{index}_{i}"
        elif not isinstance(call_id, str) or not call_id:
            raise _Problem(f"{field_name}[{i}].id", "must be a non-empty string")
        if call_id in taken:
            raise _Problem(f"{field_name}[{i}].id", f"duplicate call id {call_id!r}")
        taken.add(call_id)
        parsed.append(ToolCall(call_id, fn["name"], arguments))
    return tuple(parsed)


def _messages(value: Any, field_name: str = "messages", need_answer: bool = True) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _Problem(field_name, "must be a non-empty list")
    messages: list[Message] = []
    call_ids: set[str] = set()
    unanswered: list[str] = []  # the latest assistant turn's calls without a result yet
    for i, message in enumerate(value):
        name = f"{field_name}[{i}]"
        if not isinstance(message, dict):
            raise _Problem(name, "must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise _Problem(f"{name}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        turn: Message = {"role": role}
        if role == "assistant" and message.get("tool_calls") not in (None, []):
            turn["tool_calls"] = _tool_calls(message["tool_calls"], f"{name}.tool_calls", i, call_ids)
            unanswered = [c.id for c in turn["tool_calls"]]
            content = message.get("content")
            turn["content"] = None if content is None else _string(content, f"{name}.content")
        else:
            turn["content"] = _string(message.get("content"), f"{name}.content")
            if role == "assistant" and not turn["content"].strip():
                raise _Problem(f"{name}.content", "empty assistant turn")
        if role == "tool":
            if not call_ids:
                raise _Problem(name, "a tool result needs an earlier assistant turn with tool_calls")
            call_id = message.get("tool_call_id")
            if call_id is None:
                # Without an id a result answers the next call of the turn before it
                # (OpenAI needs the id: eval's requests to a gateway send it).
                call_id = unanswered[0] if unanswered else _last_call_id(messages)
            elif not isinstance(call_id, str) or call_id not in call_ids:
                raise _Problem(f"{name}.tool_call_id", f"{call_id!r} matches no earlier assistant tool call")
            if call_id in unanswered:
                unanswered.remove(call_id)
            turn["tool_call_id"] = call_id
        messages.append(turn)
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise _Problem(field_name, "no assistant turn: no trainable tokens")
    return messages


def _last_call_id(messages: Sequence[Message]) -> str:
    """The id of the last call made before this point."""
    return next(m["tool_calls"][-1].id for m in reversed(messages) if m.get("tool_calls"))


def _meta(meta: Any) -> tuple[str | None, str | None, str | None]:
    """meta.lang, meta.kind and meta.split, each optional (other meta keys are ignored)."""
    if meta is None:
        return None, None, None
    if not isinstance(meta, dict):
        raise _Problem("meta", "must be a JSON object")
    labels = []
    for key in ("kind", "split"):
        label = meta.get(key)
        if label is not None and not (isinstance(label, str) and label.strip()):
            raise _Problem(f"meta.{key}", "must be a non-empty string")
        labels.append(label)
    return _lang(meta), labels[0], labels[1]


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
        messages, tools = _messages(obj["messages"]), _tools(obj.get("tools"))
        _check_called_tools(messages, tools)
        return Conversation(where, messages, tools, *_meta(obj.get("meta")))
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
    chosen, rejected = _answer(obj["chosen"], "chosen", prompt), _answer(obj["rejected"], "rejected", prompt)
    tools = _tools(obj.get("tools"))
    _check_called_tools([*prompt, chosen, rejected], tools)
    return Preference(where, prompt, chosen, rejected, tools)


def _answer(value: Any, field_name: str, prompt: Sequence[Message]) -> Message:
    """A DPO answer: text, or an assistant message (OpenAI shape, may carry tool_calls)."""
    if isinstance(value, str):
        return {"role": "assistant", "content": _string(value, field_name, allow_empty=False)}
    if not isinstance(value, dict) or value.get("role", "assistant") != "assistant":
        raise _Problem(field_name, "must be a string or an assistant message")
    taken = {c.id for m in prompt for c in m.get("tool_calls") or ()}
    message: Message = {"role": "assistant"}
    if value.get("tool_calls") not in (None, []):
        message["tool_calls"] = _tool_calls(value["tool_calls"], f"{field_name}.tool_calls", len(prompt), taken)
        content = value.get("content")
        message["content"] = None if content is None else _string(content, f"{field_name}.content")
    else:
        message["content"] = _string(value.get("content"), f"{field_name}.content", allow_empty=False)
    return message


def _messages_without_answer(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _Problem("prompt", "must be a string or a non-empty list of messages")
    out = _messages(value, "prompt", need_answer=False)
    if out[-1]["role"] == "assistant":
        raise _Problem("prompt", "must end with a user or tool turn (the answer goes in chosen/rejected)")
    return out


def _check_called_tools(messages: Sequence[Message], tools: Sequence[ToolSpec] | None) -> None:
    """A call in the data names one of the offered tools (what the model is taught to do)."""
    if tools is None:
        return
    names = {t.name for t in tools}
    for i, message in enumerate(messages):
        for j, call in enumerate(message.get("tool_calls") or ()):
            if call.name not in names:
                raise _Problem(f"messages[{i}].tool_calls[{j}].function.name", f"{call.name!r} is not in tools")


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


def tool_format(tokenizer: Any) -> ToolFormat:
    """The tool protocol of the tokenizer's chat template: compact for SmolLM2, Hermes for
    templates that render `tools` and answer in <tool_call> tags (formats.format_for_template)."""
    source = getattr(tokenizer, "chat_template", None)
    return format_for_template(source if isinstance(source, str) else "")


def render_chat(tokenizer: Any, messages: Sequence[Message], tools: Sequence[ToolSpec] | None = None) -> RenderedChat:
    """Structured turns as the chat template's input, through the shared tool format."""
    return tool_format(tokenizer).render(messages, tools)


def render(
    tokenizer: Any,
    messages: Sequence[Message],
    tools: Sequence[ToolSpec] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    chat = render_chat(tokenizer, messages, tools)
    return tokenizer.apply_chat_template(
        chat.messages, tools=chat.tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def prompt_text(tokenizer: Any, messages: Sequence[Message], tools: Sequence[ToolSpec] | None = None) -> str:
    """What the model sees before it answers: the same rendering training uses."""
    return render(tokenizer, messages, tools, add_generation_prompt=True)


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


def _assistant_spans(
    tokenizer: Any, messages: Sequence[Message], tools: Sequence[ToolSpec] | None, full: str
) -> list[tuple[int, int]]:
    """Character spans of each assistant turn (a call or text, with its end-of-turn
    marker) in `full`; tool results and the user's turns are context.

    Rendered from the template itself: the prompt up to a turn (with the generation
    prompt) and the conversation through it; the answer is the difference. This
    needs no {% generation %} tags, which SmolLM2's template lacks.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], tools, add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1], tools)
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
        full = render(tokenizer, example.messages, example.tools)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if assistant_only:
            spans = _assistant_spans(tokenizer, example.messages, example.tools, full)
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
