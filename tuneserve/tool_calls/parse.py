"""Model text into OpenAI tool calls: one incremental parser for both engines, streamed
or whole.

`CallParser.feed` takes the text as the engine produces it and answers deltas in
OpenAI's order: content, then per call a `CallStarted` (index, id, name) and the raw
argument text in fragments. `parse_output` is the same parser fed once, so a streamed
answer and a whole one cannot differ.

The formats (formats.py):
- compact (call_open empty): the whole output, after leading whitespace, is one call
  object `{"name": ..., "arguments": ...}` or a JSON list of them; anything else is
  content.
- tagged (Hermes): content, then calls inside call_open/call_close tags; text after the
  calls is dropped.

A call commits once `{"name": "<known tool>", "arguments":` has been read: from then on
the output is calls, so a truncated answer (max_tokens) ends in partial arguments and
trailing text is dropped rather than shown as content after the calls went out.
Before that, text that could still start a call is held, and released as content as
soon as it cannot (at `finish` at the latest).

The scanners below track JSON strings, escapes and nesting themselves, character
class by character class, so each character of the output is looked at once: answers
run to thousands of tokens and re-parsing the buffer per token would be quadratic.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Collection

from tuneserve.tool_calls.formats import ToolFormat
from tuneserve.tool_calls.spec import ToolCall, new_call_id


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStarted:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


OutputDelta = ContentDelta | CallStarted | ArgumentsDelta

_WS = " \t\n\r"
_NOT_WS = re.compile(r"[^ \t\n\r]")
_STRING_STOP = re.compile(r'["\\]')
_STRUCTURE = re.compile(r'["{}\[\]]')
_SCALAR_END = re.compile(r"[ \t\n\r,\]}]")


def _skip_ws(text: str, i: int) -> int:
    m = _NOT_WS.search(text, i)
    return m.start() if m else len(text)


class _ValueExtent:
    """Where one JSON value ends, fed piecewise. It finds the extent only; whether the
    value is valid JSON is json.loads's business where it matters."""

    __slots__ = ("depth", "in_string", "escaped", "scalar", "started")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = self.escaped = self.scalar = self.started = False

    def feed(self, text: str, i: int) -> int | None:
        """Consume text[i:]; the index just past the value's end, or None: it goes on."""
        n = len(text)
        if not self.started:
            self.started = True
            c = text[i]
            if c == '"':
                self.in_string, i = True, i + 1
            elif c in "{[":
                self.depth, i = 1, i + 1
            else:
                self.scalar = True
        if self.scalar:
            m = _SCALAR_END.search(text, i)
            return m.start() if m else None
        if self.escaped and i < n:
            self.escaped, i = False, i + 1
        while i < n:
            if self.in_string:
                m = _STRING_STOP.search(text, i)
                if m is None:
                    return None
                j = m.start()
                if text[j] == "\\":
                    if j + 1 == n:
                        self.escaped = True
                        return None
                    i = j + 2
                    continue
                self.in_string, i = False, j + 1
                if self.depth == 0:
                    return i
                continue
            m = _STRUCTURE.search(text, i)
            if m is None:
                return None
            j = m.start()
            c = text[j]
            if c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                    return j + 1
            i = j + 1
        return None


# Events of _ObjectScan.step
_MORE, _KEY, _COLON, _CHUNK, _END, _BAD = range(6)


