"""How a conversation with tools, calls and tool results becomes chat-template input,
chosen per base model.

- `CompactFormat`, for templates that cannot render `tools` (SmolLM2's): the tool list
  joins the system message as compact signatures (render.py), a call is the bare JSON
  object `{"name", "arguments"}` (a list of them for parallel calls) and a tool result
  is a `tool` turn.
- `HermesFormat`, for templates that render `tools` themselves and answer calls inside
  `<tool_call>` tags (Hermes, Qwen2.5): the template gets `tools` and structured
  `tool_calls`, and a call is `<tool_call>\\n{json}\\n</tool_call>`.

Training (training/data.py), `tuneserve eval` and the gateway all go through `render`,
so a request is the same prompt tokens everywhere, and an adapter is asked what it
learned.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from tuneserve.tool_calls.render import call_text as compact_call_text
from tuneserve.tool_calls.render import with_tools
from tuneserve.tool_calls.spec import ToolCall, ToolSpec


@dataclass(frozen=True)
class RenderedChat:
    """What a chat template gets: its `messages` and, for templates that render them, `tools`."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None

    def template_kwargs(self) -> dict[str, Any]:
        return {"tools": self.tools} if self.tools else {}


def _call_object(call: ToolCall) -> dict[str, Any]:
    return {"name": call.name, "arguments": call.arguments_value()}


class ToolFormat(abc.ABC):
    """One model family's tool protocol. Subclasses are stateless singletons."""

    name: str
    # Text around one call's JSON object, as the model writes it: the parser looks for
    # it and the grammar forces it.
    call_open: str = ""
    call_close: str = ""
    # Between parallel calls, and around all of them (compact: a JSON list).
    calls_open: str = ""
    calls_separator: str = ""
    calls_close: str = ""

    @abc.abstractmethod
    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec] | None) -> RenderedChat:
        """Messages are OpenAI-shaped: `role`, `content` (str or None), an assistant's
        `tool_calls` (ToolCall values) and a tool turn's `tool_call_id`."""

    @abc.abstractmethod
    def call_text(self, calls: Sequence[ToolCall]) -> str:
        """An assistant turn that makes these calls, as the model is taught to write it."""


class CompactFormat(ToolFormat):
    name = "compact"
    calls_open, calls_separator, calls_close = "[", ", ", "]"

    def call_text(self, calls: Sequence[ToolCall]) -> str:
        return compact_call_text([_call_object(c) for c in calls])

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec] | None) -> RenderedChat:
        out: list[dict[str, Any]] = []
        for message in messages:
            role, content = message["role"], message.get("content") or ""
            if role == "assistant" and message.get("tool_calls"):
                calls = self.call_text(message["tool_calls"])
                content = f"{content}\n{calls}" if content else calls
            out.append({"role": "system" if role == "developer" else role, "content": content})
        return RenderedChat(with_tools(out, [t.as_prompt() for t in tools or ()]))


class HermesFormat(ToolFormat):
    name = "hermes"
    call_open, call_close = "<tool_call>\n", "\n</tool_call>"
    calls_separator = "\n"

    def call_text(self, calls: Sequence[ToolCall]) -> str:
        return self.calls_separator.join(
            self.call_open + json.dumps(_call_object(c), ensure_ascii=False) + self.call_close for c in calls
        )

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec] | None) -> RenderedChat:
        out: list[dict[str, Any]] = []
        for message in messages:
            role = "system" if message["role"] == "developer" else message["role"]
            turn: dict[str, Any] = {"role": role, "content": message.get("content") or ""}
            if message.get("tool_calls"):
                # transformers' convention: arguments as a mapping, the template writes the JSON.
                turn["tool_calls"] = [
                    {"type": "function", "function": _call_object(c), "id": c.id} for c in message["tool_calls"]
                ]
            if role == "tool" and message.get("tool_call_id"):
                turn["tool_call_id"] = message["tool_call_id"]
            out.append(turn)
        return RenderedChat(out, [t.as_openai() for t in tools] if tools else None)


COMPACT = CompactFormat()
HERMES = HermesFormat()


def format_for_template(source: str) -> ToolFormat:
    """The protocol a chat template speaks: Hermes when it renders `tools` and answers in
    `<tool_call>` tags, our compact one otherwise (SmolLM2)."""
    if "tools" in source and "<tool_call>" in source:
        return HERMES
    return COMPACT
