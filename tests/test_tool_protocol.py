"""The tool protocol below the API: model text into OpenAI tool calls (parse.py), the
decoding grammar both engines get (grammar.py), the JSON Schema subset it enforces
(schema_subset.py) and the Hermes-style chat template the second format is tested
with. Real xgrammar, no model: fast unit tests."""

from __future__ import annotations

import enum
import json
import random
import time
from datetime import date
from pathlib import Path
from typing import Any, Literal

import pytest
import xgrammar as xg
from openai.lib._parsing._completions import type_to_response_format_param
from pydantic import BaseModel

from tuneserve.models.chat_template import ChatTemplate
from tuneserve.tool_calls.formats import COMPACT, HERMES, ToolFormat, format_for_template
from tuneserve.tool_calls.grammar import (
    GrammarError,
    UnsupportedSchema,
    call_grammar,
    check_compiles,
    json_object_grammar,
    json_schema_grammar,
)
from tuneserve.tool_calls.parse import (
    ArgumentsDelta,
    CallParser,
    CallStarted,
    ContentDelta,
    OutputDelta,
    ParsedOutput,
    parse_output,
)
from tuneserve.tool_calls.schema_subset import MAX_DEPTH, check_schema
from tuneserve.tool_calls.spec import ToolCall, ToolSpec

WEATHER = ToolSpec(
    "get_weather",
    "Current weather for a city.",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
)
NOW = ToolSpec("now", "The time.", {"type": "object", "properties": {}})
TREE = ToolSpec(
    "plant",
    "A tree of nodes ($ref recursion).",
    {
        "$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["kids"]}},
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/node"}},
        "required": ["root"],
    },
)
TOOLS = [WEATHER, NOW, TREE]
NAMES = [t.name for t in TOOLS]

# ---------------------------------------------------------------------------- parser


def stream(text: str, fmt: ToolFormat, sizes: list[int] | None = None, parallel: bool = True) -> list[OutputDelta]:
    """Feed `text` in chunks of the given sizes (cycled), then finish."""
    parser = CallParser(fmt, NAMES, parallel)
    out: list[OutputDelta] = []
    i, k = 0, 0
    while i < len(text):
        size = sizes[k % len(sizes)] if sizes else 1
        out += parser.feed(text[i : i + size])
        i, k = i + size, k + 1
    return out + parser.finish()


def summary(parsed: ParsedOutput) -> tuple[str | None, list[tuple[str, str]]]:
    return parsed.content, [(c.name, c.arguments) for c in parsed.calls]


def collected(deltas: list[OutputDelta]) -> tuple[str | None, list[tuple[str, str]]]:
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    heads = [d for d in deltas if isinstance(d, CallStarted)]
    args = ["".join(d.text for d in deltas if isinstance(d, ArgumentsDelta) and d.index == h.index).strip() for h in heads]
    calls = [(h.name, a) for h, a in zip(heads, args)]
    return (None if calls and not content.strip() else content), calls


def assert_openai_sequence(deltas: list[OutputDelta]) -> None:
    """OpenAI's streamed tool calls: per call one head (index, id, name), then only its
    argument fragments; indices contiguous from 0; ids unique."""
    current = -1
    ids = set()
    for d in deltas:
        if isinstance(d, CallStarted):
            assert d.index == current + 1 and d.id.startswith("call_") and d.id not in ids and d.name in NAMES
            ids.add(d.id)
            current = d.index
        elif isinstance(d, ArgumentsDelta):
            assert d.index == current and d.text
        else:
            assert current == -1, "content after a call went out"
            assert d.text


