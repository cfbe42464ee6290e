"""Tools and calls as plain values, the same for training data, eval and the gateway."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_TOOLS = 128  # OpenAI's limit on `tools` in one request


@dataclass(frozen=True)
class ToolSpec:
    """One function a model may call; `parameters` is its JSON Schema (an object)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False

    def as_prompt(self) -> dict[str, Any]:
        """The bare form our compact system prompt lists (render.tools_prompt)."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def as_openai(self) -> dict[str, Any]:
        """The form chat templates that render `tools` expect (transformers' convention)."""
        return {"type": "function", "function": self.as_prompt()}


@dataclass(frozen=True)
class ToolCall:
    """A call as OpenAI returns it: `arguments` is JSON text, as the model wrote it."""

    id: str
    name: str
    arguments: str

    def arguments_value(self) -> Any:
        """The arguments as a value; text that is not JSON stays text."""
        try:
            return json.loads(self.arguments)
        except json.JSONDecodeError:
            return self.arguments

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
