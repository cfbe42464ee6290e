"""The JSON Schema a tool's `parameters` or a `response_format` schema may use: what
xgrammar 0.2.8's converter (grammar.py) actually enforces while decoding.

A keyword the converter would silently ignore is refused here instead, with the
keyword and where it is: accepting `uniqueItems` or `not` and then generating output
that breaks them would turn a 400 the client can act on into a wrong answer. What was
honoured and what ignored was measured with xgrammar's matcher
(tests/test_tool_protocol.py keeps the decisive cases):

- honoured: `type` (one or a list), `properties`, `required`, `additionalProperties`,
  `patternProperties`, `propertyNames`, `unevaluatedProperties`, `minProperties`,
  `maxProperties`, `items`, `prefixItems`, `additionalItems`, `unevaluatedItems`,
  `minItems`, `maxItems`, `enum`, `const`, `anyOf`, `oneOf` (as anyOf), a one-schema
  `allOf`, local `$ref` into `$defs`/`definitions` (recursion included), `minLength`,
  `maxLength`, `pattern`, the `format`s in FORMATS, `minimum`, `maximum`,
  `exclusiveMinimum`, `exclusiveMaximum`, `multipleOf`;
- ignored, so refused: `uniqueItems: true`, `contains`, `not`, `if`/`then`/`else`,
  `dependentRequired`, `dependentSchemas`, `allOf` of two or more, remote `$ref`,
  `nullable` (OpenAPI), other formats, keywords beside `$ref`/`anyOf`/`oneOf`/`allOf`,
  string and number keywords without a `type`;
- enforced differently, so refused: `required` naming a property not in `properties`
  (unsatisfiable once extra properties are closed off), compound `enum`/`const` values
  (written without spaces, unlike every other JSON the model is steered to).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from tuneserve.errors import TuneserveError

MAX_DEPTH = 32  # nested subschemas
MAX_NODES = 2000  # subschemas plus enum values: keeps a grammar's compile time bounded

TYPES = frozenset({"string", "integer", "number", "boolean", "null", "object", "array"})
FORMATS = frozenset(
    {
        "date", "time", "date-time", "duration", "email", "ipv4", "ipv6", "hostname", "uuid",
        "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
    }
)

# Words about the value that constrain nothing.
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly", "$comment", "$schema", "discriminator"}
)
_CONTAINERS = frozenset({"$defs", "definitions"})
_STRING_WORDS = frozenset({"minLength", "maxLength", "pattern", "format"})
_NUMBER_WORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_ARRAY_SIZE_WORDS = frozenset({"minItems", "maxItems"})
_SCHEMA_WORDS = frozenset({"items", "additionalItems", "unevaluatedItems", "additionalProperties", "propertyNames", "unevaluatedProperties"})
_COUNT_WORDS = frozenset({"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"})
_OTHER_WORDS = frozenset({"type", "enum", "const", "properties", "required", "patternProperties", "prefixItems", "uniqueItems", "anyOf", "oneOf", "allOf", "$ref"})
SUPPORTED = ANNOTATIONS | _CONTAINERS | _STRING_WORDS | _NUMBER_WORDS | _ARRAY_SIZE_WORDS | _SCHEMA_WORDS | _COUNT_WORDS | _OTHER_WORDS

# Keywords that take the whole node: what stands beside them is ignored by the converter.
_EXCLUSIVE = ("$ref", "anyOf", "oneOf", "allOf")
_HINTS = {
    "nullable": 'use "type": [<type>, "null"] or anyOf with {"type": "null"}',
    "uniqueItems": "only uniqueItems: false is supported",
    "contains": "arrays are constrained by items and prefixItems only",
}


class GrammarError(TuneserveError):
    """A request's tools or schema cannot become a decoding grammar; `param` names the
    request field (an OpenAI-style 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedSchema(GrammarError):
    """A schema outside the subset: `param` is where, `keyword` is what."""

    def __init__(self, message: str, param: str, keyword: str | None) -> None:
        super().__init__(message, param)
        self.keyword = keyword


def check_schema(schema: Any, param: str, *, object_root: bool = False) -> None:
    """Raise UnsupportedSchema unless every keyword of `schema` is one decoding enforces.
    `object_root`: a tool's parameters, whose root must be an object schema ({} too)."""
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"{param} must be a JSON Schema object", param, None)
    if object_root and schema and schema.get("type") != "object":
        raise UnsupportedSchema(f"{param}: a tool's parameters need 'type' 'object' at the root", param, "type")
    _Checker(schema).node(schema, param, 0)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool)) or _is_number(value)