COMPACT_CASES = {
    "call": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "leading whitespace": '\n  {"name": "now", "arguments": {}}',
    "korean": '{"name": "get_weather", "arguments": {"city": "서울", "note": "맑음 ☀"}}',
    "escapes and braces in strings": r'{"name": "get_weather", "arguments": {"city": "a \"}{\" b\\", "u": "\u00e9]["}}',
    "other json whitespace": '{ "name" :"get_weather" ,\n"arguments":\t{"city":"Oslo"} }',
    "nested arguments": '{"name": "plant", "arguments": {"root": {"kids": [{"kids": []}, {"kids": [{"kids": []}]}]}}}',
    "parallel list": '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]',
    "arguments first": '{"arguments": {"city": "Rome"}, "name": "get_weather"}',
    "trailing text dropped": '{"name": "now", "arguments": {}}\nHope that helps!',
    "truncated": '{"name": "get_weather", "arguments": {"city": "Par',
    "truncated list": '[{"name": "now", "arguments": {}}, {"name": "get_weather", "argu',
    "prose": "The weather in Paris is sunny.",
    "prose with braces": "{curly} braces and [brackets]",
    "json that is not a call": '{"answer": 42, "name": "get_weather"}',
    "name only": '{"name": "get_weather"}',
    "unknown tool": '{"name": "get_time", "arguments": {}}',
    "name is not a string": '{"name": 3, "arguments": {}}',
    "list that is not calls": "[1, 2, 3]",
    "list of unknown": '[{"name": "x", "arguments": {}}]',
    "empty": "",
    "whitespace": "  \n",
}

HERMES_CASES = {
    "call": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "content then calls": (
        "Let me look.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "now", "arguments": {}}\n</tool_call>'
    ),
    "no newlines in tags": '<tool_call>{"name": "now", "arguments": {}}</tool_call><tool_call>{"name": "now", "arguments": {}}</tool_call>',
    "content after calls dropped": '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\nDone, calling now.',
    "korean and escapes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "서울 \\"</tool_call>\\""}}\n</tool_call>',
    "truncated": '<tool_call>\n{"name": "get_weather", "arguments": {"ci',
    "unknown tool stays content": '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
    "prose with angle brackets": "If a < b and c <tool d, then <tool_cal is not a tag <",
    "lone tag prefix at the end": "See <tool",
    "unknown then known": 'x <tool_call>{"name": "nope"}</tool_call> then <tool_call>{"name": "now", "arguments": {}}</tool_call>',
    "prose": "Just text.",
    "empty": "",
}


def expected(fmt: ToolFormat, name: str) -> tuple[str | None, list[tuple[str, str]]]:
    table: dict[tuple[str, str], tuple[str | None, list[tuple[str, str]]]] = {
        ("compact", "call"): (None, [("get_weather", '{"city": "Paris"}')]),
        ("compact", "leading whitespace"): (None, [("now", "{}")]),
        ("compact", "korean"): (None, [("get_weather", '{"city": "서울", "note": "맑음 ☀"}')]),
        ("compact", "escapes and braces in strings"): (None, [("get_weather", r'{"city": "a \"}{\" b\\", "u": "\u00e9]["}')]),
        ("compact", "other json whitespace"): (None, [("get_weather", '{"city":"Oslo"}')]),
        ("compact", "nested arguments"): (None, [("plant", '{"root": {"kids": [{"kids": []}, {"kids": [{"kids": []}]}]}}')]),
        ("compact", "parallel list"): (None, [("get_weather", '{"city": "Paris"}'), ("now", "{}")]),
        ("compact", "arguments first"): (None, [("get_weather", '{"city": "Rome"}')]),
        ("compact", "trailing text dropped"): (None, [("now", "{}")]),
        ("compact", "truncated"): (None, [("get_weather", '{"city": "Par')]),
        ("compact", "truncated list"): (None, [("now", "{}")]),
        ("compact", "empty"): ("", []),
        ("hermes", "call"): (None, [("get_weather", '{"city": "Paris"}')]),
        ("hermes", "content then calls"): ("Let me look.", [("get_weather", '{"city": "Paris"}'), ("now", "{}")]),
        ("hermes", "no newlines in tags"): (None, [("now", "{}"), ("now", "{}")]),
        ("hermes", "content after calls dropped"): (None, [("now", "{}")]),
        ("hermes", "korean and escapes"): (None, [("get_weather", '{"city": "서울 \\"</tool_call>\\""}')]),
        ("hermes", "truncated"): (None, [("get_weather", '{"ci')]),
        ("hermes", "unknown then known"): ('x <tool_call>{"name": "nope"}</tool_call> then', [("now", "{}")]),
        ("hermes", "empty"): ("", []),
    }
    cases = COMPACT_CASES if fmt is COMPACT else HERMES_CASES
    return table.get((fmt.name, name), (cases[name], []))  # not a call: all of it is content


