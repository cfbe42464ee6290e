"""Tools and calls as prompt text, for chat templates that cannot render `tools` themselves
(SmolLM2's cannot): the tool list goes into the system message as compact typed
signatures after a fixed instruction, and a call is the JSON object the instruction asks
for. Training, `tuneserve eval` and a gateway client render them the same way, so what an
adapter learned is what it is asked at serving time.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

# The instruction that precedes the tool list when the chat template cannot render
# `tools` itself (SmolLM2's cannot). Training and `tuneserve eval` use the same
# words, and a client of the gateway sends the same system prompt (see README).
TOOLS_INSTRUCTION = (
    "You can call these tools. To call one, answer with only a JSON object "
    '{"name": <tool name>, "arguments": {<argument>: <value>}}.'
)


def tools_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """A compact, typed signature per tool: short prompts matter for small models."""
    lines = [TOOLS_INSTRUCTION, "Tools:"]
    for tool in tools:
        params = tool.get("parameters") or {}
        required = set(params.get("required", []))
        args = []
        for name, schema in (params.get("properties") or {}).items():
            schema = schema if isinstance(schema, dict) else {}
            kind = "|".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"]) if "enum" in schema else schema.get("type", "any")
            args.append(f"{name}{'' if name in required else '?'}: {kind}")
        description = f": {tool['description']}" if tool.get("description") else ""
        lines.append(f"- {tool['name']}({', '.join(args)}){description}")
    return "\n".join(lines)


def with_tools(messages: list[dict[str, str]], tools: Sequence[dict[str, Any]] | None) -> list[dict[str, str]]:
    """Put the tool list into the system message (SmolLM2's template ignores `tools`)."""
    if not tools:
        return messages
    text = tools_prompt(tools)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def call_text(calls: Sequence[dict[str, Any]]) -> str:
    """An assistant turn that calls tools: one `{"name", "arguments"}` object, or a list
    of them for parallel calls."""
    return json.dumps(calls[0] if len(calls) == 1 else list(calls), ensure_ascii=False)
