"""Grammars of what an assistant turn may be, for constrained decoding (`dsv4.engine.constraint` compiles them).

One grammar (llguidance's Lark dialect) describes the whole completion in the V4 chat format:

    thinking modes:  REASONING </think> ANSWER     (the prompt ends with <think>; `</think>` is token `think_end_id`)
    non-think:       ANSWER                         (the prompt already ends with </think>)

The reasoning is free text (it stays unconstrained, as in vLLM and SGLang, where the structure applies after it)
except that it cannot spell `</think>` or the DSML marker, which the parsers would read as its end or as a call.
The ANSWER, by what the request allows:

* a JSON value for `response_format` (`json_object`: any object; `json_schema`: that schema, via llguidance's JSON
  schema compiler, `%json {...}`), written compactly (", " and ": " as separators, no other whitespace), objects
  closed to the properties they declare (`closed_schema`);
* a DSML tool-call block when a call is required (`tool_choice` "required": one call or more of the declared
  tools, exactly one without `parallel_tool_calls`; a named function: exactly one call of it), written exactly as
  `dsv4.chat.encoding.render_tool_calls` writes them after "\\n\\n";
* free text that may end in a tool-call block of the declared tools (`tool_choice` "auto"): the block opens only
  with the full `<｜DSML｜tool_calls>` marker, so text that merely contains "<" never gets forced into a call;
* free text that can never contain DSML when no tool may be called (no tools, or `tool_choice` "none").

In a call, each declared parameter of the tool's JSON schema is written as the model was trained to write it: a
plain string property raw with `string="true"`, anything else (numbers, objects, enums of non-strings, strings
with a pattern or length bounds) as JSON satisfying the property's schema with `string="false"`; properties come
in the schema's order, the required ones always, the optional ones or not, so the arguments a call carries
validate against the tool's schema.

`DSML` is an ordinary token of the V4 tokenizer (not a special one), so the grammar works on its bytes: a model
that spelled the marker out of smaller tokens is held to the same rules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .format import (
    DSML,
    INVOKE_END,
    INVOKE_START,
    PARAMETER_END,
    PARAMETER_START,
    THINK_END,
    TOOL_CALLS_END,
    TOOL_CALLS_SEPARATOR,
    TOOL_CALLS_START,
)

ANY = "/(?s:.*)/"
# Newlines are lexemes of their own, never part of a marker's literal: a literal "\n</..." would make the lexer
# commit to it at "\n<" (maximal munch) and refuse the "\n" + "<｜DSML｜parameter" that may also follow.
NL = '"\\n"'


def _lit(text: str) -> str:
    """A Lark string literal for `text`."""
    return json.dumps(text, ensure_ascii=False)


def _without(*texts: str) -> str:
    """A regex conjunct excluding every text in `texts` anywhere."""
    return " & ".join(f"~/(?s:.*){_regex_escape(t)}(?s:.*)/" for t in texts)


def _regex_escape(text: str) -> str:
    out = []
    for ch in text:
        out.append("\\" + ch if ch in r".^$*+?()[]{}|\/" else ch)
    return "".join(out)


class ToolGrammarError(ValueError):
    """A tool or response format the grammar cannot express (the message names it)."""


class _Rules:
    """Rule lines under construction, with fresh names."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._n = 0

    def add(self, body: str, prefix: str = "r") -> str:
        self._n += 1
        name = f"{prefix}{self._n}"
        self.lines.append(f"{name}: {body}")
        return name


def _is_plain_string(schema: Mapping[str, Any]) -> bool:
    """A property written raw (`string="true"`): type string, no constraint the raw text would have to meet."""
    constraining = ("pattern", "format", "minLength", "maxLength", "enum", "const", "anyOf", "oneOf", "allOf", "$ref")
    return schema.get("type") == "string" and not any(k in schema for k in constraining)


def _string_enum(schema: Mapping[str, Any]) -> list[str] | None:
    values = schema.get("enum") if "enum" in schema else ([schema["const"]] if "const" in schema else None)
    if values and all(isinstance(v, str) for v in values) and schema.get("type", "string") == "string":
        return list(values)
    return None


# How the grammar writes JSON: one space after "," and ":" (the most common style in training data), no other
# whitespace; with flexible whitespace a small model fills its output with newlines.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMAS = ("items", "additionalProperties", "contains", "not", "if", "then", "else", "propertyNames")


