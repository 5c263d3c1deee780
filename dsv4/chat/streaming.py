"""DeepSeek-V4 completion text -> events, chunk by chunk (the streaming parser).

    sp = StreamParser(thinking=True, tools=request_tools)
    for piece in detokenized_pieces:
        for event in sp.feed(piece): ...
    for event in sp.finish(engine_reason): ...      # "stop", "length", ... or None to infer

Events (`dsv4.chat.events`): ReasoningDelta(text), ContentDelta(text), ToolCallStart(index, id, name),
ToolCallArgumentsDelta(index, text), ToolCallEnd(index, warnings), Finish(reason). A call's argument
deltas concatenate to exactly its final arguments JSON: "{", then per parameter `"K": ` and its value
(a string="true" value streams as JSON-escaped text between quotes as it arrives; a value that must be
complete to be typed comes whole at `</｜DSML｜parameter>`), then "}". `aggregate_events` of the events
of any chunking of a text equals `parse_completion` of that text.

Hold-back: text is emitted as soon as it cannot be part of a marker. Held are only the longest suffix
that is a proper prefix of a marker the current state looks for (`</think>`, "\\n\\n" +
`<｜DSML｜tool_calls>`, EOS, `</｜DSML｜parameter>`, ...) and, for the reserved strings removed from
the output, the suffix that could still become one (below). Each chunk is scanned once with
`str.find`, so the cost is linear in the text, whatever the chunk sizes.

Rules (the same for `parse_completion`, which defers to this machine whenever a text is not in the
exact official layout):

* Reasoning (thinking mode) ends at `</think>`; at a `<｜DSML｜tool_calls>` opener (a missing
  `</think>`: the text before it, minus a "\\n\\n" just before it, is the reasoning and the block is
  parsed as tool calls); or at EOS (no `</think>` at all: everything is reasoning, content is empty).
* Content ends at EOS. A `<｜DSML｜tool_calls>` opener anywhere in it starts a block; the "\\n\\n"
  right before the opener is dropped (only that, a lone "\\n" stays content). Text after a block
  other than whitespace is content again (and may hold another block; call indexes keep counting).
* Inside a block any whitespace may separate tags (the official layout has exactly "\\n"). A tag
  attribute is `name="..."` with no `"`, `<`, `>` or newline in the name (a call name must be
  non-empty); the parameter's `string="true|false"` may be missing (read as "false"). A parameter
  value runs to `</｜DSML｜parameter>`; a `</｜DSML｜invoke>` met first closes the parameter and the
  call (warning).
* Malformed DSML (any other text where a tag is expected): the raw text not yet turned into events
  (from the opener, or from the end of the last complete call or parameter) goes to content and
  the parser continues in content. A call already started is closed first (its arguments stay a
  valid JSON object) with a warning. Nothing raises.
* The end (EOS, or `finish` without EOS) inside a block: an unfinished tag or call header is
  dropped; a started call is closed with a warning: a string parameter being streamed is closed
  as it is (a partial closing tag held at its end is dropped), a parameter that needed its
  complete value (typed) is dropped. Held text of reasoning and content is emitted as text (it may
  be a cut marker, or just a "<"). Text after EOS is ignored.
* A duplicate parameter name in a call: the first is kept, the later one dropped (warning).
* Reserved strings (BOS, EOS, `<think>`, `</think>`, `｜DSML｜`) are deleted from reasoning,
  content, names, keys and values, so a malformed block reads as `<tool_calls>`/`<invoke ...>`
  text in the content and no marker ever leaks. Deletion works like a stack (a marker formed by
  deleting another, as in `<</think>think>`, is deleted too), so the output never contains one.
* finish_reason: the engine's reason, None meaning "stop" after EOS and "length" without it;
  "stop" becomes "tool_calls" when the message has calls.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from dsv4.chat.arguments import ToolSchemas, coerces_string, json_param_json, string_param_json, unknown_tool_warning
from dsv4.chat.events import (
    ContentDelta,
    Event,
    Finish,
    IdFactory,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
    final_reason,
    new_tool_call_id,
)
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

# ------------------------------------------------------------------------------------------------
# deletion of the reserved strings, streamed

_PREFIXES = frozenset(m[:i] for m in RESERVED for i in range(1, len(m)))
_ALPHABET = frozenset("".join(RESERVED))
_OPENERS = frozenset(m[0] for m in RESERVED)  # "<" and "｜"
_ENDING: dict[str, tuple[str, ...]] = {}
for _m in RESERVED:
    _ENDING[_m[-1]] = (*_ENDING.get(_m[-1], ()), _m)
_NO_STATES: dict[str, int] = {}


def _next_opener(text: str, i: int) -> int:
    a = text.find("<", i)
    b = text.find("｜", i)
    if a < 0:
        return b
    return a if b < 0 or a < b else b


class Scrubber:
    """Deletes the reserved strings from a text stream, like a stack: each character is pushed, and
    a reserved string on top of the stack is popped, so the output never contains one (not even one
    formed by a deletion). A character is emitted once no future input can pop it: the held part is
    the longest suffix of the stack that splits into proper prefixes of reserved strings (only such
    a suffix can still be completed and deleted, piece by piece from the top). The split is tracked
    with a small automaton whose states map a prefix to the earliest position a split can start."""

    __slots__ = ("_held", "_pos")

    def __init__(self) -> None:
        self._held: list[tuple[str, int, dict[str, int]]] = []  # (char, position, states after it)
        self._pos = 0

    def feed(self, text: str) -> str:
        held = self._held
        if not held and "<" not in text and "｜" not in text:
            self._pos += len(text)
            return text
        out: list[str] = []
        pos = self._pos
        i, n = 0, len(text)
        while i < n:
            if not held:
                j = _next_opener(text, i)
                if j < 0:
                    out.append(text[i:])
                    pos += n - i
                    break
                if j > i:
                    out.append(text[i:j])
                    pos += j - i
                    i = j
            c = text[i]
            i += 1
            if c not in _ALPHABET:  # can be in no reserved string: the whole stack is final
                out.extend(e[0] for e in held)
                held.clear()
                out.append(c)
                pos += 1
                continue
            top = held[-1][2] if held else _NO_STATES
            states: dict[str, int] = {}
            for node, start in top.items():
                nxt = node + c
                if nxt in _PREFIXES:
                    old = states.get(nxt)
                    states[nxt] = start if old is None or start < old else old
            if c in _OPENERS:  # a new piece may start here
                start = min(top.values()) if top else pos
                old = states.get(c)
                states[c] = start if old is None or start < old else old
            held.append((c, pos, states))
            pos += 1
            for m in _ENDING.get(c, ()):
                k = len(m)
                if len(held) >= k and "".join(e[0] for e in held[-k:]) == m:
                    del held[-k:]
                    break
            if held:
                top = held[-1][2]
                live = min(top.values()) if top else pos
                k = 0
                while k < len(held) and held[k][1] < live:
                    k += 1
                if k:
                    out.extend(e[0] for e in held[:k])
                    del held[:k]
        self._pos = pos
        return "".join(out)

    def flush(self) -> str:
        out = "".join(e[0] for e in self._held)
        self._held.clear()
        return out


def scrub(text: str) -> str:
    """`text` with the reserved strings deleted (stack semantics, as `Scrubber`)."""
    if "<" not in text and "｜" not in text:
        return text
    s = Scrubber()
    return s.feed(text) + s.flush()


# ------------------------------------------------------------------------------------------------
# the state machine

_REASONING, _CONTENT, _AFTER_BLOCK, _BLOCK, _INVOKE_NAME, _INVOKE, _PARAM_HEADER, _VALUE, _DONE = range(9)

_OPENER = TOOL_CALLS_SEPARATOR + TOOL_CALLS_START
_REASONING_MARKS = (THINK_END, _OPENER, TOOL_CALLS_START, EOS)  # held back as prefixes
_REASONING_ENDS = (THINK_END, TOOL_CALLS_START, EOS)  # searched (the separator is checked before the opener)
_CONTENT_MARKS = (_OPENER, TOOL_CALLS_START, EOS)
_CONTENT_ENDS = (TOOL_CALLS_START, EOS)
_VALUE_MARKS = (PARAMETER_END, INVOKE_END, EOS)
_BLOCK_TAGS = (INVOKE_START, TOOL_CALLS_END, EOS)
_INVOKE_TAGS = (PARAMETER_START, INVOKE_END, EOS)
_WS = " \t\r\n"
_MAX_HEADER = 1024  # longest name or parameter header accepted before a '>'

_NAME_STOP = re.compile(r'["<>\n]')
_HEADER_STOP = re.compile(r"[<>\n]")
_HEADER = re.compile(r'([^"]*)"(?:[ \t]+string="(true|false)")?[ \t]*')
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\]')

_STREAM, _TYPED_STRING, _JSON, _SKIP = range(4)  # how a parameter value is handled


def _escape(text: str) -> str:
    """JSON string body of `text` (concatenates: escape(a) + escape(b) == escape(a + b))."""
    if _NEEDS_ESCAPE.search(text) is None:
        return text
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _hold_start(buf: str, marks: tuple[str, ...], firsts: str) -> int:
    """Start of the longest suffix of `buf` that is a proper prefix of one of `marks` (len(buf) if
    none); `firsts` are the marks' first characters."""
    n = len(buf)
    lo = max(0, n - max(len(m) for m in marks) + 1)
    best = n
    for f in firsts:
        k = buf.find(f, lo)
        while 0 <= k < best:
            tail = buf[k:]
            if any(m.startswith(tail) for m in marks):
                best = k
                break
            k = buf.find(f, k + 1)
    return best


