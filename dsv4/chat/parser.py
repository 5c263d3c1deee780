"""DeepSeek-V4 completion text -> reasoning, content and tool calls (the whole text at once).

A completion is what the model writes after the prompt's `<｜Assistant｜><think>` (thinking mode) or
`<｜Assistant｜></think>` (chat mode):

    [reasoning `</think>`] content ["\\n\\n" `<｜DSML｜tool_calls>` ... `</｜DSML｜tool_calls>`] `<｜end▁of▁sentence｜>`

    block      `<｜DSML｜tool_calls>` "\\n" invoke ("\\n" invoke)* "\\n" `</｜DSML｜tool_calls>`
    invoke     `<｜DSML｜invoke name="NAME">` "\\n" parameter ("\\n" parameter)* "\\n" `</｜DSML｜invoke>`
    parameter  `<｜DSML｜parameter name="K" string="true|false">VALUE</｜DSML｜parameter>`

`parse_completion` gives the official parser's result (`parse_message_from_completion_text` of the
release's `encoding/encoding_dsv4.py`) on the completions that parser accepts, and a defined result,
never an exception, on everything else. It departs from the official result on purpose only where
that result would be unusable: a reserved string inside a value (deleted here), a string="false"
value that is not JSON (a JSON string here, so `arguments` stays valid JSON), a `</｜DSML｜invoke>`
inside a value (ends the call here), a call name or parameter key that is empty (names only) or holds
`"`, `<`, `>` or a newline (malformed DSML here, so the text goes to content).

It is the aggregation of the events of `dsv4.chat.streaming.StreamParser` fed the same text in any
chunking: a text in exactly the official layout takes a direct path here, anything else is handed to
the streaming state machine, whose module doc states the rules for the rest.

Arguments. A call's `arguments` is the JSON object text `{"K": V, ...}` (separators ", " and ": ",
parameters in order, non-ASCII kept), as the official `decode_dsml_to_arguments` builds it:

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

Robustness rules (in short; `dsv4.chat.streaming` states them exactly): reasoning ends at
`</think>`, at a tool-calls opener (a missing `</think>`) or at EOS; a block may start anywhere in
the content, the "\\n\\n" before it is dropped; whitespace between tags is free; malformed DSML goes
to content; a truncated block keeps what it completed and the string value it was streaming, and
closes its open call; nothing after EOS is read; the reserved strings (BOS, EOS, `<think>`,
`</think>`, `｜DSML｜`) never appear in reasoning, content, names or arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dsv4.chat.format import (
    BOS,
    DSML,
    EOS,
    INVOKE_END,
    INVOKE_START,
    PARAMETER_END,
    PARAMETER_START,
    THINK_END,
    THINK_START,
    TOOL_CALLS_END,
    TOOL_CALLS_SEPARATOR,
    TOOL_CALLS_START,
)

# strings removed wherever they would reach reasoning, content or arguments
RESERVED = (EOS, BOS, THINK_START, THINK_END, DSML)

IdFactory = Callable[[int], str]

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def new_tool_call_id(index: int) -> str:
    """A fresh unique id shaped like DeepSeek's: `call_00_` + 22 random base-62 characters."""
    n = uuid.uuid4().int
    tail = []
    for _ in range(22):
        n, r = divmod(n, 62)
        tail.append(_B62[r])
    return f"call_{index:02d}_{''.join(tail)}"