def closed_schema(schema: Any) -> Any:
    """A copy of a JSON schema in which every object that declares properties and says nothing about others
    allows no others (`additionalProperties: false`, as OpenAI's strict structured outputs require): whatever
    validates against it validates against the original, and the model cannot wander off into invented keys."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {k: closed_schema(v) for k, v in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), Mapping):
            out[key] = closed_schema(out[key])
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _json(schema: Mapping[str, Any], lenient: bool = False) -> str:
    """The `%json {...}` nonterminal of a schema, closed and in the grammar's JSON style. `lenient`: keywords
    llguidance does not implement (e.g. `propertyNames`, which Claude Code's tools use) are left unenforced
    instead of failing the compile; tool parameters are compiled so (a client's tool list must not make every
    request a 400), a `response_format` schema strictly (its 400 names the keyword)."""
    style = {**JSON_STYLE, "lenient": True} if lenient else JSON_STYLE
    return f"%json {json.dumps({**closed_schema(schema), 'x-guidance': style}, ensure_ascii=False)}"


def _parameter(rules: _Rules, key: str, schema: Mapping[str, Any]) -> str:
    head = f'{PARAMETER_START}{key}" string='
    end = _lit(PARAMETER_END)
    if _is_plain_string(schema):
        return f'{_lit(head + chr(34) + "true" + chr(34) + ">")} raw_value'
    enum = _string_enum(schema)
    if enum is not None:
        choice = " | ".join(_lit(v) for v in enum)
        return f'{_lit(head + chr(34) + "true" + chr(34) + ">")} ({choice}) {end}'
    return f'{_lit(head + chr(34) + "false" + chr(34) + ">")} {_json(schema, lenient=True)} {end}'


def _parameters(rules: _Rules, schema: Mapping[str, Any], tool: str) -> str:
    """The rule of a tool's parameters, joined by newlines: required ones always, optional ones or not, in the
    schema's order (an expression that may match the empty string when nothing is required)."""
    if schema.get("type", "object") != "object":
        raise ToolGrammarError(f"tool {tool!r}: parameters must be an object schema")
    properties = schema.get("properties") or {}
    if not isinstance(properties, Mapping):
        raise ToolGrammarError(f"tool {tool!r}: parameters.properties must be an object")
    required = set(schema.get("required") or ())
    missing = sorted(required - set(properties))
    if missing:
        raise ToolGrammarError(f"tool {tool!r}: required parameters {missing} are not in its properties")
    names = list(properties)
    params = [rules.add(_parameter(rules, k, properties[k] if isinstance(properties[k], Mapping) else {}), "p")
              for k in names]
    # rest_i: the parameters from i on, after at least one was written; first_i: the same before any was
    rest = first = '""'
    for i in reversed(range(len(names))):
        p = params[i]
        if names[i] in required:
            rest_i = rules.add(f"{NL} {p} {rest}", "rest")
            first_i = rules.add(f"{p} {rest}", "first")
        else:
            rest_i = rules.add(f"({NL} {p})? {rest}", "rest")
            first_i = rules.add(f"{p} {rest} | {first}", "first")
        rest, first = rest_i, first_i
    return first


def _invoke(rules: _Rules, tool: Mapping[str, Any]) -> str:
    fn = tool["function"]
    name = fn["name"]
    params = _parameters(rules, fn.get("parameters") or {}, name)
    return rules.add(f'{_lit(INVOKE_START + name + chr(34) + ">")} {NL} {params} {NL} {_lit(INVOKE_END)}', "invoke")


def _calls(rules: _Rules, tools: Sequence[Mapping[str, Any]], named: str | None, single: bool) -> str:
    """The DSML block after its opening marker: the invokes, then the closing marker."""
    chosen = [t for t in tools if named is None or t["function"]["name"] == named]
    invoke = rules.add(" | ".join(_invoke(rules, t) for t in chosen), "call")
    many = "" if single or named is not None else f" ({NL} {invoke})*"
    return rules.add(f"{NL} {invoke}{many} {NL} {_lit(TOOL_CALLS_END)}", "calls")


def completion_grammar(*, thinking: bool, think_end_id: int, response_format: Mapping[str, Any] | None = None,
                       tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: str | Mapping = "auto",
                       parallel_tool_calls: bool = True) -> str:
    """The Lark grammar of a completion (module docstring). `response_format`: None, {"type": "json_object"} or a
    JSON schema (what `ChatService` renders in the prompt); `tools`: OpenAI function tools (validated by the
    caller); `tool_choice`: "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}."""
    named = tool_choice["function"]["name"] if isinstance(tool_choice, Mapping) else None
    may_call = bool(tools) and tool_choice != "none"
    forced = may_call and (named is not None or tool_choice == "required")
    rules = _Rules()
    lines = [f"RAW_VALUE: /(?s:.*){_regex_escape(PARAMETER_END)}/ & ~/(?s:.*){DSML}(?s:.*){DSML}(?s:.*)/",
             "raw_value[lazy]: RAW_VALUE",
             f"TEXT: {ANY} & {_without(DSML)}",
             f"REASONING: {ANY} & {_without(DSML, THINK_END)}"]
    calls = _calls(rules, tools or [], named, single=not parallel_tool_calls) if may_call else None
    alternatives = []
    if forced:
        alternatives.append(f"{_lit(TOOL_CALLS_SEPARATOR)} {_lit(TOOL_CALLS_START)} {calls}")
    else:
        if response_format is not None:
            schema = {"type": "object"} if response_format.get("type") == "json_object" else response_format
            alternatives.append(_json(schema))
        else:
            alternatives.append("TEXT")
        if calls is not None:
            lines += [f"PRE_CALLS: /(?s:.*){_regex_escape(TOOL_CALLS_START)}/ & "
                      f"~/(?s:.*){DSML}(?s:.*){DSML}(?s:.*)/",
                      "pre_calls[lazy]: PRE_CALLS"]
            alternatives.append(f"pre_calls {calls}")
    answer = rules.add(" | ".join(alternatives), "answer")
    start = f"start: REASONING <[{think_end_id}]> {answer}" if thinking else f"start: {answer}"
    return "\n".join([start, *lines, *rules.lines]) + "\n"