def _earliest(buf: str, marks: tuple[str, ...]) -> tuple[int, str | None]:
    best, which = -1, None
    for m in marks:
        p = buf.find(m, 0, best + len(m) - 1 if best >= 0 else len(buf))
        if p >= 0 and (best < 0 or p < best):
            best, which = p, m
    return best, which


class _Call:
    __slots__ = ("index", "name", "nparams", "keys", "warnings")

    def __init__(self, index: int, name: str):
        self.index = index
        self.name = name
        self.nparams = 0
        self.keys: set[str] = set()
        self.warnings: list[str] = []


class _Param:
    __slots__ = ("key", "mode", "types", "parts", "scrubber")

    def __init__(self, key: str, mode: int, types: frozenset[str] | None):
        self.key = key
        self.mode = mode
        self.types = types
        self.parts: list[str] = []
        self.scrubber = Scrubber()


class StreamParser:
    """Incremental parser of one completion; see the module doc for the rules. Never raises."""

    def __init__(
        self,
        thinking: bool = True,
        tools: Iterable[Mapping[str, Any]] | ToolSchemas | None = None,
        *,
        id_factory: IdFactory | None = None,
    ):
        self._schemas = tools if isinstance(tools, ToolSchemas) else ToolSchemas(tools)
        self._new_id = id_factory or new_tool_call_id
        self._state = _REASONING if thinking else _CONTENT
        self._buf = ""
        self._reasoning = Scrubber()
        self._content = Scrubber()
        self._events: list[Event] = []
        self._pending: list[str] = []  # raw DSML consumed since the last event-producing point
        self._ws: list[str] = []  # whitespace after a block
        self._ncalls = 0
        self._call: _Call | None = None
        self._param: _Param | None = None
        self._eos = False
        self._finished = False
        self._handlers = {
            _REASONING: self._text,
            _CONTENT: self._text,
            _AFTER_BLOCK: self._after_block,
            _BLOCK: self._block,
            _INVOKE_NAME: self._invoke_name,
            _INVOKE: self._invoke,
            _PARAM_HEADER: self._param_header,
            _VALUE: self._value,
        }

    # -- public --------------------------------------------------------------------------------

    def feed(self, chunk: str) -> list[Event]:
        """Events the text `chunk` (the next piece of the completion) completes."""
        st = self._state
        if st == _DONE or self._finished or not chunk:
            return []
        if not self._buf:  # fast paths: nothing held and nothing in the chunk that could start a mark
            if st == _CONTENT or st == _REASONING:
                if "<" not in chunk and "\n" not in chunk:
                    if st == _CONTENT:
                        text = self._content.feed(chunk)
                        return [ContentDelta(text)] if text else []
                    text = self._reasoning.feed(chunk)
                    return [ReasoningDelta(text)] if text else []
            elif st == _VALUE and self._param.mode == _STREAM and "<" not in chunk:
                text = self._param.scrubber.feed(chunk)
                return [ToolCallArgumentsDelta(self._call.index, _escape(text))] if text else []
        self._buf += chunk
        self._run()
        events, self._events = self._events, []
        return events

    def finish(self, reason: str | None = None) -> list[Event]:
        """End of the completion: flush and close what is open, then Finish (once)."""
        if self._finished:
            return []
        if self._state != _DONE:
            # what a value holds back can only be the start of a closing tag: not value text
            self._end("" if self._state == _VALUE else self._buf)
        self._finished = True
        self._events.append(Finish(final_reason(reason, self._eos, self._ncalls)))
        events, self._events = self._events, []
        return events

    # -- emission ------------------------------------------------------------------------------

    def _emit(self, cls: type, text: str) -> None:
        if not text:
            return
        ev = self._events
        if ev and type(ev[-1]) is cls:
            ev[-1] = cls(ev[-1].text + text)
        else:
            ev.append(cls(text))

    def _args(self, text: str) -> None:
        ev = self._events
        index = self._call.index
        last = ev[-1] if ev else None
        if type(last) is ToolCallArgumentsDelta and last.index == index:
            ev[-1] = ToolCallArgumentsDelta(index, last.text + text)
        else:
            ev.append(ToolCallArgumentsDelta(index, text))

    def _to_reasoning(self, raw: str) -> None:
        if raw:
            self._emit(ReasoningDelta, self._reasoning.feed(raw))

    def _to_content(self, raw: str) -> None:
        if raw:
            self._emit(ContentDelta, self._content.feed(raw))

    # -- driving -------------------------------------------------------------------------------

    def _run(self) -> None:
        handlers = self._handlers
        while self._state != _DONE and handlers[self._state]():
            pass

    def _end(self, tail: str) -> None:
        """The completion ends (EOS or finish) with `tail` unconsumed in the current state."""
        st = self._state
        if st == _REASONING:
            self._to_reasoning(tail)
        elif st == _CONTENT:
            self._to_content(tail)
        elif st == _VALUE:
            p = self._param
            if p.mode == _STREAM:
                self._value_text(tail)
                self._close_param()
            elif p.mode != _SKIP:
                self._call.warnings.append(f"parameter {p.key!r} incomplete at the end of the output; dropped")
            self._param = None
        # block-level states: an unfinished tag or header (in `_pending` and `tail`) is dropped
        if self._call is not None:
            self._close_call("incomplete: the output ended inside the call")
        self._pending = []
        self._ws = []
        self._emit(ReasoningDelta, self._reasoning.flush())
        self._emit(ContentDelta, self._content.flush())
        self._buf = ""
        self._state = _DONE

    def _eos_at(self, p: int) -> bool:
        """EOS found at `p` in the buffer: the text before it ends the current state."""
        self._eos = True
        self._end(self._buf[:p])
        return False

    def _malformed(self) -> bool:
        """Text that is not DSML where a tag was expected: close the open call, and the raw text not
        yet turned into events goes to content, where parsing continues."""
        if self._call is not None:
            self._close_call("malformed DSML in the call; the rest went to content")
        raw = "".join(self._pending)
        self._pending = []
        self._state = _CONTENT
        self._to_content(raw)
        return True

    # -- reasoning and content -----------------------------------------------------------------

    def _text(self) -> bool:
        buf = self._buf
        if not buf:
            return False
        reasoning = self._state == _REASONING
        p, mark = _earliest(buf, _REASONING_ENDS if reasoning else _CONTENT_ENDS)
        if mark is None:
            k = _hold_start(buf, _REASONING_MARKS if reasoning else _CONTENT_MARKS, "<\n")
            if k:
                (self._to_reasoning if reasoning else self._to_content)(buf[:k])
                self._buf = buf[k:]
            return False
        if mark == EOS:
            return self._eos_at(p)
        text, sep = buf[:p], ""
        if mark == TOOL_CALLS_START and text.endswith(TOOL_CALLS_SEPARATOR):
            text, sep = text[: -len(TOOL_CALLS_SEPARATOR)], TOOL_CALLS_SEPARATOR
        self._buf = buf[p + len(mark):]
        if reasoning:
            self._to_reasoning(text)
            self._emit(ReasoningDelta, self._reasoning.flush())
        else:
            self._to_content(text)
        if mark == THINK_END:
            self._state = _CONTENT
        else:
            self._pending = [sep, TOOL_CALLS_START]
            self._state = _BLOCK
        return True

    def _after_block(self) -> bool:
        buf = self._buf
        s = buf.lstrip(_WS)
        if len(s) != len(buf):  # whitespace after a block is held aside; dropped at the end
            self._ws.append(buf[: len(buf) - len(s)])
            self._buf = buf = s
        if not s:
            return False
        if s.startswith(EOS):
            return self._eos_at(0)
        if EOS.startswith(s):
            return False
        self._buf = "".join(self._ws) + buf  # more text: content again, whitespace included
        self._ws = []
        self._state = _CONTENT
        return True

    # -- DSML ----------------------------------------------------------------------------------

    def _skip_ws(self) -> str:
        buf = self._buf
        s = buf.lstrip(_WS)
        if len(s) != len(buf):
            self._pending.append(buf[: len(buf) - len(s)])
            self._buf = s
        return s

    def _tag(self, tags: tuple[str, ...]) -> str | None:
        """The tag of `tags` the buffer starts with; "" when it may still become one; None if not."""
        s = self._buf
        for t in tags:
            if s.startswith(t):
                return t
        for t in tags:
            if t.startswith(s):
                return ""
        return None

    def _block(self) -> bool:
        if not self._skip_ws():
            return False
        tag = self._tag(_BLOCK_TAGS)
        if tag == "":
            return False
        if tag is None:
            return self._malformed()
        if tag == EOS:
            return self._eos_at(0)
        self._buf = self._buf[len(tag):]
        if tag == INVOKE_START:
            self._pending.append(tag)
            self._state = _INVOKE_NAME
        else:  # the block is closed
            self._pending = []
            self._state = _AFTER_BLOCK
        return True

    def _header_end(self, stop: re.Pattern) -> int | None:
        """Position of the header's end character in the buffer; -1 to wait; None when malformed."""
        buf = self._buf
        m = stop.search(buf, 0, _MAX_HEADER + 1)
        if m is None:
            return -1 if len(buf) <= _MAX_HEADER else None
        q = m.start()
        if buf[q] == "<":
            rest = buf[q:]
            if rest.startswith(EOS):
                return -2 - q  # EOS inside the header
            return -1 if EOS.startswith(rest) else None
        return q

    def _invoke_name(self) -> bool:
        q = self._header_end(_NAME_STOP)
        if q == -1:
            return False
        if q is None:
            return self._malformed()
        if q <= -2:
            return self._eos_at(-2 - q)
        buf = self._buf
        if buf[q] != '"' or q == 0:
            return self._malformed()
        if q + 1 == len(buf):
            return False
        if buf[q + 1] != ">":
            return self._malformed()
        name = scrub(buf[:q])
        self._buf = buf[q + 2:]
        index = self._ncalls
        self._ncalls += 1
        call = self._call = _Call(index, name)
        if self._schemas.unknown(name):
            call.warnings.append(unknown_tool_warning(name))
        self._events.append(ToolCallStart(index, self._new_id(index), name))
        self._args("{")
        self._pending = []
        self._state = _INVOKE
        return True

    def _invoke(self) -> bool:
        if not self._skip_ws():
            return False
        tag = self._tag(_INVOKE_TAGS)
        if tag == "":
            return False
        if tag is None:
            return self._malformed()
        if tag == EOS:
            return self._eos_at(0)
        self._buf = self._buf[len(tag):]
        if tag == PARAMETER_START:
            self._pending.append(tag)
            self._state = _PARAM_HEADER
        else:
            self._close_call(None)
            self._pending = []
            self._state = _BLOCK
        return True

    def _param_header(self) -> bool:
        q = self._header_end(_HEADER_STOP)
        if q == -1:
            return False
        if q is None:
            return self._malformed()
        if q <= -2:
            return self._eos_at(-2 - q)
        buf = self._buf
        if buf[q] != ">":
            return self._malformed()
        m = _HEADER.fullmatch(buf, 0, q)
        if m is None:
            return self._malformed()
        self._buf = buf[q + 1:]
        self._pending = []
        call = self._call
        key = scrub(m.group(1))
        types = self._schemas.types(call.name, key)
        if key in call.keys:
            call.warnings.append(f"duplicate parameter {key!r} ignored")
            mode = _SKIP
        elif m.group(2) == "true":
            mode = _TYPED_STRING if coerces_string(types) else _STREAM
        else:
            mode = _JSON
        self._param = _Param(key, mode, types)
        if mode == _STREAM:
            self._param_prefix(key)
            self._args('"')
        self._state = _VALUE
        return True

    def _param_prefix(self, key: str) -> None:
        call = self._call
        call.keys.add(key)
        self._args(f'{", " if call.nparams else ""}{json.dumps(key, ensure_ascii=False)}: ')
        call.nparams += 1

    def _value_text(self, raw: str) -> None:
        if not raw:
            return
        p = self._param
        if p.mode == _STREAM:
            text = p.scrubber.feed(raw)
            if text:
                self._args(_escape(text))
        elif p.mode != _SKIP:
            p.parts.append(raw)

    def _close_param(self) -> None:
        p = self._param
        if p.mode == _STREAM:
            self._args(_escape(p.scrubber.flush()) + '"')
        elif p.mode != _SKIP:
            raw = scrub("".join(p.parts))
            if p.mode == _TYPED_STRING:
                value = string_param_json(raw, p.types)
            else:
                value, warning = json_param_json(p.key, raw, p.types)
                if warning:
                    self._call.warnings.append(warning)
            self._param_prefix(p.key)
            self._args(value)
        self._param = None

    def _value(self) -> bool:
        buf = self._buf
        p, mark = _earliest(buf, _VALUE_MARKS)
        if mark is None:
            k = _hold_start(buf, _VALUE_MARKS, "<")
            if k:
                self._value_text(buf[:k])
                self._buf = buf[k:]
            return False
        if mark == EOS:
            return self._eos_at(p)
        self._value_text(buf[:p])
        self._buf = buf[p + len(mark):]
        self._close_param()
        if mark == PARAMETER_END:
            self._state = _INVOKE
        else:
            self._close_call("missing parameter end tag before the end of the call")
            self._state = _BLOCK
        return True

    def _close_call(self, warning: str | None) -> None:
        call = self._call
        if warning:
            call.warnings.append(warning)
        self._args("}")
        self._events.append(ToolCallEnd(call.index, tuple(call.warnings)))
        self._call = None
