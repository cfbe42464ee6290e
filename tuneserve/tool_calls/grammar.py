"""One decoding grammar per request, as xgrammar EBNF text: vLLM takes it as a
structured-output `grammar` and the llama.cpp engine compiles it with xgrammar against
the GGUF vocabulary, so both engines are held to the same language.

- `call_grammar`: `tool_choice` `required` (all tools) or a named tool (pass that one):
  the call text of the tool format (formats.py), `{"name": "<tool>", "arguments":
  <its parameters>}` with name first and json.dumps's separators, which is the text
  training teaches (render.py), inside the format's call tags; one call, or with
  `parallel` one or more (compact: a single object or a JSON list; tagged: blocks
  joined by the separator).
- `json_object_grammar`, `json_schema_grammar`: `response_format`.

Arguments and schemas go through xgrammar's JSON Schema converter, after
schema_subset.check_schema has refused what it would not enforce; the pieces are put
together as an xgrammar structural tag, which keeps each tool's `$defs` and `$ref`s in
their own rules. Whitespace is not free (any_whitespace=False): a model left to
choose drifts into spaces and newlines it never saw in training, and unbounded
whitespace is how constrained decoding runs away to max_tokens.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import xgrammar as xg
from xgrammar import structural_tag as st

from tuneserve.tool_calls.formats import ToolFormat
from tuneserve.tool_calls.schema_subset import GrammarError, UnsupportedSchema, check_schema
from tuneserve.tool_calls.spec import ToolSpec

__all__ = ["GrammarError", "UnsupportedSchema", "call_grammar", "check_compiles", "json_object_grammar", "json_schema_grammar"]

_NO_ARGUMENTS = {"type": "object", "properties": {}}
_CACHE = 256  # distinct tool sets and schemas kept built; requests repeat them


def _schema_ebnf(schema: dict[str, Any], param: str, strict: bool = True) -> str:
    try:
        grammar = xg.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=strict)
    except Exception as exc:  # xgrammar raises RuntimeError with its C++ message
        raise GrammarError(f"{param}: the schema cannot be turned into a grammar: {_reason(exc)}", param) from exc
    return str(grammar)


def _reason(exc: Exception) -> str:
    # xgrammar's messages start with "[time] file.cc:line: "; the rest is for the user.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


def _const(text: str) -> st.ConstStringFormat:
    return st.ConstStringFormat(value=text)


def _sequence(*parts: st.Format) -> st.Format:
    kept = [p for p in parts if not (isinstance(p, st.ConstStringFormat) and not p.value)]
    return kept[0] if len(kept) == 1 else st.SequenceFormat(elements=kept)


def _either(parts: Sequence[st.Format]) -> st.Format:
    return parts[0] if len(parts) == 1 else st.OrFormat(elements=list(parts))


def _to_ebnf(fmt: st.Format, param: str) -> str:
    try:
        text = str(xg.Grammar.from_structural_tag(st.StructuralTag(format=fmt)))
    except Exception as exc:
        raise GrammarError(f"{param}: the tools cannot be turned into a grammar: {_reason(exc)}", param) from exc
    check_compiles(text, param)
    return text


@functools.lru_cache(maxsize=_CACHE)
def _call_grammar(fmt: ToolFormat, key: str, parallel: bool) -> str:
    tools: list[tuple[str, dict[str, Any], str]] = json.loads(key)
    calls = []
    for name, parameters, param in tools:
        check_schema(parameters, param, object_root=True)
        arguments = _schema_ebnf(parameters or _NO_ARGUMENTS, param)
        head = '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
        calls.append(_sequence(_const(head), st.GrammarFormat(grammar=arguments), _const("}")))
    call = _either(calls)
    one = _sequence(_const(fmt.call_open), call, _const(fmt.call_close))
    if not parallel:
        return _to_ebnf(one, "tools")
    more = st.PlusFormat(content=_sequence(_const(fmt.calls_separator), one))
    if fmt.calls_open or fmt.calls_close:
        # Compact: one object, or a list of two or more (a list of one is never what
        # render.call_text writes).
        listed = _sequence(_const(fmt.calls_open), one, more, _const(fmt.calls_close))
        return _to_ebnf(st.OrFormat(elements=[one, listed]), "tools")
    return _to_ebnf(_sequence(one, st.StarFormat(content=_sequence(_const(fmt.calls_separator), one))), "tools")


def call_grammar(fmt: ToolFormat, tools: Sequence[ToolSpec], parallel: bool, *, params: Sequence[str] | None = None) -> str:
    """The calls `fmt` writes to these tools. `params`: each tool's request field for
    errors (default `tools[i].function.parameters`, i counting the tools given).
    Raises GrammarError (UnsupportedSchema for a schema outside the subset)."""
    if not tools:
        raise GrammarError("tool_choice forces a call but no tools are given", "tools")
    names = params or [f"tools[{i}].function.parameters" for i in range(len(tools))]
    # Not sort_keys: property order is the order the grammar makes the model write them.
    key = json.dumps([[t.name, t.parameters, p] for t, p in zip(tools, names)], ensure_ascii=False)
    return _call_grammar(fmt, key, parallel)


@functools.lru_cache(maxsize=1)
def json_object_grammar() -> str:
    """Any JSON object (`response_format: json_object`)."""
    return _schema_ebnf({"type": "object"}, "response_format", strict=False)


@functools.lru_cache(maxsize=_CACHE)
def _json_schema_grammar(key: str, param: str) -> str:
    schema = json.loads(key)
    check_schema(schema, param)
    text = _schema_ebnf(schema, param)
    check_compiles(text, param)
    return text


def json_schema_grammar(schema: dict[str, Any], param: str) -> str:
    """Values of `schema` (`response_format: json_schema`); `param` names it in errors,
    e.g. `response_format.json_schema.schema`."""
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"{param} must be a JSON Schema object", param, None)
    return _json_schema_grammar(json.dumps(schema, ensure_ascii=False), param)


@functools.lru_cache(maxsize=1)
def _compiler() -> xg.GrammarCompiler:
    # An empty vocabulary: the check is the grammar's own, not a model's (cheap).
    return xg.GrammarCompiler(xg.TokenizerInfo([]), cache_enabled=False)


def check_compiles(ebnf: str, param: str) -> None:
    """Raise GrammarError unless xgrammar parses and compiles `ebnf`."""
    try:
        _compiler().compile_grammar(xg.Grammar.from_ebnf(ebnf))
    except Exception as exc:
        raise GrammarError(f"{param}: the grammar does not compile: {_reason(exc)}", param) from exc