class _ObjectScan:
    """The top level of one JSON object, after its `{`: keys, colons, raw value text."""

    __slots__ = ("state", "part", "value", "value_done")

    _EXPECT_KEY, _IN_KEY, _EXPECT_COLON, _EXPECT_VALUE, _IN_VALUE, _EXPECT_COMMA, _DONE = range(7)

    def __init__(self) -> None:
        self.state = self._EXPECT_KEY
        self.part: list[str] = []  # the key being read
        self.value = _ValueExtent()
        self.value_done = False  # with a _CHUNK: that chunk ends the value

    def step(self, text: str, i: int) -> tuple[int, int, str]:
        """Read on from text[i]; (where it stopped, event, payload)."""
        n = len(text)
        while i < n:
            state = self.state
            if state in (self._EXPECT_KEY, self._EXPECT_COLON, self._EXPECT_VALUE, self._EXPECT_COMMA):
                i = _skip_ws(text, i)
                if i == n:
                    break
                c = text[i]
                if state == self._EXPECT_KEY:
                    if c == "}":
                        self.state = self._DONE
                        return i + 1, _END, ""
                    if c != '"':
                        return i, _BAD, ""
                    self.state, self.value, self.part = self._IN_KEY, _ValueExtent(), []
                elif state == self._EXPECT_COLON:
                    if c != ":":
                        return i, _BAD, ""
                    self.state = self._EXPECT_VALUE
                    return i + 1, _COLON, ""
                elif state == self._EXPECT_VALUE:
                    if c in ",:}]":
                        return i, _BAD, ""
                    self.state, self.value = self._IN_VALUE, _ValueExtent()
                else:
                    if c == ",":
                        self.state, i = self._EXPECT_KEY, i + 1
                        continue
                    if c == "}":
                        self.state = self._DONE
                        return i + 1, _END, ""
                    return i, _BAD, ""
            elif state == self._IN_KEY:
                end = self.value.feed(text, i)
                self.part.append(text[i : n if end is None else end])
                if end is None:
                    return n, _MORE, ""
                self.state = self._EXPECT_COLON
                try:
                    key = json.loads("".join(self.part))
                except ValueError:
                    return end, _BAD, ""
                return end, _KEY, key
            elif state == self._IN_VALUE:
                end = self.value.feed(text, i)
                self.value_done = end is not None
                if end is not None:
                    self.state = self._EXPECT_COMMA
                return (n if end is None else end), _CHUNK, text[i : n if end is None else end]
            else:
                return i, _BAD, ""
        return n, _MORE, ""


# Outcomes of _CallScan.feed
_PENDING, _NOT_A_CALL, _CALL_DONE = range(3)


class _CallScan:
    """One candidate call object, after its `{`: streams it once it has committed, or
    reads it whole when `arguments` comes before `name`."""

    __slots__ = ("parser", "obj", "keys", "key", "name_raw", "index", "committed", "fallback", "values")

    def __init__(self, parser: CallParser) -> None:
        self.parser = parser
        self.obj = _ObjectScan()
        self.keys: list[str] = []
        self.key = ""
        self.name_raw: list[str] = []
        self.index = -1
        self.committed = False
        self.fallback = False
        self.values: dict[str, list[str]] = {}

    def feed(self, text: str, i: int, out: list[OutputDelta]) -> tuple[int, int]:
        """Read text[i:]; (where it stopped, outcome). Deltas of a committed call go to out."""
        while True:
            i, event, payload = self.obj.step(text, i)
            if event == _MORE:
                return i, _PENDING
            if event == _KEY:
                self.key = payload
                self.keys.append(payload)
                if self.fallback or self.committed:
                    continue
                if len(self.keys) == 1:
                    if payload == "arguments":
                        self.fallback = True
                    elif payload != "name":
                        return i, _NOT_A_CALL
                elif payload != "arguments":
                    return i, _NOT_A_CALL
            elif event == _COLON:
                if not self.committed and not self.fallback and self.keys == ["name", "arguments"]:
                    name = self._name()
                    if name is None:
                        return i, _NOT_A_CALL
                    self.committed = True
                    self.index = self.parser._start_call(name, out)
            elif event == _CHUNK:
                if self.committed:
                    if self.key == "arguments" and self.keys.count("arguments") == 1 and payload:
                        out.append(ArgumentsDelta(self.index, payload))
                elif self.fallback:
                    self.values.setdefault(self.key, []).append(payload)
                else:
                    self.name_raw.append(payload)
                    if self.obj.value_done and self._name() is None:
                        return i, _NOT_A_CALL
                if i == len(text):  # the common case while streaming: spare a step
                    return i, _PENDING
            elif event == _END:
                if self.committed:
                    return i, _CALL_DONE
                if self.fallback and self._fallback_call(out):
                    return i, _CALL_DONE
                return i, _NOT_A_CALL
            else:  # _BAD: malformed JSON; after the commit the call simply ends there.
                return i, (_CALL_DONE if self.committed else _NOT_A_CALL)

    def _name(self) -> str | None:
        try:
            name = json.loads("".join(self.name_raw))
        except ValueError:
            return None
        return name if isinstance(name, str) and name in self.parser.tool_names else None

    def _fallback_call(self, out: list[OutputDelta]) -> bool:
        if sorted(self.keys) != ["arguments", "name"]:
            return False
        self.name_raw = self.values["name"]
        name = self._name()
        arguments = "".join(self.values["arguments"]).strip()
        try:
            is_object = isinstance(json.loads(arguments), dict)
        except ValueError:
            is_object = False
        if name is None or not is_object:
            return False
        self.committed = True
        self.index = self.parser._start_call(name, out)
        out.append(ArgumentsDelta(self.index, arguments))
        return True


