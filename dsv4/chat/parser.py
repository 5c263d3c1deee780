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

Arguments: a call's `arguments` is the JSON object text the official `decode_dsml_to_arguments`
builds, refined by the request's tool schemas; `dsv4.chat.arguments` states the rules.

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
from collections.abc import Iterable, Mapping
from typing import Any

from dsv4.chat.arguments import ToolSchemas, json_param_json, string_param_json, unknown_tool_warning
from dsv4.chat.events import IdFactory, ParsedMessage, ToolCall, aggregate_events, final_reason, new_tool_call_id
from dsv4.chat.format import (
    EOS,
    INVOKE_END,
    INVOKE_START,
    PARAMETER_END,
    PARAMETER_START,
    RESERVED,
    THINK_END,
    TOOL_CALLS_END,
    TOOL_CALLS_SEPARATOR,
    TOOL_CALLS_START,
)
from dsv4.chat.streaming import StreamParser

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
        sp = StreamParser(thinking=thinking, tools=schemas, id_factory=id_factory)
        events = sp.feed(text)
        events += sp.finish(finish_reason)
        return aggregate_events(events)
    reasoning, content, calls = direct
    make_id = id_factory or new_tool_call_id
    tool_calls = [ToolCall(make_id(i), name, args, warnings) for i, (name, args, warnings) in enumerate(calls)]
    return ParsedMessage(reasoning, content, tool_calls, final_reason(finish_reason, True, len(tool_calls)))