@pytest.mark.parametrize(
    "fmt,name", [(COMPACT, n) for n in COMPACT_CASES] + [(HERMES, n) for n in HERMES_CASES], ids=lambda v: getattr(v, "name", v)
)
def test_whole_and_streamed_answers_are_the_same_calls(fmt: ToolFormat, name: str) -> None:
    text = (COMPACT_CASES if fmt is COMPACT else HERMES_CASES)[name]
    whole = parse_output(text, fmt, NAMES)
    assert summary(whole) == expected(fmt, name)
    rng = random.Random(name)
    chunkings: list[list[int] | None] = [None, [2], [3], [7], [len(text) or 1]] + [[rng.randint(1, 9) for _ in range(20)] for _ in range(5)]
    for sizes in chunkings:
        deltas = stream(text, fmt, sizes)
        assert_openai_sequence(deltas)
        assert collected(deltas) == summary(whole), sizes


FUZZ_PIECES = ['{', '}', '[', ']', '"', "\\", ":", ",", " ", "\n", '"name"', '"arguments"', '"get_weather"', '"now"', "<tool_call>", "</tool_call>", "<", "x", "서", '{"city": "Paris"}']


def test_any_text_in_any_chunks_parses_the_same() -> None:
    # Cut, spliced and random texts: chunk boundaries anywhere (inside escapes, tags,
    # keys) change nothing, and text with no call comes back whole as content.
    rng = random.Random(18)
    known = list(COMPACT_CASES.values()) + list(HERMES_CASES.values())
    for _ in range(1500):
        if rng.random() < 0.5:
            text = "".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(0, 12)))
        else:
            chars = list(rng.choice(known)[: rng.randint(0, 120)])
            for _ in range(rng.randint(0, 2)):
                if chars:
                    chars[rng.randrange(len(chars))] = rng.choice(FUZZ_PIECES)
            text = "".join(chars)
        for fmt in (COMPACT, HERMES):
            parallel = rng.random() < 0.7
            whole = summary(parse_output(text, fmt, NAMES, parallel))
            deltas = stream(text, fmt, [rng.randint(1, 6) for _ in range(8)], parallel)
            assert_openai_sequence(deltas)
            assert collected(deltas) == whole, text
            if not whole[1]:
                assert whole[0] == text


def test_a_call_streams_as_it_is_written() -> None:
    parser = CallParser(COMPACT, NAMES)
    assert parser.feed('{"name": "get_weather", ') == []  # could still be a call: held
    head = parser.feed('"arguments":')
    assert len(head) == 1 and isinstance(head[0], CallStarted) and (head[0].index, head[0].name) == (0, "get_weather")
    assert parser.feed(' {"city": "Pa') == [ArgumentsDelta(0, '{"city": "Pa')]
    assert parser.feed('ris"}}') == [ArgumentsDelta(0, 'ris"}')]
    assert parser.finish() == [] and parser.calls_made == 1


def test_text_that_cannot_be_a_call_is_not_held() -> None:
    parser = CallParser(COMPACT, NAMES)
    assert parser.feed("Hel") == [ContentDelta("Hel")]
    parser = CallParser(COMPACT, NAMES)
    assert parser.feed('  {"answer"') == [ContentDelta('  {"answer"')]  # a json_object answer
    assert parser.feed(": 42}") == [ContentDelta(": 42}")]
    hermes = CallParser(HERMES, NAMES)
    assert hermes.feed("a <") == [ContentDelta("a")]  # " <" may begin a tag
    assert hermes.feed(" b") == [ContentDelta(" < b")]
    assert hermes.feed(" <tool") == []
    assert hermes.feed("s") == [ContentDelta(" <tools")]
    assert hermes.feed("\n\n") == []  # whitespace before a call is dropped, so it waits
    assert hermes.finish() == [ContentDelta("\n\n")]


