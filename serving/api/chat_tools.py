"""What a chat request's tools, tool history and response_format ask of the engines.

The gateway owns function calling, not the engines: it renders the conversation in the
base model's tool format (tool_calls/formats.py, the one training uses), builds the one
grammar both engines constrain decoding with, and parses what comes back
(tool_calls/parse.py). So a tenant's adapter answers the same on vLLM and llama.cpp.
Every rule here that OpenAI enforces is a 400 naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from serving.api.schemas import ChatCompletionRequest, NamedToolChoice
from serving.errors import InvalidRequest
from tuneserve.tool_calls.formats import RenderedChat, ToolFormat
from tuneserve.tool_calls.grammar import (
    GrammarError,
    call_grammar,
    check_compiles,
    json_object_grammar,
    json_schema_grammar,
)
from tuneserve.tool_calls.parse import CallParser
from tuneserve.tool_calls.schema_subset import UnsupportedSchema, check_schema
from tuneserve.tool_calls.spec import ToolCall, ToolSpec


@dataclass(frozen=True)
class CallParsing:
    """How to read calls out of this request's answers (absent: all text is content)."""

    fmt: ToolFormat
    tool_names: frozenset[str]
    parallel: bool

    def parser(self) -> CallParser:
        return CallParser(self.fmt, self.tool_names, self.parallel)


@dataclass(frozen=True)
class ChatPlan:
    rendered: RenderedChat
    grammar: str | None
    parsing: CallParsing | None


def plan_chat(body: ChatCompletionRequest, fmt: ToolFormat) -> ChatPlan:
    messages = _conversation(body)
    tools = _tools(body)
    choice = body.tool_choice
    if not tools:
        for field in ("tool_choice", "parallel_tool_calls"):
            if getattr(body, field) is not None:
                raise InvalidRequest(
                    f"Invalid value for '{field}': '{field}' is only allowed when 'tools' are specified.", param=field
                )
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.name for t in tools}:
        raise InvalidRequest(
            f"Invalid value for 'tool_choice': no tool named '{choice.function.name}' is in 'tools'.",
            param="tool_choice",
        )
    calling = bool(tools) and choice != "none"
    parallel = body.parallel_tool_calls is not False
    wants_json = body.response_format is not None and body.response_format.type != "text"
    if calling and wants_json:
        raise InvalidRequest(
            "Invalid value for 'response_format': a JSON response_format cannot be combined with tools the "
            "model may call; set tool_choice to 'none' or drop response_format.",
            param="response_format",
        )
    grammar: str | None = None
    param = "tools"
    try:
        if isinstance(choice, NamedToolChoice):
            param = "tool_choice"
            [at] = [i for i, t in enumerate(tools) if t.name == choice.function.name]
            grammar = call_grammar(fmt, [tools[at]], parallel=False, params=[f"tools.{at}.function.parameters"])
        elif calling and choice == "required":
            params = [f"tools.{i}.function.parameters" for i in range(len(tools))]
            grammar = call_grammar(fmt, tools, parallel, params=params)
        elif body.response_format is not None and body.response_format.type == "json_object":
            param = "response_format"
            grammar = json_object_grammar()
        elif body.response_format is not None and body.response_format.type == "json_schema":
            param = "response_format.json_schema.schema"
            schema = body.response_format.json_schema.json_schema
            _check_schema(schema, param)
            grammar = json_schema_grammar(schema, param)
        if grammar is not None:
            check_compiles(grammar, param)
    except GrammarError as exc:
        # The message names the field already ("<param>: what").
        raise InvalidRequest(f"Invalid value: {exc}", param=exc.param or param) from exc
    parsing = None
    if calling:
        names = frozenset([choice.function.name] if isinstance(choice, NamedToolChoice) else [t.name for t in tools])
        parsing = CallParsing(fmt, names, parallel and not isinstance(choice, NamedToolChoice))
    return ChatPlan(fmt.render(messages, tools), grammar, parsing)


def _tools(body: ChatCompletionRequest) -> list[ToolSpec]:
    tools: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(body.tools or ()):
        fn = tool.function
        if fn.name in seen:
            raise InvalidRequest(
                f"Invalid value for 'tools.{i}.function.name': the name '{fn.name}' is used by an earlier tool.",
                param=f"tools.{i}.function.name",
            )
        seen.add(fn.name)
        parameters = fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}
        _check_schema(parameters, f"tools.{i}.function.parameters", object_root=True)
        tools.append(ToolSpec(fn.name, fn.description or "", parameters, bool(fn.strict)))
    return tools


def _check_schema(schema: dict[str, Any], param: str, object_root: bool = False) -> None:
    try:
        check_schema(schema, param, object_root=object_root)
    except UnsupportedSchema as exc:
        raise InvalidRequest(f"Invalid schema: {exc}", param=exc.param) from exc


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)


def _conversation(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """OpenAI messages as formats.render takes them, each role's rules checked."""
    out: list[dict[str, Any]] = []
    called: set[str] = set()
    for i, message in enumerate(body.messages):
        at = f"messages.{i}"
        role, text = message.role, message.text()
        if message.tool_calls is not None and role != "assistant":
            raise InvalidRequest("Invalid parameter: only assistant messages carry 'tool_calls'.", param=f"{at}.tool_calls")
        if message.tool_call_id is not None and role != "tool":
            raise InvalidRequest("Invalid parameter: only tool messages carry 'tool_call_id'.", param=f"{at}.tool_call_id")
        turn: dict[str, Any] = {"role": role, "content": text}
        if role == "assistant":
            calls = _calls(message.tool_calls or [], at)
            if text is None and not calls:
                raise _missing(f"{at}.content")
            called.update(c.id for c in calls)
            if calls:
                turn["tool_calls"] = calls
        else:
            if text is None:
                raise _missing(f"{at}.content")
            if role == "tool":
                if message.tool_call_id is None:
                    raise _missing(f"{at}.tool_call_id")
                if message.tool_call_id not in called:
                    raise InvalidRequest(
                        f"Invalid parameter: messages with role 'tool' must be a response to a preceding message "
                        f"with 'tool_calls'; no call has the id '{message.tool_call_id}'.",
                        param=f"{at}.tool_call_id",
                    )
                turn["tool_call_id"] = message.tool_call_id
        out.append(turn)
    return out


def _calls(params: list[Any], at: str) -> list[ToolCall]:
    calls = []
    for j, call in enumerate(params):
        try:
            json.loads(call.function.arguments)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(
                f"Invalid value for '{at}.tool_calls.{j}.function.arguments': not valid JSON ({exc.msg}).",
                param=f"{at}.tool_calls.{j}.function.arguments",
            ) from exc
        calls.append(ToolCall(call.id, call.function.name, call.function.arguments))
    return calls
