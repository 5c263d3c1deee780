"""A tool call's `arguments` JSON from its DSML parameters, refined by the request's tool schemas.

Both parsers (`dsv4.chat.parser`, `dsv4.chat.streaming`) build arguments with these rules, so the
streamed deltas and the whole-text result agree to the byte. A call's `arguments` is the JSON object
text `{"K": V, ...}` (separators ", " and ": ", parameters in order, non-ASCII kept), as the official
`decode_dsml_to_arguments` builds it:

* string="true": V is the raw value as a JSON string (`json.dumps(value, ensure_ascii=False)`).
* string="false": V is the raw value text verbatim when it is valid JSON (strict: NaN/Infinity are
  not JSON). Otherwise V is the raw text as a JSON string, so `arguments` is always valid JSON;
  a warning is attached unless the schema allows a string.
* A parameter without a string attribute is read as string="false".

With `tools` (the request's OpenAI tool list; bare function objects are accepted too), the types of a
parameter's JSON schema (`type`, or the types of `anyOf`/`oneOf`/`enum`/`const`) refine this:

* string="true" and the schema allows no string but one of number/integer/boolean/array/object/null:
  the value is parsed as JSON and, when that succeeds and gives one of the allowed types, V is its
  JSON (`json.dumps`); otherwise it stays a JSON string.
* string="false" and the schema type is exactly string: a value that is not a JSON string (invalid
  JSON, or a number, array, ...) becomes the raw text as a JSON string.
* A call whose name is not in `tools` is kept, with the warning "unknown tool 'NAME'".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

_COERCIBLE = frozenset({"number", "integer", "boolean", "array", "object", "null"})
_STRING_ONLY = frozenset({"string"})
_JSON_TYPE = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null",
              list: "array", dict: "object"}


def _schema_types(schema: Any) -> frozenset[str] | None:
    """The JSON types a parameter schema allows; None when it does not say."""
    if not isinstance(schema, Mapping):
        return None
    t = schema.get("type")
    if isinstance(t, str):
        return frozenset((t,))
    if isinstance(t, list) and t and all(isinstance(x, str) for x in t):
        return frozenset(t)
    for key in ("anyOf", "oneOf"):
        subs = schema.get(key)
        if isinstance(subs, list) and subs:
            out: set[str] = set()
            for sub in subs:
                st = _schema_types(sub)
                if st is None:
                    return None
                out |= st
            return frozenset(out)
    values = schema.get("enum")
    if values is None and "const" in schema:
        values = [schema["const"]]
    if isinstance(values, list) and values and all(type(v) in _JSON_TYPE for v in values):
        return frozenset(_JSON_TYPE[type(v)] for v in values)
    return None


class ToolSchemas:
    """Tool names and parameter types of a request's `tools` (None: nothing known, no warnings)."""

    def __init__(self, tools: Iterable[Mapping[str, Any]] | None):
        self.enabled = tools is not None
        self._props: dict[str, Mapping[str, Any]] = {}
        for tool in tools or ():
            if not isinstance(tool, Mapping):
                continue
            fn = tool.get("function", tool)
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                continue
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, Mapping) else None
            self._props[fn["name"]] = props if isinstance(props, Mapping) else {}

    def unknown(self, name: str) -> bool:
        return self.enabled and name not in self._props

    def types(self, name: str, key: str) -> frozenset[str] | None:
        props = self._props.get(name)
        return _schema_types(props.get(key)) if props else None


def unknown_tool_warning(name: str) -> str:
    return f"unknown tool {name!r}"


def coerces_string(types: frozenset[str] | None) -> bool:
    """Whether a string="true" value of a parameter with these schema types is parsed as JSON."""
    return types is not None and "string" not in types and not types.isdisjoint(_COERCIBLE)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False, None


def _has_type(value: Any, types: frozenset[str]) -> bool:
    t = _JSON_TYPE.get(type(value))
    return t in types or (t == "integer" and "number" in types)


def string_param_json(raw: str, types: frozenset[str] | None) -> str:
    """V of a string="true" parameter (`coerces_string(types)` decides whether parsing is tried)."""
    if coerces_string(types):
        ok, value = strict_json(raw)
        if ok and _has_type(value, types):
            return json.dumps(value, ensure_ascii=False)
    return json.dumps(raw, ensure_ascii=False)


def json_param_json(key: str, raw: str, types: frozenset[str] | None) -> tuple[str, str | None]:
    """(V, warning) of a string="false" (or attribute-less) parameter."""
    ok, value = strict_json(raw)
    if ok and not (types == _STRING_ONLY and not isinstance(value, str)):
        return raw, None
    warning = None
    if not ok and not (types and "string" in types):
        warning = f'parameter {key!r}: string="false" value is not valid JSON; kept as a string'
    return json.dumps(raw, ensure_ascii=False), warning
