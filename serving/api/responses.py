"""OpenAI response objects for chat and legacy completions, whole and streamed.

`ChoiceOutput` turns one choice's engine deltas into what OpenAI sends: text, or tool
calls read out of the text by the request's parser, with logprobs. Whole answers feed
the same parser as streams, so the two can never disagree.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from serving.engines.base import TextDelta, TokenLogprob, Usage
from tuneserve.tool_calls.parse import ArgumentsDelta, CallParser, CallStarted, ContentDelta, OutputDelta

Kind = Literal["chat", "completion"]


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _top(entry: TokenLogprob) -> list[dict[str, Any]]:
    return [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in entry.top]


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    content = [
        {"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes), "top_logprobs": _top(e)} for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


class ChoiceOutput:
    """One choice of one answer, as deltas arrive."""

    def __init__(self, index: int, kind: Kind, parser: CallParser | None, logprobs: bool) -> None:
        self.index = index
        self.kind = kind
        self.parser = parser
        self.logprobs = logprobs
        self.finish_reason: str | None = None
        self.content: list[str] = []
        self.calls: list[dict[str, Any]] = []  # OpenAI tool_calls, arguments growing
        self.entries: list[TokenLogprob] = []
        self._pending: list[TokenLogprob] = []  # logprobs not yet sent with a chunk
        self._text_offset = 0
        # Plain answers announce the role at once (the first byte leaves early); one
        # that may turn into calls announces it with its first output, as OpenAI does.
        self.role_sent = False

    # ------------------------------------------------------------------ streaming

    def opening(self) -> dict[str, Any] | None:
        """The role chunk sent before any text, for answers that cannot become calls."""
        if self.kind != "chat" or self.parser is not None:
            return None
        self.role_sent = True
        return self._choice({"role": "assistant", "content": ""})

    def feed(self, delta: TextDelta) -> list[dict[str, Any]]:
        """Choice objects of the chunks this delta makes (possibly none)."""
        if delta.logprobs:
            self.entries.extend(delta.logprobs)
            self._pending.extend(delta.logprobs)
        if self.parser is None:
            return [self._text_choice(delta.text)] if delta.text else []
        return self._outputs(self.parser.feed(delta.text)) if delta.text else []

    def end(self, finish_reason: str) -> list[dict[str, Any]]:
        """The choice's last chunks: held text, then the finish."""
        out = self._outputs(self.parser.finish()) if self.parser is not None else []
        if self._pending:
            out.append(self._text_choice(""))
        self.finish_reason = "tool_calls" if self.calls and finish_reason == "stop" else finish_reason
        delta: dict[str, Any] = {} if self.role_sent or self.kind != "chat" else {"role": "assistant", "content": ""}
        self.role_sent = True
        if self.kind == "chat":
            out.append(self._choice(delta, finish_reason=self.finish_reason))
        else:
            out.append({"index": self.index, "text": "", "logprobs": None, "finish_reason": self.finish_reason})
        return out

    def _outputs(self, outputs: list[OutputDelta]) -> list[dict[str, Any]]:
        chunks = []
        for output in outputs:
            if isinstance(output, ContentDelta):
                chunks.append(self._text_choice(output.text))
            elif isinstance(output, CallStarted):
                self.calls.append(
                    {"id": output.id, "type": "function", "function": {"name": output.name, "arguments": ""}}
                )
                first = {"index": output.index, "id": output.id, "type": "function",
                         "function": {"name": output.name, "arguments": ""}}
                chunks.append(self._choice({"tool_calls": [first]}))
            elif isinstance(output, ArgumentsDelta):
                self.calls[output.index]["function"]["arguments"] += output.text
                chunks.append(self._choice({"tool_calls": [{"index": output.index, "function": {"arguments": output.text}}]}))
        return chunks

    def _take_logprobs(self) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        entries, self._pending = self._pending, []
        if self.kind == "chat":
            return chat_logprobs(entries)
        payload = completion_logprobs(entries, self._text_offset)
        self._text_offset += sum(len(e.token) for e in entries)
        return payload

    def _text_choice(self, text: str) -> dict[str, Any]:
        self.content.append(text)
        if self.kind == "chat":
            return self._choice({"content": text})
        return {"index": self.index, "text": text, "logprobs": self._take_logprobs(), "finish_reason": None}

    def _choice(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        if not self.role_sent:
            delta = {"role": "assistant", **({"content": None} if "tool_calls" in delta else {}), **delta}
            self.role_sent = True
        return {"index": self.index, "delta": delta, "logprobs": self._take_logprobs(), "finish_reason": finish_reason}

    # ------------------------------------------------------------------ whole

    def whole(self) -> dict[str, Any]:
        """The finished choice, as a non-streamed answer carries it (after end())."""
        text = "".join(self.content)
        logprobs: dict[str, Any] | None = None
        if self.logprobs:
            logprobs = chat_logprobs(self.entries) if self.kind == "chat" else completion_logprobs(self.entries, 0)
        if self.kind == "completion":
            return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": self.finish_reason}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.calls:
            message["content"] = text if text.strip() else None
            message["tool_calls"] = self.calls
        return {"index": self.index, "message": message, "logprobs": logprobs, "finish_reason": self.finish_reason}


@dataclass
class ResponseFormatter:
    kind: Kind
    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def _object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def _base(self, chunk: bool) -> dict[str, Any]:
        obj = self._object + (".chunk" if chunk and self.kind == "chat" else "")
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, choices: list[ChoiceOutput], usage: Usage) -> dict[str, Any]:
        return {**self._base(False), "choices": [c.whole() for c in choices], "usage": usage_dict(usage)}

    def chunk(self, choices: list[dict[str, Any]]) -> bytes:
        return sse({**self._base(True), "choices": choices})

    def chunks(self, choices: list[dict[str, Any]]) -> bytes:
        """One SSE event per choice object, as OpenAI streams them."""
        return b"".join(self.chunk([c]) for c in choices)

    def usage_chunk(self, usage: Usage) -> bytes:
        return sse({**self._base(True), "choices": [], "usage": usage_dict(usage)})
