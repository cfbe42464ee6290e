"""OpenAI response objects for chat and legacy completions, whole and streamed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from serving.engines.base import Usage


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


@dataclass
class ResponseFormatter:
    kind: Literal["chat", "completion"]
    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def _object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def _base(self, chunk: bool) -> dict[str, Any]:
        obj = self._object + (".chunk" if chunk and self.kind == "chat" else "")
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base(False), "choices": [choice], "usage": usage_dict(usage)}

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> bytes:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            if finish_reason is not None and not text and not first:
                delta = {}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return sse({**self._base(True), "choices": [choice]})

    def usage_chunk(self, usage: Usage) -> bytes:
        return sse({**self._base(True), "choices": [], "usage": usage_dict(usage)})