# ------------------------------------------------------------------------------------------------
# results and events


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text
    warnings: tuple[str, ...] = ()

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    reasoning_content: str
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "tool_calls" | "length" (or the engine's own reason)

    def to_openai(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArgumentsDelta:
    index: int
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    index: int
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str
    stop_sequence: str | None = None  # the caller's stop string that ended the text (set by the server)


Event = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArgumentsDelta | ToolCallEnd | Finish


def aggregate_events(events: Iterable[Event]) -> ParsedMessage:
    """The message a stream of events describes (what a client rebuilds from the deltas)."""
    reasoning: list[str] = []
    content: list[str] = []
    calls: dict[int, list[Any]] = {}  # index -> [id, name, [argument parts], warnings]
    finish = None
    for ev in events:
        t = type(ev)
        if t is ContentDelta:
            content.append(ev.text)
        elif t is ReasoningDelta:
            reasoning.append(ev.text)
        elif t is ToolCallArgumentsDelta:
            calls[ev.index][2].append(ev.text)
        elif t is ToolCallStart:
            calls[ev.index] = [ev.id, ev.name, [], ()]
        elif t is ToolCallEnd:
            calls[ev.index][3] = ev.warnings
        elif t is Finish:
            finish = ev.reason
    tool_calls = [ToolCall(c[0], c[1], "".join(c[2]), c[3]) for _, c in sorted(calls.items())]
    return ParsedMessage("".join(reasoning), "".join(content), tool_calls, finish)


def final_reason(reason: str | None, eos_seen: bool, n_calls: int) -> str:
    """finish_reason of a message: the engine's `reason` (None: "stop" when EOS was written, else
    "length"), with "stop" turned into "tool_calls" when the message has calls."""
    if reason is None:
        reason = "stop" if eos_seen else "length"
    if reason == "stop" and n_calls:
        return "tool_calls"
    return reason


# ------------------------------------------------------------------------------------------------
# tool schemas and typed values

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


# ------------------------------------------------------------------------------------------------
# the full-text parser

_NAME_BAD = re.compile(r'["<>\n]')
_HEADER_STRICT = re.compile(r'([^"<>\n]*)" string="(true|false)"')


def _reserved_in(text: str) -> bool:
    return any(m in text for m in RESERVED)


def _parse_block(block: str, schemas: ToolSchemas) -> list[tuple[str, str, tuple[str, ...]]] | None:
    """Calls (name, arguments, warnings) of a well-formed block body (the text after the opening tag);
    None when it is not exactly the official layout."""
    if not block.startswith("\n"):
        return None
    calls = []
    j = 1
    while block.startswith(INVOKE_START, j):
        j += len(INVOKE_START)
        q = block.find('">\n', j)
        if q < 0:
            return None
        name = block[j:q]
        if not name or _NAME_BAD.search(name) or _reserved_in(name):
            return None
        j = q + 3
        warnings = [unknown_tool_warning(name)] if schemas.unknown(name) else []
        parts = []
        seen = set()
        while block.startswith(PARAMETER_START, j):
            j += len(PARAMETER_START)
            q = block.find(">", j)
            m = _HEADER_STRICT.fullmatch(block, j, q) if q >= 0 else None
            if m is None:
                return None
            key, string = m.group(1), m.group(2)
            if key in seen or _reserved_in(key):
                return None
            seen.add(key)
            j = q + 1
            q = block.find(PARAMETER_END, j)
            if q < 0:
                return None
            value = block[j:q]
            if _reserved_in(value):
                return None
            j = q + len(PARAMETER_END)
            if not block.startswith("\n", j):
                return None
            j += 1
            types = schemas.types(name, key)
            if string == "true":
                v = string_param_json(value, types)
            else:
                v, w = json_param_json(key, value, types)
                if w:
                    warnings.append(w)
            parts.append(f"{json.dumps(key, ensure_ascii=False)}: {v}")
        if not block.startswith(INVOKE_END, j):
            return None
        j += len(INVOKE_END)
        if block.startswith("\n", j):
            j += 1
        elif block.startswith(TOOL_CALLS_END, j):
            return None  # the official layout has "\n" before the closing tag
        calls.append((name, "{" + ", ".join(parts) + "}", tuple(warnings)))
    if block[j:] != TOOL_CALLS_END:
        return None
    return calls


def _parse_direct(text: str, thinking: bool, schemas: ToolSchemas):
    """(reasoning, content, calls) of a completion in exactly the official layout; None otherwise."""
    i = 0
    reasoning = ""
    if thinking:
        p = text.find(THINK_END)
        if p < 0:
            return None
        reasoning = text[:p]
        if _reserved_in(reasoning):
            return None
        i = p + len(THINK_END)
    e = text.find(EOS, i)
    if e < 0 or e + len(EOS) != len(text):
        return None
    body = text[i:e]
    opener = TOOL_CALLS_SEPARATOR + TOOL_CALLS_START
    t = body.find(opener)
    if t < 0:
        content, calls = body, []
    else:
        content = body[:t]
        calls = _parse_block(body[t + len(opener):], schemas)
        if calls is None:
            return None
    if _reserved_in(content):
        return None
    return reasoning, content, calls


def parse_completion(
    text: str,
    *,
    thinking: bool = True,
    tools: Iterable[Mapping[str, Any]] | None = None,
    id_factory: IdFactory | None = None,
    finish_reason: str | None = None,
) -> ParsedMessage:
    """Parse one completion (the text generated after the prompt, EOS included when it was written).

    thinking: the prompt ended with `<think>` (the text starts with reasoning); False for chat mode.
    tools: the request's tool list, for the schema rules of the module doc and unknown-tool warnings.
    id_factory: call index -> tool call id (default `new_tool_call_id`).
    finish_reason: the engine's reason; None infers "stop" (EOS present) or "length" (no EOS).
    Never raises on any text.
    """
    schemas = tools if isinstance(tools, ToolSchemas) else ToolSchemas(tools)
    direct = _parse_direct(text, thinking, schemas)
    if direct is None:
        from dsv4.chat.streaming import StreamParser

        sp = StreamParser(thinking=thinking, tools=schemas, id_factory=id_factory)
        events = sp.feed(text)
        events += sp.finish(finish_reason)
        return aggregate_events(events)
    reasoning, content, calls = direct
    make_id = id_factory or new_tool_call_id
    tool_calls = [ToolCall(make_id(i), name, args, warnings) for i, (name, args, warnings) in enumerate(calls)]
    return ParsedMessage(reasoning, content, tool_calls, final_reason(finish_reason, True, len(tool_calls)))
