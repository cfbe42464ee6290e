"""Function calling and structured outputs through the gateway, with the official openai
client, on the llama.cpp engine (and on vLLM in test_tool_calling_vllm.py)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel, Field

from tests.support.servers import MODEL, ServerProcess

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a timezone.",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
    },
}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    # Bounded, so even a noisy adapter's answer closes within max_tokens.
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=100_000_000)


def _call(message: Any) -> tuple[str, Any]:
    assert message.tool_calls, message
    call = message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    return call.function.name, json.loads(call.function.arguments)


def test_required_tool_choice_always_gives_a_call(client: OpenAI) -> None:
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
            temperature=1.0, seed=seed, max_tokens=80, parallel_tool_calls=False,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        name, arguments = _call(choice.message)
        assert name in {"get_weather", "get_time"}
        required = "city" if name == "get_weather" else "timezone"
        assert isinstance(arguments[required], str)


def test_named_tool_choice_forces_that_tool(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    name, arguments = _call(r.choices[0].message)
    assert name == "get_time" and set(arguments) == {"timezone"}
    assert len(r.choices[0].message.tool_calls) == 1


def test_streamed_calls_follow_openais_delta_sequence(client: OpenAI) -> None:
    request: Any = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80)
    whole = client.chat.completions.create(**request)
    deltas = []
    finish = None
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            if choice.delta.tool_calls:
                deltas.extend(choice.delta.tool_calls)
            assert not choice.delta.content
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert rest and all(d.id is None and d.function.name is None and d.index == 0 for d in rest)
    arguments = "".join(d.function.arguments for d in rest)
    assert arguments == whole.choices[0].message.tool_calls[0].function.arguments
    json.loads(arguments)


def test_the_sdk_stream_helper_reassembles_calls(client: OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80
    ) as stream:
        final = stream.get_final_completion()
    name, arguments = _call(final.choices[0].message)
    assert name == "get_weather" and "city" in arguments


def test_structured_output_with_a_pydantic_model(client: OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe Paris as JSON: name, country, population."}],
        response_format=City,
        temperature=0,
        max_tokens=80,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name


def test_json_object_response_format_parses(client: OpenAI) -> None:
    for seed in range(2):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
            response_format={"type": "json_object"}, temperature=1.0, seed=seed, max_tokens=60,
        )
        choice = r.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content or ""), dict)


def test_conversation_with_calls_and_results(client: OpenAI) -> None:
    messages: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21, "sky": "sunny"}'},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=30)
    assert r.choices[0].finish_reason in {"stop", "length"}
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_tool_choice_none_never_parses_calls(client: OpenAI) -> None:
    # The model is told how to call, but the client said none: whatever it writes is text.
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=40)
    assert r.choices[0].message.tool_calls is None


def test_auto_lets_the_model_choose(client: OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=60)
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        json.loads(choice.message.tool_calls[0].function.arguments)
    else:
        assert choice.message.content is not None and choice.finish_reason in {"stop", "length"}


BAD_TOOL_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "contentEncoding": "base64"}}}}}]},
     "tools.0.function.parameters.properties.x"),
    ({"tools": [{"type": "function", "function": {"name": f"t{i}"}} for i in range(129)]}, "tools"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "21C"}]}, "messages.1.tool_call_id"),
    ({"messages": [*ASK, {"role": "tool", "content": "21C"}]}, "messages.1.tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages.0.content"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{city"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"functions": [WEATHER["function"]]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}}}},
     "response_format.json_schema.schema"),  # xgrammar cannot compile a lookbehind
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"42": 101}}, "logit_bias"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
]


@pytest.mark.parametrize(("change", "param"), BAD_TOOL_REQUESTS)
def test_bad_tool_requests_name_the_field(llama_gateway: ServerProcess, change: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **change}
    r = httpx.post(llama_gateway.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert "/" not in error["message"] or "http" in error["message"]


def test_sdk_sees_a_bad_request(client: OpenAI) -> None:
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, WEATHER])
    assert info.value.body["param"] == "tools.1.function.name"