class CallParser:
    """Model output, fed as it comes, into OpenAI deltas (see the module docstring)."""

    # Compact states
    _START, _LIST_OPEN, _LIST_NEXT, _LIST_ELEMENT = range(4)
    # Tagged states
    _CONTENT, _BLOCK_OPEN, _BLOCK_CLOSE, _BETWEEN = range(4, 8)
    # Both
    _IN_CALL, _PASS, _DROP = range(8, 11)

    def __init__(self, fmt: ToolFormat, tool_names: Collection[str], parallel: bool = True) -> None:
        self.tool_names = frozenset(tool_names)
        self.parallel = parallel
        self.open_tag = fmt.call_open.strip()
        self.close_tag = fmt.call_close.strip()
        self.tagged = bool(self.open_tag)
        self.state = self._CONTENT if self.tagged else self._START
        self.held: list[str] = []  # text that may still turn out to be a call
        self.tail = ""  # tagged content: trailing whitespace and a possible start of open_tag
        self.tag_pos = 0  # how much of a tag has been matched (_BLOCK_CLOSE, _BETWEEN)
        self.list_mode = False  # compact: the calls are a JSON list
        self.call: _CallScan | None = None
        self._calls = 0

    @property
    def calls_made(self) -> int:
        return self._calls

    def _start_call(self, name: str, out: list[OutputDelta]) -> int:
        # The held text was the call's own syntax: it is not content.
        self.held.clear()
        index = self._calls
        self._calls += 1
        out.append(CallStarted(index, new_call_id(), name))
        return index

    def _release(self, out: list[OutputDelta]) -> None:
        text = "".join(self.held)
        self.held.clear()
        if text:
            out.append(ContentDelta(text))

    def feed(self, text: str) -> list[OutputDelta]:
        out: list[OutputDelta] = []
        if text:
            self._feed(text, out)
        return out

    def finish(self) -> list[OutputDelta]:
        out: list[OutputDelta] = []
        if self._calls == 0:
            if self.tagged and self.tail:
                self.held.insert(0, self.tail)
            self._release(out)
        self.held.clear()
        self.tail = ""
        self.state = self._DROP
        return out

    def _after_call(self) -> int:
        if not self.parallel:
            return self._DROP
        if self.tagged:
            return self._BLOCK_CLOSE
        return self._LIST_NEXT if self.list_mode else self._DROP

    def _not_a_call(self) -> int:
        """The held text is content after all, or, once calls went out, dropped."""
        if self._calls:
            return self._DROP
        return self._CONTENT if self.tagged else self._PASS

    def _feed(self, text: str, out: list[OutputDelta]) -> None:
        i, n = 0, len(text)
        while i < n:
            state = self.state
            if state == self._DROP:
                return
            if state == self._PASS:
                out.append(ContentDelta(text[i:]))
                return
            if state == self._CONTENT:
                i = self._content(text, i, out)
                continue
            if state == self._IN_CALL:
                assert self.call is not None
                start = i
                i, outcome = self.call.feed(text, i, out)
                if not self.call.committed:
                    self.held.append(text[start:i])
                if outcome == _CALL_DONE:
                    self.call = None
                    self.tag_pos = 0
                    self.state = self._after_call()
                elif outcome == _NOT_A_CALL:
                    self.call = None
                    self.state = self._not_a_call()
                    if self._calls == 0:
                        self._release(out)
                continue
            if state in (self._BLOCK_CLOSE, self._BETWEEN):
                i = self._tag(text, i)
                continue
            # Where a call object may open: whitespace is held, `{` starts one.
            j = _skip_ws(text, i)
            if j > i and not self._calls:
                self.held.append(text[i:j])
            i = j
            if i == n:
                return
            c = text[i]
            if c == "{" and state != self._LIST_NEXT:
                if not self._calls:
                    self.held.append(c)
                self.call, self.state, i = _CallScan(self), self._IN_CALL, i + 1
            elif state == self._START and c == "[":
                self.held.append(c)
                self.list_mode = True
                self.state, i = self._LIST_OPEN, i + 1
            elif state == self._LIST_NEXT and c == ",":
                self.state, i = self._LIST_ELEMENT, i + 1
            else:
                self.state = self._not_a_call()
                if not self._calls:
                    self._release(out)

    def _content(self, text: str, i: int, out: list[OutputDelta]) -> int:
        """Tagged content: emit it up to an open tag; hold trailing whitespace (dropped
        before a call) and what could be the start of the tag."""
        tag = self.open_tag
        s = self.tail + text[i:]
        found = s.find(tag)
        if found >= 0:
            before, rest = s[:found], found + len(tag)
        else:
            # The longest suffix that could begin the tag stays held.
            before, rest = s, len(s)
            start = s.find("<", max(0, len(s) - len(tag) + 1))
            while start >= 0 and not tag.startswith(s[start:]):
                start = s.find("<", start + 1)
            if start >= 0:
                before = s[:start]
        text_part = before.rstrip(_WS)
        if text_part:
            out.append(ContentDelta(text_part))
            ws = before[len(text_part) :]
        else:
            ws = before  # only whitespace (or nothing) since the last content
        if found >= 0:
            self.tail = ""
            self.held = [ws, tag]
            self.state = self._BLOCK_OPEN
            # `s` began with the old tail, which was consumed here too.
            return len(text) - (len(s) - rest)
        # Unmatched: whitespace and the tag prefix wait for the next text.
        self.tail = ws + s[len(before) :]
        return len(text)

    def _tag(self, text: str, i: int) -> int:
        """After a call: its close tag, then whitespace and the next open tag or the end."""
        n = len(text)
        tag = self.close_tag if self.state == self._BLOCK_CLOSE else self.open_tag
        if self.tag_pos == 0:
            i = _skip_ws(text, i)
        while i < n and self.tag_pos < len(tag):
            if text[i] != tag[self.tag_pos]:
                self.state = self._DROP
                return n
            i, self.tag_pos = i + 1, self.tag_pos + 1
        if self.tag_pos == len(tag):
            self.tag_pos = 0
            self.state = self._BETWEEN if self.state == self._BLOCK_CLOSE else self._BLOCK_OPEN
        return i


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    calls: tuple[ToolCall, ...]


def collect(deltas: list[OutputDelta]) -> ParsedOutput:
    """The message the deltas of one output add up to."""
    content: list[str] = []
    heads: list[CallStarted] = []
    arguments: list[list[str]] = []
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            content.append(delta.text)
        elif isinstance(delta, CallStarted):
            heads.append(delta)
            arguments.append([])
        else:
            arguments[delta.index].append(delta.text)
    calls = tuple(ToolCall(h.id, h.name, "".join(a).strip()) for h, a in zip(heads, arguments))
    text = "".join(content)
    return ParsedOutput(None if calls and not text.strip() else text, calls)


def parse_output(text: str, fmt: ToolFormat, tool_names: Collection[str], parallel: bool = True) -> ParsedOutput:
    parser = CallParser(fmt, tool_names, parallel)
    return collect(parser.feed(text) + parser.finish())
