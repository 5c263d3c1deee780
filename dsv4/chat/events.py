"""What the DeepSeek-V4 completion parsers produce: events, and the message they add up to.

`dsv4.chat.streaming.StreamParser` turns a completion into events chunk by chunk, and
`dsv4.chat.parser.parse_completion` gives the whole message at once; both speak the types here, and
the servers and `dsv4 chat` consume them. The types live apart from both parsers so that a consumer
needs neither parser to name an event, and so the parsers depend on this module and not on each other.

    ReasoningDelta(text)                text of the reasoning (thinking mode), in order
    ContentDelta(text)                  text of the visible answer, in order
    ToolCallStart(index, id, name)      a tool call begins (indexes count from 0 over the completion)
    ToolCallArgumentsDelta(index, text) the next piece of that call's arguments JSON
    ToolCallEnd(index, warnings)        the call is complete (its arguments are a JSON object)
    Finish(reason)                      the completion ended: "stop", "tool_calls", "length", ...

`aggregate_events` rebuilds the message (`ParsedMessage`) a client would from the deltas.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

IdFactory = Callable[[int], str]  # call index -> tool call id

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def new_tool_call_id(index: int) -> str:
    """A fresh unique id shaped like DeepSeek's: `call_00_` + 22 random base-62 characters."""
    n = uuid.uuid4().int
    tail = []
    for _ in range(22):
        n, r = divmod(n, 62)
        tail.append(_B62[r])
    return f"call_{index:02d}_{''.join(tail)}"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete tool call of a parsed message."""

    id: str
    name: str
    arguments: str  # a JSON object, as text
    warnings: tuple[str, ...] = ()

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """A whole completion: what `parse_completion` returns and `aggregate_events` rebuilds."""

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