def test_parallel_false_keeps_the_first_call_only() -> None:
    text = '[{"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Paris"}}]'
    assert summary(parse_output(text, COMPACT, NAMES, parallel=False)) == (None, [("now", "{}")])
    hermes = HERMES.call_text([ToolCall("a", "now", "{}"), ToolCall("b", "get_weather", '{"city": "Paris"}')])
    assert summary(parse_output(hermes, HERMES, NAMES, parallel=False)) == (None, [("now", "{}")])
    for fmt, t in ((COMPACT, text), (HERMES, hermes)):
        assert collected(stream(t, fmt, [3], parallel=False)) == (None, [("now", "{}")])


def test_calls_get_fresh_ids_and_contiguous_indices() -> None:
    parsed = parse_output(COMPACT_CASES["parallel list"], COMPACT, NAMES)
    assert len({c.id for c in parsed.calls}) == 2 and all(c.id.startswith("call_") for c in parsed.calls)
    deltas = stream(HERMES_CASES["content then calls"], HERMES, [5])
    assert [d.index for d in deltas if isinstance(d, CallStarted)] == [0, 1]


def test_what_render_writes_parses_back() -> None:
    calls = [ToolCall("call_1", "get_weather", '{"city": "서울", "unit": "celsius"}'), ToolCall("call_2", "now", "{}")]
    for fmt in (COMPACT, HERMES):
        for subset in (calls[:1], calls):
            parsed = parse_output(fmt.call_text(subset), fmt, NAMES)
            assert parsed.content is None and [(c.name, c.arguments) for c in parsed.calls] == [(c.name, c.arguments) for c in subset]


def test_long_outputs_parse_in_linear_time() -> None:
    # Fed a character at a time (the worst chunking), four times the text must cost
    # about four times as much; a parser that re-scans its buffer per feed costs 16.
    def seconds(text: str, fmt: ToolFormat) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            parser = CallParser(fmt, NAMES)
            for ch in text:
                parser.feed(ch)
            parser.finish()
            best = min(best, time.perf_counter() - start)
        return best

    def call(n: int) -> str:
        return '{"name": "get_weather", "arguments": {"city": "' + 'x\\"y{' * n + '"}}'

    def prose(n: int) -> str:
        return "word <b> " * n

    for make, fmt in ((call, COMPACT), (prose, HERMES)):
        assert seconds(make(8_000), fmt) < 8 * seconds(make(2_000), fmt)
    value = 'x\\"y{' * 2_000
    assert collected(stream(call(2_000), COMPACT, [1])) == (None, [("get_weather", '{"city": "' + value + '"}')])
    assert collected(stream(prose(2_000), HERMES, [1])) == (prose(2_000), [])


# --------------------------------------------------------------------------- grammar


