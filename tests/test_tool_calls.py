"""Tools and calls as prompt text (tuneserve/tool_calls/render.py): the format training
teaches and eval and the gateway's clients use."""

from __future__ import annotations

import json

from tuneserve.tool_calls.render import TOOLS_INSTRUCTION, call_text, tools_prompt, with_tools

WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
}


def test_tools_are_compact_typed_signatures_after_the_instruction() -> None:
    assert tools_prompt([WEATHER, {"name": "now", "parameters": {}}]).splitlines() == [
        TOOLS_INSTRUCTION,
        "Tools:",
        '- get_weather(city: string, unit?: "celsius"|"fahrenheit"): Current weather for a city.',
        "- now()",
    ]


def test_the_tool_list_joins_the_system_message_or_becomes_one() -> None:
    user = {"role": "user", "content": "Weather in Seoul?"}
    alone = with_tools([user], [WEATHER])
    assert [m["role"] for m in alone] == ["system", "user"] and alone[0]["content"] == tools_prompt([WEATHER])
    joined = with_tools([{"role": "system", "content": "Be brief."}, user], [WEATHER])
    assert joined[0]["content"] == "Be brief.\n\n" + tools_prompt([WEATHER]) and joined[1] == user
    assert with_tools([user], None) == [user] and with_tools([user], []) == [user]


def test_a_call_is_the_json_the_instruction_asks_for() -> None:
    one = {"name": "get_weather", "arguments": {"city": "서울"}}
    assert call_text([one]) == '{"name": "get_weather", "arguments": {"city": "서울"}}'  # not \\u-escaped
    two = [one, {"name": "now", "arguments": {}}]
    assert json.loads(call_text(two)) == two
