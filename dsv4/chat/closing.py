"""Finishing a constrained answer before the token budget runs out.

A grammar guarantees that what is written is valid so far, not that it ends: a model that keeps writing inside
a JSON string (the small demo model never saw JSON) reaches `max_tokens` with half a document, which no client
can parse. So in the last tokens of the budget (each closer's `window`) the sampler asks a closer
(`dsv4.engine.constraint.Closer`) which token finishes soonest, among those the grammar allows:

* still reasoning: `</think>`, so the answer gets the rest of the budget (for JSON answers and answers that must
  be a tool call; free-text answers may end anywhere);
* in a tool-call block (`ToolCallCloser`): the open value, parameter, invoke and block closed in turn;
* in a JSON answer (`JsonCloser`): EOS as soon as the value is complete; otherwise, from where the text so far
  stands: close the open string (`"`), end a number
  or a value and close its container (`}` / `]`, else `,` when the schema needs more), start the shortest value
  the schema allows (`""`, `0`, `false`, `null`, then `[` / `{` when it must), `:` after a key. Keys are the
  schema's (the grammar writes them in the schema's order), so the closer only opens them when a required one is
  missing and lets the model's pick among allowed tokens stand where the closer has no preference (an enum value,
  a pattern, a string below its minimum length).

It is a policy over the grammar's mask, never past it: every token it picks is one the grammar allows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from .format import DSML, PARAMETER_END, PARAMETER_START, THINK_END, TOOL_CALLS_START
from .tokenizer import Tokenizer

_VALUE_STARTS = '"0fn[{-123456789t'


def scan_json(text: str) -> tuple[str, str | None]:
    """Where a JSON prefix stands: (state, innermost container "{" / "[" or None). States: "value" (a value is
    expected), "key" (a key or the object's end), "colon", "after" (a value ended), "string" (inside a value
    string), "key_string", "scalar" (inside a number or a literal)."""
    stack: list[str] = []
    state = "value"
    escaped = False
    for ch in text:
        if state in ("string", "key_string"):
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                state = "colon" if state == "key_string" else "after"
            continue
        if state == "scalar":
            if ch.isalnum() or ch in "+-.":
                continue
            state = "after"
        if ch in " \t\r\n":
            continue
        if state == "value":
            if ch == '"':
                state = "string"
            elif ch in "{[":
                stack.append(ch)
                state = "key" if ch == "{" else "value"
            elif ch == "]" and stack and stack[-1] == "[":  # an empty array
                stack.pop()
                state = "after"
            else:
                state = "scalar"
        elif state == "key":
            if ch == '"':
                state = "key_string"
            elif ch == "}" and stack:
                stack.pop()
                state = "after"
        elif state == "colon":
            if ch == ":":
                state = "value"
        elif state == "after":
            if ch == ",":
                state = "key" if stack and stack[-1] == "{" else "value"
            elif ch in "}]" and stack:
                stack.pop()
    return state, (stack[-1] if stack else None)


def min_json_tokens(schema: Any, depth: int = 0) -> int:
    """About how many tokens the shortest JSON value `schema` allows takes (keys and digits at ~2 characters a
    token): what the closer must have left when it starts, counted from the start of the document."""
    if not isinstance(schema, Mapping) or depth > 8:
        return 4
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else list(schema["enum"] or [None])
        return 1 + min(len(json.dumps(v)) for v in values) // 2
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return min(min_json_tokens(s, depth + 1) for s in schema[key])
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        return max(min_json_tokens(s, depth + 1) for s in schema["allOf"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return min(min_json_tokens({**schema, "type": k}, depth + 1) for k in kind) if kind else 4
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return 2 + sum(3 + len(k) // 2 + min_json_tokens(props.get(k), depth + 1) for k in schema.get("required") or ())
    if kind == "array":
        return 2 + int(schema.get("minItems") or 0) * (1 + min_json_tokens(schema.get("items"), depth + 1))
    if kind == "string":
        return 2 + int(schema.get("minLength") or 0) + (8 if "pattern" in schema or "format" in schema else 0)
    if kind in ("number", "integer"):
        bound = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        return 1 + len(str(bound)) // 2
    return 2 if "$ref" not in schema else 8


class JsonCloser:
    """The closer of a JSON answer (module docstring): called with the tokens generated so far and the grammar's
    allowed mask, returns the token to force, or None to leave the choice to the model. It starts acting when
    twice the shortest document's tokens (and at least a sixteenth of the budget, 16 tokens) are left."""

    def __init__(self, tokenizer: Tokenizer, thinking: bool, schema: Mapping[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.thinking = thinking
        self.reserve = 8 + 2 * min_json_tokens(schema or {"type": "object"})
        self.think_end = tokenizer.think_end_id
        self.eos = tokenizer.eos_id
        self.char: dict[str, int] = {}
        for ch in '"}],:' + _VALUE_STARTS:
            ids = tokenizer.encode(ch)
            if len(ids) == 1:
                self.char[ch] = ids[0]

    def window(self, max_tokens: int) -> int:
        return max(16, self.reserve, max_tokens // 16)

    def _first_allowed(self, chars: str, allowed: Tensor) -> int | None:
        for ch in chars:
            tid = self.char.get(ch)
            if tid is not None and bool(allowed[tid]):
                return tid
        return None

    def __call__(self, tokens: Sequence[int], allowed: Tensor) -> int | None:
        if bool(allowed[self.eos]):
            return self.eos
        if self.thinking and self.think_end not in tokens:
            return self.think_end if bool(allowed[self.think_end]) else None
        text = self.tokenizer.decode(list(tokens))
        answer = text.split(THINK_END)[-1] if self.thinking else text
        return self.close(*scan_json(answer), allowed)

    def close(self, state: str, container: str | None, allowed: Tensor) -> int | None:
        """The closing token for a JSON prefix that `scan_json` places at (`state`, `container`)."""
        if state in ("string", "key_string"):
            return self._first_allowed('"', allowed)
        if state in ("scalar", "after"):
            closer = {"{": "}", "[": "]"}.get(container or "", "")
            return self._first_allowed(closer + ",", allowed)
        if state == "key":
            return self._first_allowed('}"', allowed)
        if state == "colon":
            return self._first_allowed(":", allowed)
        return self._first_allowed(_VALUE_STARTS, allowed)


def min_call_tokens(tool: Mapping[str, Any]) -> int:
    """About how many tokens the shortest call of an OpenAI function tool takes in DSML: the block and invoke
    markers (~30), and per required parameter its markers and name (~16) and its shortest value."""
    params = tool.get("function", {}).get("parameters") or {}
    props = params.get("properties") or {}
    return 30 + sum(16 + min_json_tokens(props.get(k)) for k in params.get("required") or ())


class ToolCallCloser:
    """The closer of an answer that is, or may end in, a DSML tool-call block: when the call is `forced`, end the
    reasoning; inside the block, close what is open: a raw string value with its `</｜DSML｜parameter>`, a JSON
    value as `JsonCloser` would, then the markers (`</`, a newline) that end the parameter, the invoke and the block
    (the grammar writes a required parameter's marker and name when one is missing). Free text before a block,
    under tool_choice "auto", is left alone: it may end anywhere."""

    def __init__(self, tokenizer: Tokenizer, thinking: bool, forced: bool,
                 tools: Sequence[Mapping[str, Any]] = ()) -> None:
        self.tokenizer = tokenizer
        self.thinking = thinking
        self.forced = forced
        self.reserve = 8 + 2 * max((min_call_tokens(t) for t in tools), default=40)
        self.think_end = tokenizer.think_end_id
        self.eos = tokenizer.eos_id
        self.json = JsonCloser(tokenizer, thinking=False)
        # the marker token right after "<" or "</" (which the raw text of a value may also contain: the marker is
        # what ends it), then the starts of an ending marker, a new line, a new marker
        self.marks = [ids[0] for mark in (DSML, "</", "\n", "<") if len(ids := tokenizer.encode(mark)) == 1]

    def window(self, max_tokens: int) -> int:
        """Twice the largest tool's shortest call (and at least a sixteenth of the budget, 16 tokens)."""
        return max(16, self.reserve, max_tokens // 16)

    def __call__(self, tokens: Sequence[int], allowed: Tensor) -> int | None:
        ended = not self.thinking or self.think_end in tokens
        if not ended:
            return self.think_end if self.forced and bool(allowed[self.think_end]) else None
        text = self.tokenizer.decode(list(tokens))
        answer = text.split(THINK_END)[-1] if self.thinking else text
        if not self.forced and TOOL_CALLS_START not in answer:
            return None  # free text, which may end anywhere
        if bool(allowed[self.eos]):
            return self.eos
        opened, closed = answer.rfind(PARAMETER_START), answer.rfind(PARAMETER_END)
        head_end = answer.find('">', opened) if opened > closed else -1
        if head_end >= 0 and answer[opened:head_end].endswith('string="false'):  # inside a JSON value
            state, container = scan_json(answer[head_end + 2:])
            if container is not None or state not in ("scalar", "after"):  # not yet a complete value
                pick = self.json.close(state, container, allowed)
                if pick is not None:
                    return pick
        return next((t for t in self.marks if bool(allowed[t])), None)