def accepts(ebnf: str, text: str) -> bool:
    compiler = xg.GrammarCompiler(xg.TokenizerInfo([]), cache_enabled=False)
    matcher = xg.GrammarMatcher(compiler.compile_grammar(xg.Grammar.from_ebnf(ebnf)), terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_terminated()


PARIS = ToolCall("a", "get_weather", '{"city": "Paris"}')
SEOUL = ToolCall("b", "get_weather", '{"city": "서울", "unit": "celsius"}')
CLOCK = ToolCall("c", "now", "{}")
FOREST = ToolCall("d", "plant", '{"root": {"kids": [{"kids": []}]}}')


@pytest.mark.parametrize("fmt", [COMPACT, HERMES], ids=lambda f: f.name)
def test_the_call_grammar_takes_the_call_text_training_teaches(fmt: ToolFormat) -> None:
    single, parallel = call_grammar(fmt, TOOLS, parallel=False), call_grammar(fmt, TOOLS, parallel=True)
    for calls in ([PARIS], [SEOUL], [CLOCK], [FOREST]):
        assert accepts(single, fmt.call_text(calls)) and accepts(parallel, fmt.call_text(calls))
    for calls in ([PARIS, CLOCK], [SEOUL, FOREST, CLOCK]):
        assert accepts(parallel, fmt.call_text(calls)) and not accepts(single, fmt.call_text(calls))


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_time", "arguments": {}}',  # no such tool
        '{"name": "get_weather", "arguments": {}}',  # required city missing
        '{"name": "get_weather", "arguments": {"city": "Paris", "when": "now"}}',  # no such argument
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}',  # not in the enum
        '{"name": "get_weather", "arguments": {"city": 3}}',
        '{"name":"now","arguments":{}}',  # separators other than json.dumps's
        '{ "name": "now", "arguments": {} }',
        '{"name": "now",\n "arguments": {}}',
        '{"name": "get_weather", "arguments": {"city":  "Paris"}}',
        '{"arguments": {}, "name": "now"}',  # name first
        '{"name": "plant", "arguments": {"root": {"kids": [{}]}}}',  # recursive required
        '[{"name": "now", "arguments": {}}]',  # a list of one is never written
        "The time is noon.",
        "",
    ],
)
def test_the_call_grammar_refuses_anything_else(text: str) -> None:
    assert not accepts(call_grammar(COMPACT, TOOLS, parallel=True), text)
    assert not accepts(call_grammar(HERMES, TOOLS, parallel=True), HERMES.call_open + text + HERMES.call_close)


def test_hermes_tags_are_forced() -> None:
    grammar = call_grammar(HERMES, TOOLS, parallel=True)
    body = '{"name": "now", "arguments": {}}'
    assert accepts(grammar, f"<tool_call>\n{body}\n</tool_call>")
    for text in (body, f"<tool_call>{body}</tool_call>", f"Sure. <tool_call>\n{body}\n</tool_call>", f"<tool_call>\n{body}\n</tool_call>\n\n<tool_call>\n{body}\n</tool_call>"):
        assert not accepts(grammar, text)


def test_a_named_tool_is_the_only_call() -> None:
    grammar = call_grammar(COMPACT, [WEATHER], parallel=False)
    assert accepts(grammar, COMPACT.call_text([PARIS])) and not accepts(grammar, COMPACT.call_text([CLOCK]))