class _Checker:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.nodes = 0

    def _count(self, param: str, keyword: str | None, n: int = 1) -> None:
        self.nodes += n
        if self.nodes > MAX_NODES:
            raise UnsupportedSchema(f"the schema at {param} is too large (more than {MAX_NODES} subschemas and enum values)", param, keyword)

    def node(self, schema: Any, param: str, depth: int) -> None:
        self._count(param, None)
        if isinstance(schema, bool):
            return
        if not isinstance(schema, dict):
            raise UnsupportedSchema(f"{param} must be a JSON Schema object or a boolean", param, None)
        if depth > MAX_DEPTH:
            raise UnsupportedSchema(f"{param} nests deeper than {MAX_DEPTH} schemas", param, None)
        for keyword in schema:
            if keyword not in SUPPORTED or (keyword == "uniqueItems" and schema[keyword] is not False):
                hint = _HINTS.get(keyword, "it would not be enforced while decoding")
                raise UnsupportedSchema(f"{param}: JSON Schema keyword {keyword!r} is not supported ({hint})", param, keyword)
        exclusive = [k for k in _EXCLUSIVE if k in schema]
        if exclusive:
            beside = [k for k in schema if k not in ANNOTATIONS and k not in _CONTAINERS and k != exclusive[0]]
            if beside:
                raise UnsupportedSchema(
                    f"{param}: {beside[0]!r} next to {exclusive[0]!r} is not supported (it would not be enforced); move it into the subschemas",
                    param,
                    beside[0],
                )
        self._words(schema, param)
        self._subschemas(schema, param, depth)

    def _words(self, schema: Mapping[str, Any], param: str) -> None:
        def bad(keyword: str, why: str) -> UnsupportedSchema:
            return UnsupportedSchema(f"{param}: {keyword!r} {why}", param, keyword)

        types = schema.get("type")
        if "type" in schema:
            listed = types if isinstance(types, list) else [types]
            if not listed or any(not isinstance(t, str) or t not in TYPES for t in listed) or len(set(listed)) != len(listed):
                raise bad("type", f"must be one of {sorted(TYPES)} or a list of them")
        for keyword in schema.keys() & (_STRING_WORDS | _NUMBER_WORDS | _ARRAY_SIZE_WORDS):
            if types is None:
                raise bad(keyword, 'needs a "type" beside it to be enforced')
        for keyword in schema.keys() & _COUNT_WORDS:
            if not _is_count(schema[keyword]):
                raise bad(keyword, "must be a non-negative integer")
        for keyword in schema.keys() & _NUMBER_WORDS:
            if not _is_number(schema[keyword]) or (keyword == "multipleOf" and schema[keyword] <= 0):
                raise bad(keyword, "must be a number" + (" above 0" if keyword == "multipleOf" else ""))
        if "pattern" in schema and not isinstance(schema["pattern"], str):
            raise bad("pattern", "must be a string")
        if "format" in schema and schema["format"] not in FORMATS:
            raise bad("format", f"{schema['format']!r} is not supported; supported formats: {', '.join(sorted(FORMATS))}")
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise bad("enum", "must be a non-empty list")
            if not all(_is_scalar(v) for v in values):
                raise bad("enum", "values must be strings, numbers, booleans or null")
            self._count(param, "enum", len(values))
        if "const" in schema and not _is_scalar(schema["const"]):
            raise bad("const", "must be a string, number, boolean or null")
        if "required" in schema:
            required = schema["required"]
            properties = schema.get("properties") or {}
            if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
                raise bad("required", "must be a list of property names")
            missing = [r for r in required if r not in properties]
            if missing:
                raise bad("required", f"names {missing[0]!r}, which is not in properties")
        if "$ref" in schema:
            self._resolve(schema["$ref"], param)

    def _subschemas(self, schema: Mapping[str, Any], param: str, depth: int) -> None:
        for keyword in ("properties", "patternProperties", *_CONTAINERS):
            if keyword in schema:
                members = schema[keyword]
                if not isinstance(members, dict):
                    raise UnsupportedSchema(f"{param}: {keyword!r} must be an object of schemas", param, keyword)
                # Tool parameters' properties read best as their own path, as OpenAI writes it.
                for name, sub in members.items():
                    self.node(sub, f"{param}.{keyword}.{name}", depth + 1)
        for keyword in ("prefixItems", "anyOf", "oneOf", "allOf"):
            if keyword in schema:
                members = schema[keyword]
                if not isinstance(members, list) or not members:
                    raise UnsupportedSchema(f"{param}: {keyword!r} must be a non-empty list of schemas", param, keyword)
                if keyword == "allOf" and len(members) > 1:
                    raise UnsupportedSchema(
                        f"{param}: 'allOf' with more than one schema is not supported (it would not be enforced); merge them",
                        param,
                        "allOf",
                    )
                for i, sub in enumerate(members):
                    self.node(sub, f"{param}.{keyword}[{i}]", depth + 1)
        for keyword in _SCHEMA_WORDS:
            if keyword in schema:
                self.node(schema[keyword], f"{param}.{keyword}", depth + 1)

    def _resolve(self, ref: Any, param: str) -> None:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise UnsupportedSchema(f"{param}: '$ref' must point into this schema ('#' or '#/$defs/...'), not {ref!r}", param, "$ref")
        target: Any = self.root
        for token in ref[2:].split("/") if ref != "#" else ():
            key = token.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target = target[key]
            elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target = target[int(key)]
            else:
                raise UnsupportedSchema(f"{param}: '$ref' {ref!r} points to nothing in the schema", param, "$ref")
        if not isinstance(target, (dict, bool)):
            raise UnsupportedSchema(f"{param}: '$ref' {ref!r} does not point to a schema", param, "$ref")
