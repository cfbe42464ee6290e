"""Verifiable rewards for GRPO on function calling: plain functions, no reward model.

Each has TRL's reward-function signature, `f(completions, **columns) -> list[float | None]`,
one value per completion. The GRPO dataset's columns (training/grpo.py) arrive as
keyword lists, one entry per completion:

- `tool_format`: the base model's tool format (formats.py), which says how to read the text;
- `tool_names`: the tools the prompt offered;
- `expected_name`: the expected tool, None where the right answer is text (no offered tool
  fits, or the final answer after a tool result);
- `expected_arguments`: the expected call's arguments, as JSON text.

A completion is read as the gateway reads model output (tuneserve/tool_calls/parse.py with
the offered tool names), so a reward counts what a client would get back as `tool_calls`;
the scores mirror `tuneserve eval`'s (training/evaluate.py). A reward that does not apply to
a row (a call reward where text is right) is None: TRL leaves it out of that completion's
weighted sum and out of the function's logged mean.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from tuneserve.tool_calls.formats import COMPACT, HERMES, ToolFormat
from tuneserve.tool_calls.parse import ParsedOutput, parse_output

FORMATS: dict[str, ToolFormat] = {f.name: f for f in (COMPACT, HERMES)}

Rewards = list[float | None]


def _text(completion: Any) -> str:
    """A text completion, or a conversational one ([{"role": "assistant", "content": ...}])."""
    if isinstance(completion, str):
        return completion
    return "".join(turn.get("content") or "" for turn in completion)


def _parsed(completions: Sequence[Any], tool_format: Sequence[str], tool_names: Sequence[Sequence[str]]) -> list[ParsedOutput]:
    return [parse_output(_text(c), FORMATS[f], names or ()) for c, f, names in zip(completions, tool_format, tool_names)]


def _arguments(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else {}


def parses(
    completions: Sequence[Any], tool_format: Sequence[str], tool_names: Sequence[Sequence[str]],
    expected_name: Sequence[str | None], **_: Any,
) -> Rewards:
    """Format: 1 when the completion is a call to an offered tool with a JSON object as
    arguments (not cut off at max_completion_length, which the gateway would still send
    as a call), else 0."""
    answers = _parsed(completions, tool_format, tool_names)
    return [
        None if name is None else float(bool(a.calls) and all(isinstance(c.arguments_value(), dict) for c in a.calls))
        for a, name in zip(answers, expected_name)
    ]


def right_tool(
    completions: Sequence[Any], tool_format: Sequence[str], tool_names: Sequence[Sequence[str]],
    expected_name: Sequence[str | None], **_: Any,
) -> Rewards:
    """1 when the (first) call names the expected tool, else 0."""
    answers = _parsed(completions, tool_format, tool_names)
    return [
        None if name is None else float(bool(a.calls) and a.calls[0].name == name)
        for a, name in zip(answers, expected_name)
    ]


def right_arguments(
    completions: Sequence[Any], tool_format: Sequence[str], tool_names: Sequence[Sequence[str]],
    expected_name: Sequence[str | None], expected_arguments: Sequence[Any], **_: Any,
) -> Rewards:
    """Partial credit per argument, on a call to the right tool: the share of the argument
    names (expected and given) whose value is exactly the expected one. An argument the
    model adds counts against it, so listing every guess does not pay."""
    answers = _parsed(completions, tool_format, tool_names)
    rewards: Rewards = []
    for answer, name, expected_json in zip(answers, expected_name, expected_arguments):
        if name is None:
            rewards.append(None)
            continue
        if not answer.calls or answer.calls[0].name != name:
            rewards.append(0.0)
            continue
        got = answer.calls[0].arguments_value()
        given: dict[str, Any] = got if isinstance(got, dict) else {}
        expected = _arguments(expected_json)
        keys = set(expected) | set(given)
        hits = sum(1 for k, v in expected.items() if k in given and given[k] == v)
        rewards.append(hits / len(keys) if keys else 1.0)
    return rewards


def no_call(
    completions: Sequence[Any], tool_format: Sequence[str], tool_names: Sequence[Sequence[str]],
    expected_name: Sequence[str | None], **_: Any,
) -> Rewards:
    """Where the right answer is text: 1 for text, 0 for a call (or for nothing at all)."""
    answers = _parsed(completions, tool_format, tool_names)
    return [
        None if name is not None else float(not a.calls and bool((a.content or "").strip()))
        for a, name in zip(answers, expected_name)
    ]