def test_the_grammar_masks_tokens_of_a_real_vocabulary() -> None:
    # A character-level vocabulary: after `{"name": "` only the tools' first letters fit.
    vocab = [chr(c) for c in range(32, 127)] + ["\n", "서", "울", '{"name": "', "</s>"]
    info = xg.TokenizerInfo(vocab, stop_token_ids=[len(vocab) - 1])
    compiled = xg.GrammarCompiler(info, cache_enabled=False).compile_grammar(call_grammar(COMPACT, TOOLS, parallel=False))
    matcher = xg.GrammarMatcher(compiled)
    assert matcher.accept_token(vocab.index('{"name": "'))
    bitmask = xg.allocate_token_bitmask(1, info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    allowed = {vocab[i] for i in range(len(vocab)) if (int(bitmask[0, i // 32]) >> (i % 32)) & 1}
    assert allowed == {"g", "n", "p"}
    for ch in 'get_weather", "arguments": {"city": "':
        assert matcher.accept_token(vocab.index(ch))
    assert matcher.accept_token(vocab.index("서")) and matcher.accept_token(vocab.index("울"))
    for ch in '"}}':
        assert matcher.accept_token(vocab.index(ch))
    assert matcher.accept_token(len(vocab) - 1) and matcher.is_terminated()


def test_grammars_are_built_once_per_tool_set() -> None:
    first = call_grammar(HERMES, TOOLS, parallel=True)
    again = call_grammar(HERMES, [ToolSpec(t.name, t.description, json.loads(json.dumps(t.parameters))) for t in TOOLS], parallel=True)
    assert again is first


class Color(str, enum.Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    street: str
    zip_code: str | None


class Person(BaseModel):
    name: str
    age: int
    color: Color
    kind: Literal["customer", "supplier"]
    born: date
    tags: list[str]
    home: Address
    previous: list[Address]
    pair: tuple[int, str]


def parse_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The schema `client.chat.completions.parse(response_format=Model)` sends."""
    param = type_to_response_format_param(model)
    assert isinstance(param, dict) and param["type"] == "json_schema"
    schema: dict[str, Any] = param["json_schema"]["schema"]
    return schema


def test_a_pydantic_models_strict_schema_is_a_grammar() -> None:
    schema = parse_schema(Person)
    check_schema(schema, "response_format.json_schema.schema")
    grammar = json_schema_grammar(schema, "response_format.json_schema.schema")
    person = Person(
        name="Kim", age=41, color=Color.GREEN, kind="customer", born=date(1984, 3, 1), tags=["a"],
        home=Address(street="Main 1", zip_code=None), previous=[Address(street="서울로 2", zip_code="04500")], pair=(1, "x"),
    )
    text = json.dumps(person.model_dump(mode="json"), ensure_ascii=False)
    assert accepts(grammar, text)
    assert Person.model_validate_json(text) == person
    assert not accepts(grammar, text.replace('"green"', '"blue"'))
    assert not accepts(grammar, text.replace('"age": 41', '"age": "41"'))
    assert not accepts(grammar, text.replace('"1984-03-01"', '"March 1st"'))


def test_json_object_is_any_object() -> None:
    grammar = json_object_grammar()
    assert accepts(grammar, '{"answer": [1, {"b": null}], "ok": true}') and accepts(grammar, "{}")
    assert not accepts(grammar, "[1]") and not accepts(grammar, '"text"') and not accepts(grammar, "Sure: {}")


def test_a_grammar_that_does_not_compile_is_a_grammar_error() -> None:
    for text in ("root ::= (", "not a grammar", 'root ::= missing_rule "x"'):
        with pytest.raises(GrammarError) as caught:
            check_compiles(text, "response_format")
        assert caught.value.param == "response_format"


def test_schemas_the_converter_rejects_are_grammar_errors_not_crashes() -> None:
    with pytest.raises(GrammarError) as caught:
        json_schema_grammar({"type": "string", "pattern": "(?<=a)b"}, "response_format.json_schema.schema")
    assert caught.value.param == "response_format.json_schema.schema" and "Lookbehind" in str(caught.value)
    with pytest.raises(GrammarError) as caught:
        json_schema_grammar({"type": "integer", "minimum": 1.5}, "response_format.json_schema.schema")
    with pytest.raises(UnsupportedSchema) as refused:
        call_grammar(COMPACT, [WEATHER, ToolSpec("bad", "", {"type": "object", "properties": {"x": {"not": {}}}})], True)
    assert refused.value.param == "tools[1].function.parameters.properties.x" and refused.value.keyword == "not"
    with pytest.raises(UnsupportedSchema) as refused:
        call_grammar(COMPACT, [ToolSpec("bad", "", {"type": "array"})], False, params=["tools[5].function.parameters"])
    assert refused.value.param == "tools[5].function.parameters" and refused.value.keyword == "type"


# ------------------------------------------------------------------- schema subset

P = "tools[2].function.parameters"


@pytest.mark.parametrize(
    "schema,param,keyword",
    [
        ({"type": "object", "properties": {"city": {"type": "string", "nullable": True}}}, f"{P}.properties.city", "nullable"),
        ({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}, f"{P}.properties.tags", "uniqueItems"),
        ({"type": "object", "properties": {"tags": {"type": "array", "contains": {"type": "string"}}}}, f"{P}.properties.tags", "contains"),
        ({"type": "object", "properties": {"n": {"type": "integer", "not": {"const": 1}}}}, f"{P}.properties.n", "not"),
        ({"type": "object", "properties": {"n": {"type": "integer", "if": {"minimum": 0}, "then": {"maximum": 5}}}}, f"{P}.properties.n", "if"),
        ({"type": "object", "properties": {"a": {"type": "integer"}}, "dependentRequired": {"a": ["b"]}}, P, "dependentRequired"),
        ({"type": "object", "properties": {"x": {"allOf": [{"type": "integer"}, {"minimum": 1}]}}}, f"{P}.properties.x", "allOf"),
        ({"type": "object", "properties": {"x": {"allOf": [{"type": "integer"}], "maximum": 3}}}, f"{P}.properties.x", "maximum"),
        ({"type": "object", "properties": {"x": {"anyOf": [{"type": "integer"}], "type": "integer"}}}, f"{P}.properties.x", "type"),
        ({"$defs": {"d": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/d", "maximum": 3}}}, f"{P}.properties.x", "maximum"),
        ({"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}}, f"{P}.properties.x", "$ref"),
        ({"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}, f"{P}.properties.x", "$ref"),
        ({"type": "object", "properties": {"d": {"type": "string", "format": "idn-email"}}}, f"{P}.properties.d", "format"),
        ({"type": "object", "properties": {"d": {"type": "number", "format": "float"}}}, f"{P}.properties.d", "format"),
        ({"type": "object", "properties": {"d": {"minLength": 2}}}, f"{P}.properties.d", "minLength"),
        ({"type": "object", "properties": {"d": {"type": "strin"}}}, f"{P}.properties.d", "type"),
        ({"type": "object", "properties": {"d": {"enum": [{"a": 1}]}}}, f"{P}.properties.d", "enum"),
        ({"type": "object", "properties": {"d": {"type": "string", "maxLength": -1}}}, f"{P}.properties.d", "maxLength"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, P, "required"),
        ({"type": "object", "properties": {"a": {"type": "array", "prefixItems": [{"type": "string", "contentEncoding": "base64"}]}}}, f"{P}.properties.a.prefixItems[0]", "contentEncoding"),
        ({"type": "object", "$defs": {"d": {"type": "string", "dependentSchemas": {}}}}, f"{P}.$defs.d", "dependentSchemas"),
        ({"type": "object", "properties": {"a": "string"}}, f"{P}.properties.a", None),
        ({"type": "array", "items": {"type": "string"}}, P, "type"),
        ("not a schema", P, None),
    ],
)
def test_a_schema_outside_the_subset_names_the_keyword_and_where(schema: Any, param: str, keyword: str | None) -> None:
    with pytest.raises(UnsupportedSchema) as caught:
        check_schema(schema, P, object_root=True)
    assert (caught.value.param, caught.value.keyword) == (param, keyword)
    assert param in str(caught.value) and (keyword is None or repr(keyword) in str(caught.value))
    assert isinstance(caught.value, GrammarError)


def test_deep_or_huge_schemas_are_refused() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(MAX_DEPTH + 1):
        deep = {"type": "array", "items": deep}
    with pytest.raises(UnsupportedSchema, match="deeper"):
        check_schema(deep, "response_format.json_schema.schema")
    with pytest.raises(UnsupportedSchema, match="too large"):
        check_schema({"type": "string", "enum": [str(i) for i in range(5000)]}, "response_format.json_schema.schema")


# Each supported keyword with a value it must let through and one it must stop: a future
# xgrammar that ignores one fails here, before a client gets output that breaks its schema.
HONOURED = [
    ({"type": "string", "minLength": 2}, '"ab"', '"a"'),
    ({"type": "string", "maxLength": 2}, '"ab"', '"abc"'),
    ({"type": "string", "pattern": "^[a-z]+$"}, '"ab"', '"A1"'),
    ({"type": "string", "format": "date-time"}, '"2024-01-02T10:00:00Z"', '"soon"'),
    ({"type": "string", "format": "email"}, '"a@b.co"', '"a"'),
    ({"type": "string", "format": "uuid"}, '"123e4567-e89b-12d3-a456-426614174000"', '"x"'),
    ({"type": "integer", "minimum": 3}, "3", "2"),
    ({"type": "integer", "exclusiveMaximum": 3}, "2", "3"),
    ({"type": "number", "exclusiveMinimum": 1.5}, "1.6", "1.5"),
    ({"type": "integer", "multipleOf": 2}, "4", "3"),
    ({"type": ["string", "null"]}, "null", "1"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, "[1, 2]", "[1]"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 1}, "[1]", "[1, 2]"),
    ({"type": "array", "prefixItems": [{"type": "string"}], "items": False}, '["a"]', '["a", 1]'),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, '{"a": 1}', "{}"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, '{"a": 1}', '{"a": 1, "b": 2}'),
    ({"type": "object", "additionalProperties": {"type": "string"}}, '{"b": "x"}', '{"b": 2}'),
    ({"type": "object", "minProperties": 1, "additionalProperties": True}, '{"a": 1}', "{}"),
    ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": False}, '{"x": 1}', '{"y": 1}'),
    ({"enum": ["a", 1, None]}, "1", '"b"'),
    ({"const": "a"}, '"a"', '"b"'),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "1", "true"),
    ({"allOf": [{"type": "string"}], "description": "one schema"}, '"a"', "1"),
    ({"definitions": {"n": {"type": "integer"}}, "type": "object", "properties": {"a": {"$ref": "#/definitions/n"}}, "required": ["a"]}, '{"a": 1}', '{"a": "1"}'),
]


@pytest.mark.parametrize("schema,good,bad", HONOURED, ids=[json.dumps(s)[:60] for s, _, _ in HONOURED])
def test_every_supported_keyword_is_enforced(schema: dict[str, Any], good: str, bad: str) -> None:
    grammar = json_schema_grammar(schema, "response_format.json_schema.schema")
    assert accepts(grammar, good) and not accepts(grammar, bad)


# ------------------------------------------------------------------ Hermes template

TEMPLATES = Path(__file__).parent / "templates"
SPECIALS = {"bos_token": "", "eos_token": "<|im_end|>"}
# SmolLM2's template in substance: it never looks at `tools`.
SMOLLM2_LIKE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_the_hermes_template_renders_tools_calls_and_results() -> None:
    source = (TEMPLATES / "hermes.jinja").read_text()
    assert format_for_template(source) is HERMES and format_for_template(SMOLLM2_LIKE) is COMPACT
    calls = [PARIS, CLOCK]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris, and the time?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": PARIS.id, "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": CLOCK.id, "content": "12:00"},
        {"role": "assistant", "content": "21 °C, noon."},
        {"role": "user", "content": "Thanks"},
    ]
    rendered = HERMES.render(messages, [WEATHER, NOW])
    prompt = ChatTemplate(source, SPECIALS).render(rendered.messages, tools=rendered.tools)
    tool_lines = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in (WEATHER, NOW))
    system, rest = prompt.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and f"<tools>\n{tool_lines}\n</tools>" in system
    assert rest == (
        "<|im_start|>user\nWeather in Paris, and the time?<|im_end|>\n"
        "<|im_start|>assistant\n" + HERMES.call_text(calls) + "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\n12:00\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n21 °C, noon.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert HERMES.call_text(calls) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    )
    # What the template teaches is what the parser reads and the grammar allows.
    parsed = parse_output(HERMES.call_text(calls), HERMES, ["get_weather", "now"])
    assert [(c.name, c.arguments) for c in parsed.calls] == [(c.name, c.arguments) for c in calls]
    assert accepts(call_grammar(HERMES, [WEATHER, NOW], parallel=True), HERMES.call_text(calls))


def test_the_hermes_template_without_tools_is_a_plain_chat() -> None:
    source = (TEMPLATES / "hermes.jinja").read_text()
    rendered = HERMES.render([{"role": "user", "content": "Hi"}], None)
    assert ChatTemplate(source, SPECIALS).render(rendered.messages, tools=rendered.tools) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_content = HERMES.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Checking.", "tool_calls": [CLOCK]}], [NOW])
    prompt = ChatTemplate(source, SPECIALS).render(with_content.messages, tools=with_content.tools, add_generation_prompt=False)
    assert prompt.endswith("<|im_start|>assistant\nChecking.\n" + HERMES.call_text([CLOCK]) + "<|im_end|>\n")
    parsed = parse_output("Checking.\n" + HERMES.call_text([CLOCK]), HERMES, ["now"])
    assert parsed.content == "Checking." and [c.name for c in parsed.calls] == ["now"]
