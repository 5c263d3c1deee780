"""The Anthropic Messages protocol (`dsv4.serve.protocols.anthropic`).

First the pieces alone: request conversion to `ChatRequest`, the mode / tool_choice / stop_reason mappings,
thinking signatures, and the renderer's SSE event sequence and message JSON from hand-written backend
events. Then conformance: a live loopback server (the real `ChatService` over the scripted engine, so
tokenizer, stop strings and the DSML parser run for real) driven by the official `anthropic` SDK, whose
stream accumulator checks the event order and block indices the way clients do.
"""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import pytest
from serve_stubs import ScriptedEngine, live_server, smart_reply, think, tool_calls

from dsv4.chat.events import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from dsv4.chat.tokenizer import Tokenizer
from dsv4.serve.app import create_app
from dsv4.serve.context import KEEPALIVE, KeepAlive, ServeConfig, ServeContext
from dsv4.serve.protocols import anthropic as A
from dsv4.serve.request import ChoiceEvent, RequestError, Usage
from dsv4.serve.service import ChatService

# ------------------------------------------------------------------------------------------------
# request conversion

SIGN_KEY = b"test signature key"


def _sign(text: str) -> str:
    return A.sign_thinking(text, SIGN_KEY)


def _chat(body: dict, model: str = "dsv4"):
    req = A.parse_request({"model": model, "max_tokens": 64, **body}, A.MessagesRequest)
    return A.to_chat_request(req, model, SIGN_KEY)


def _err(body: dict, cls=A.MessagesRequest) -> RequestError:
    with pytest.raises(RequestError) as info:
        req = A.parse_request(body, cls)
        A.to_chat_request(req, "dsv4", SIGN_KEY)
    return info.value


def test_conversion_of_a_tool_conversation():
    """Every block kind lands where the V4 encoder expects it: system blocks -> one system message, thinking
    -> reasoning_content, tool_use -> tool_calls with JSON-string arguments, tool_result -> tool messages
    before the user's text of the same message."""
    sig = _sign("I should call the tool.")
    chat = _chat({
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools.", "cache_control": {}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should call the tool.", "signature": sig},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "n": 2}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}],
                 "is_error": False},
                {"type": "text", "text": "and tomorrow?"},
            ]},
        ],
        "tools": [{"name": "get_weather", "description": "weather", "input_schema": {
            "type": "object", "properties": {"city": {"type": "string"}}}}],
        "metadata": {"user_id": "u-1"},
        "stop_sequences": ["END"],
        "temperature": 0.5, "top_p": 0.9, "top_k": 5,
    })
    assert chat.messages == [
        {"role": "system", "content": "Be brief.\n\nUse tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "I should call the tool.",
         "tool_calls": [{"id": "toolu_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "n": 2}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "and tomorrow?"},
    ]
    assert chat.tools == [{"type": "function", "function": {
        "name": "get_weather", "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    assert (chat.tool_choice, chat.user, chat.stop, chat.max_tokens) == ("auto", "u-1", ["END"], 64)
    assert (chat.temperature, chat.top_p, chat.top_k, chat.n, chat.mode) == (0.5, 0.9, 5, 1, "think-high")


def test_consecutive_roles_merge_and_final_assistant_is_a_prefill():
    """Anthropic merges consecutive same-role messages; a final assistant message is continued (prefill)."""
    chat = _chat({"system": "S", "messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "The answer is"}]})
    assert chat.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "a\n\nb"},
                             {"role": "assistant", "content": "The answer is", "prefix": True}]


def test_system_messages_inside_messages():
    """A `role: "system"` message (Claude Code's environment, as messages[1]) is accepted anywhere, never merged
    into a user message: placed at the turn boundary before the user turn it follows (joined to a system message
    there), so the encoder still opens the assistant's turn right after the user's."""
    from dsv4.chat.encoding import encode_messages
    chat = _chat({"system": "S", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "system", "content": "# Environment\ncwd: /x"}]})
    assert chat.messages == [{"role": "system", "content": "S\n\n# Environment\ncwd: /x"},
                             {"role": "user", "content": "hi"}]
    prompt = encode_messages(chat.messages)
    assert prompt.endswith("<｜User｜>hi<｜Assistant｜><think>")
    # without `system`, after an assistant turn, before tool results, as text blocks
    chat = _chat({"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]},
        {"role": "system", "content": [{"type": "text", "text": "note"}, {"type": "text", "text": "two"}]},
        {"role": "user", "content": "b"}]})
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "system", "tool", "user"]
    assert chat.messages[2]["content"] == "note\n\ntwo"
    prompt = encode_messages(chat.messages)
    assert "<｜end▁of▁sentence｜>note\n\ntwo<｜User｜><tool_result>r</tool_result>\n\nb<｜Assistant｜>" in prompt
    # a system message between an assistant's tool_use and the results does not break the pairing rule
    chat = _chat({"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]}]})
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "system", "tool"]
    err = _err({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "a"}, {"role": "system", "content": [{"type": "image"}]}]})
    assert err.status == 400 and err.message.startswith("messages.1.content.0: image blocks may not appear")


def _thinking_turns(n: int) -> list[dict]:
    msgs: list[dict] = [{"role": "user", "content": "q0"}]
    for k in range(n):
        text = f"thought {k}"
        msgs += [{"role": "assistant", "content": [{"type": "thinking", "thinking": text, "signature": _sign(text)},
                                                   {"type": "text", "text": f"a{k}"}]},
                 {"role": "user", "content": f"q{k + 1}"}]
    return msgs


@pytest.mark.parametrize("keep, kept", [
    ("all", [0, 1, 2]), ({"type": "thinking_turns", "value": 1}, [2]), ({"type": "thinking_turns", "value": 2}, [1, 2]),
    ({"type": "thinking_turns", "value": 0}, []), ({"type": "thinking_turns", "value": 9}, [0, 1, 2]), (None, [2]),
])
def test_context_management_clear_thinking(keep, kept):
    """`clear_thinking_*` keeps the thinking of the last N thinking turns ("all": every one; no `keep`: 1); the
    cleared blocks are dropped before rendering, unchecked, and counted in `applied_edits`."""
    edit = {"type": "clear_thinking_20251015"} if keep is None else {"type": "clear_thinking_20251015", "keep": keep}
    msgs = _thinking_turns(3)
    msgs[1]["content"][0]["signature"] = "not ours"  # never checked when cleared
    body = {"model": "m", "max_tokens": 5, "messages": msgs, "context_management": {"edits": [edit]}}
    if 0 in kept:
        assert "Invalid `signature`" in _err(body).message
        msgs[1]["content"][0]["signature"] = _sign("thought 0")
    req = A.parse_request(body, A.MessagesRequest)
    chat = A.to_chat_request(req, "dsv4", SIGN_KEY)
    reasoning = [m.get("reasoning_content") for m in chat.messages if m["role"] == "assistant"]
    assert reasoning == [f"thought {k}" if k in kept else None for k in range(3)]
    applied = A.applied_edits(req)
    cleared = 3 - len(kept)
    assert applied == ([{"type": "clear_thinking_20251015", "cleared_thinking_turns": cleared,
                         "cleared_input_tokens": 0}] if cleared else [])
    full = A.to_chat_request(req, "dsv4", SIGN_KEY, apply_edits=False)
    assert [m.get("reasoning_content") for m in full.messages if m["role"] == "assistant"] == [
        "thought 0", "thought 1", "thought 2"]


def test_context_management_edit_types():
    """clear_tool_uses_* is accepted and not applied; an unknown edit type or a bad `keep` is a 400 naming it;
    no `context_management`: nothing cleared, nothing reported."""
    msgs = _thinking_turns(2)
    ok = A.parse_request({"model": "m", "max_tokens": 5, "messages": msgs, "context_management": {"edits": [
        {"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens", "value": 10}}]}}, A.MessagesRequest)
    assert A.applied_edits(ok) == []
    assert sum("reasoning_content" in m for m in A.to_chat_request(ok, "d", SIGN_KEY).messages) == 2
    plain = A.parse_request({"model": "m", "max_tokens": 5, "messages": msgs}, A.MessagesRequest)
    assert A.applied_edits(plain) is None
    for edits, needle in [
        ([{"type": "compact_20990101"}], "context_management.edits.0.type: unknown context management edit type "
                                         "'compact_20990101'"),
        ([{"type": "clear_thinking_20251015", "keep": "all"}, {"kind": 1}], "context_management.edits.1.type"),
        ([{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": "2"}}],
         "context_management.edits.0.keep"),
        ([{"type": "clear_thinking_20251015", "keep": "some"}], "context_management.edits.0.keep"),
    ]:
        err = _err({"model": "m", "max_tokens": 5, "messages": msgs, "context_management": {"edits": edits}})
        assert err.status == 400 and needle in err.message, err.message


def test_unknown_top_level_fields_are_ignored():
    """Any top-level field beyond the honoured ones is accepted and ignored."""
    chat = _chat({"messages": [{"role": "user", "content": "hi"}], "speed": "fast", "inference_geo": "us",
                  "mcp_servers": [{"type": "url"}], "future": {"x": [1]}, "container": "c", "service_tier": "auto"})
    assert chat.messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("thinking, effort, mode", [
    (None, None, "think-high"),  # DeepSeek thinks by default
    ({"type": "enabled", "budget_tokens": 2048}, None, "think-high"),  # budget accepted, ignored
    ({"type": "adaptive"}, "high", "think-high"),
    (None, "low", "think-high"),
    (None, "medium", "think-high"),
    ({"type": "enabled", "budget_tokens": 1024}, "max", "think-max"),
    (None, "xhigh", "think-max"),
    ({"type": "disabled"}, None, "non-think"),
    ({"type": "disabled"}, "max", "non-think"),  # disabled wins over any effort
])
def test_reasoning_mode_mapping(thinking, effort, mode):
    body = {"messages": [{"role": "user", "content": "hi"}]}
    if thinking is not None:
        body["thinking"] = thinking
    if effort is not None:
        body["output_config"] = {"effort": effort}
    assert _chat(body).mode == mode


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, "auto"),
    ({"type": "any", "disable_parallel_tool_use": True}, "required"),
    ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
    ({"type": "none"}, "none"),
])
def test_tool_choice_mapping(choice, expected):
    chat = _chat({"messages": [{"role": "user", "content": "hi"}], "tool_choice": choice,
                  "tools": [{"name": "f", "input_schema": {"type": "object"}}]})
    assert chat.tool_choice == expected


def _replay(*blocks) -> list[dict]:
    """A conversation whose assistant turn is `blocks` followed by a text block."""
    return [{"role": "user", "content": "q"},
            {"role": "assistant", "content": [*blocks, {"type": "text", "text": "a"}]},
            {"role": "user", "content": "more"}]


def test_thinking_blocks_come_back_only_with_our_signature():
    """A replayed thinking block is accepted with the signature this server issued for its text; a missing, empty,
    foreign or forged one, or ours over another text, is Anthropic's 400 naming the block."""
    text = "Reasoning about the call."
    chat = _chat({"messages": _replay({"type": "thinking", "thinking": text, "signature": _sign(text)})})
    assert chat.messages[1]["reasoning_content"] == text
    bad = [None, "", "EqQBCkgIARABGAIiQL...anthropic-signature", "AAAAbogus", "dsv4." + "A" * 43,
           _sign(text)[:-1] + ("B" if _sign(text)[-1] != "B" else "C"), A.sign_thinking(text, b"another server")]
    for sig in bad:
        block = {"type": "thinking", "thinking": text}
        if sig is not None:
            block["signature"] = sig
        err = _err({"model": "m", "max_tokens": 5, "messages": _replay(block)})
        assert (err.status, err.message) == (400, "messages.1.content.0: Invalid `signature` in `thinking` block"), sig
    edited = {"type": "thinking", "thinking": text + " (edited)", "signature": _sign(text)}
    assert "Invalid `signature`" in _err({"model": "m", "max_tokens": 5, "messages": _replay(edited)}).message


def test_omitted_thinking_verifies_what_the_client_cannot_forge():
    """A block shown with display "omitted" comes back with an empty text: its signature still has to be one this
    server issued (the tag over the text's digest), though it gives the model no reasoning."""
    omitted = {"type": "thinking", "thinking": "", "signature": _sign("the hidden reasoning")}
    chat = _chat({"messages": _replay(omitted)})
    assert "reasoning_content" not in chat.messages[1]
    for forged in ("AAAAbogus", "dsv4." + "A" * 43, A.sign_thinking("x", b"another server")):
        err = _err({"model": "m", "max_tokens": 5, "messages": _replay({**omitted, "signature": forged})})
        assert "Invalid `signature` in `thinking` block" in err.message


def test_redacted_thinking_is_refused():
    """This server writes no redacted_thinking blocks, so one sent back cannot be genuine (Anthropic's message)."""
    err = _err({"model": "m", "max_tokens": 5, "messages": _replay({"type": "redacted_thinking", "data": "EmwKAhgB"})})
    assert (err.status, err.message) == (400, "messages.1.content.0: Invalid `data` in `redacted_thinking` block")


def test_signature_is_deterministic_keyed_and_verifiable():
    s = _sign("abc")
    assert s == _sign("abc") and s.startswith("dsv4.") and len(s) == 5 + 43
    assert A.verify_signature("abc", s, SIGN_KEY) and not A.verify_signature("abd", s, SIGN_KEY)
    assert A.verify_signature("", s, SIGN_KEY) and not A.verify_signature("", s, b"other key")
    assert A.sign_thinking("abc", b"other key") != s and not A.verify_signature("abc", s, b"other key")
    assert not A.verify_signature("abc", s + "=", SIGN_KEY) and not A.verify_signature("abc", None, SIGN_KEY)


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}],
     "unexpected tool_use_id"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
      {"role": "user", "content": "no result"}], "without tool_result"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}],
     "without tool_result"),
    ([{"role": "user", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}],
     "only appear in assistant"),
    ([{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": ""}}]}],
     "not supported"),
    ([{"role": "user", "content": []}], "must not be empty"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}},
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}], "duplicate tool_use id"),
])
def test_conversation_rules(messages, needle):
    err = _err({"model": "m", "max_tokens": 5, "messages": messages})
    assert err.status == 400 and needle in err.message, err.message


def test_validation_messages_name_the_field():
    """pydantic's union-branch names are dropped from the path; the deepest error is the one reported."""
    base = {"model": "m", "max_tokens": 5}
    cases = [
        ({**base, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages.0.content.0.text: Field required"),
        ({**base, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
         "messages.0.content.0: unknown type 'video'"),
        ({**base, "max_tokens": "5", "messages": [{"role": "user", "content": "x"}]}, "max_tokens:"),
        ({**base, "max_tokens": True, "messages": [{"role": "user", "content": "x"}]}, "max_tokens:"),
        ({**base, "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "on"}}, "thinking.type:"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
    ]
    for body, start in cases:
        assert _err(body).message.startswith(start), _err(body).message
    # count_tokens needs no max_tokens, and unknown keys are fine everywhere
    req = A.parse_request({"model": "m", "messages": [{"role": "user", "content": "x", "extra": 1}],
                           "betas": ["x"]}, A.CountTokensRequest)
    assert A.to_chat_request(req, "m", SIGN_KEY).max_tokens is None


def test_error_body_and_types():
    assert A.error_body(404, "no such model") == {
        "type": "error", "error": {"type": "not_found_error", "message": "no such model"}}
    assert [A.error_type(s) for s in (400, 401, 403, 404, 413, 422, 429, 500, 529, 418, 502)] == [
        "invalid_request_error", "authentication_error", "permission_error", "not_found_error",
        "request_too_large", "invalid_request_error", "rate_limit_error", "api_error", "overloaded_error",
        "invalid_request_error", "api_error"]


# ------------------------------------------------------------------------------------------------
# rendering


def _events(*evs, index: int = 0):
    return [ChoiceEvent(index, e) for e in evs]


USAGE = Usage(prompt_tokens=100, completion_tokens=20, cached_tokens=64, reasoning_tokens=7, cost=0.0)


def _script():
    return [
        *_events(ReasoningDelta("Let me "), ReasoningDelta("think."), ContentDelta("Sure."),
                 ToolCallStart(0, "call_00_a", "f"), ToolCallArgumentsDelta(0, '{"x": '),
                 ToolCallArgumentsDelta(0, "1}"), ToolCallEnd(0),
                 ToolCallStart(1, "call_01_b", "g"), ToolCallEnd(1), Finish("tool_calls")),
        *_events(ContentDelta("other choice"), index=1),  # Anthropic has only choice 0
        USAGE,
    ]


def test_renderer_event_sequence():
    """The documented order, with the signature delta right before the thinking block stops, and indices
    equal to the blocks' positions."""
    r = A.MessageRenderer("deepseek-v4-flash", input_tokens=100, message_id="msg_1", signature_key=SIGN_KEY)
    events = r.start()
    for item in _script():
        events += r.feed(item)
    events += r.finish()
    names = [(n, d.get("index"), (d.get("delta") or d.get("content_block") or {}).get("type")) for n, d in events]
    assert names == [
        ("message_start", None, None),
        ("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"), ("content_block_delta", 0, "signature_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"), ("content_block_delta", 1, "text_delta"), ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"), ("content_block_delta", 2, "input_json_delta"),
        ("content_block_delta", 2, "input_json_delta"), ("content_block_stop", 2, None),
        ("content_block_start", 3, "tool_use"), ("content_block_stop", 3, None),
        ("message_delta", None, None), ("message_stop", None, None),
    ]
    assert events[0][1]["message"]["usage"]["input_tokens"] == 100
    assert events[1][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[4][1]["delta"]["signature"] == _sign("Let me think.")
    assert events[9][1]["content_block"] == {"type": "tool_use", "id": "call_00_a", "name": "f", "input": {}}
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"input_tokens": 36, "output_tokens": 20, "cache_creation_input_tokens": 0,
                                       "cache_read_input_tokens": 64, "output_tokens_details": {"thinking_tokens": 7}}}
    msg = r.message()
    assert msg["content"] == [
        {"type": "thinking", "thinking": "Let me think.", "signature": _sign("Let me think.")},
        {"type": "text", "text": "Sure."},
        {"type": "tool_use", "id": "call_00_a", "name": "f", "input": {"x": 1}},
        {"type": "tool_use", "id": "call_01_b", "name": "g", "input": {}},
    ]
    assert (msg["id"], msg["type"], msg["role"], msg["model"]) == ("msg_1", "message", "assistant",
                                                                   "deepseek-v4-flash")
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("tool_use", None)


def test_renderer_omitted_thinking_keeps_the_signature():
    r = A.MessageRenderer("m", show_thinking=False, signature_key=SIGN_KEY)
    msg = A.render_message(r, _events(ReasoningDelta("secret"), ContentDelta("hi"), Finish("stop")))
    assert msg["content"][0] == {"type": "thinking", "thinking": "", "signature": _sign("secret")}
    assert msg["stop_reason"] == "end_turn"


def test_each_thinking_block_is_signed_for_its_own_text():
    msg = A.render_message(A.MessageRenderer("m", signature_key=SIGN_KEY), _events(
        ReasoningDelta("one"), ContentDelta("x"), ReasoningDelta("two"), ContentDelta("y"), Finish("stop")))
    assert [(b["type"], b.get("thinking"), b.get("signature")) for b in msg["content"]] == [
        ("thinking", "one", _sign("one")), ("text", None, None),
        ("thinking", "two", _sign("two")), ("text", None, None)]


@pytest.mark.parametrize("reason, seq, expected", [
    ("stop", None, "end_turn"), ("length", None, "max_tokens"), ("tool_calls", None, "tool_use"),
    ("content_filter", None, "refusal"), ("abort", None, "end_turn"), ("insufficient_system_resource", None,
                                                                         "end_turn"),
    ("stop", "###", "stop_sequence"), (None, None, "end_turn"),
])
def test_stop_reason_mapping(reason, seq, expected):
    assert A.stop_reason(reason, seq) == expected


def test_stop_sequence_reported_by_the_backend_is_rendered():
    """A Finish("stop") naming the matched stop string gets Anthropic's stop_reason "stop_sequence" and the
    string, streamed and not."""
    r = A.MessageRenderer("m", signature_key=SIGN_KEY)
    msg = A.render_message(r, _events(ContentDelta("1, 2"), Finish("stop", stop_sequence=", 3")))
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("stop_sequence", ", 3")
    assert r.finish()[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": ", 3"}


def _sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for chunk in text.strip().split("\n\n"):
        lines = chunk.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), chunk
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name  # every event names itself twice, as Anthropic's do
        out.append((name, data))
    return out


async def _collect(agen) -> str:
    return "".join([s async for s in agen])


def test_render_stream_pings_and_mid_stream_errors():
    """Keep-alive items become pings; a failure after the start ends the stream with `event: error`
    (a RequestError keeps its class, anything else is an api_error), and the source is closed."""
    closed = []

    async def items(fail: Exception):
        try:
            yield KEEPALIVE
            yield ChoiceEvent(0, ContentDelta("partial"))
            raise fail
        finally:
            closed.append(True)

    is_ka = lambda x: isinstance(x, KeepAlive)  # noqa: E731
    renderer = A.MessageRenderer("m", signature_key=SIGN_KEY)
    text = asyncio.run(_collect(A.render_stream(renderer, items(RequestError(529, "busy")), is_keepalive=is_ka)))
    names = [n for n, _ in _sse_events(text)]
    assert names == ["message_start", "ping", "ping", "content_block_start", "content_block_delta", "error"]
    assert _sse_events(text)[-1][1] == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    renderer = A.MessageRenderer("m", signature_key=SIGN_KEY)
    text = asyncio.run(_collect(A.render_stream(renderer, items(RuntimeError("boom")), is_keepalive=is_ka)))
    assert _sse_events(text)[-1][1]["error"]["type"] == "api_error"
    assert closed == [True, True]


# ------------------------------------------------------------------------------------------------
# conformance: the official SDK against a live server

MODEL = "deepseek-v4-flash"
KEY = "sk-test"
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                            "required": ["city"]}}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.bundled()


@pytest.fixture
def server(tokenizer):
    """A live server factory: `server(replies=..., **config)` -> (base URL, engine)."""
    stack = []

    def start(replies=smart_reply, delay=0.0, cache_hit=None, **config):
        engine = ScriptedEngine(tokenizer, replies=replies, delay=delay, cache_hit=cache_hit)
        cfg = ServeConfig(served_model_names=[MODEL, "deepseek-v4-pro"], api_keys=[KEY], max_context=8192,
                          max_output_tokens=2048, **{"signature_key": SIGN_KEY, **config})
        service = ChatService(engine, tokenizer, cfg.served_model_names, max_context=cfg.max_context,
                              max_output_tokens=cfg.max_output_tokens)
        cm = live_server(create_app(ServeContext(service, cfg)))
        url = cm.__enter__()
        stack.append(cm)
        return url, engine

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def _client(url: str, **kw) -> anthropic.Anthropic:
    kw.setdefault("api_key", KEY)
    return anthropic.Anthropic(base_url=url, max_retries=0, **kw)


def test_sdk_non_streaming_with_thinking_and_x_api_key(server, tokenizer, monkeypatch):
    """Thinking on by default; the key sent as `x-api-key` (what anthropic-python 0.x sends; 2.x sends Bearer
    even for `api_key=`); usage splits the prompt into uncached input and cache reads."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    url, engine = server(cache_hit=lambda prompt: 4)
    client = _client(url, api_key=None, default_headers={"x-api-key": KEY})
    msg = client.messages.create(model=MODEL, max_tokens=256, system="You are terse.",
                                       messages=[{"role": "user", "content": "Hello"}])
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "The user wants something. I will answer."
    assert msg.content[0].signature == _sign(msg.content[0].thinking)
    assert msg.content[1].text == "Hello! How can I help you today?"
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None and msg.model == MODEL
    prompt_len = len(engine.requests[0][0])
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == prompt_len
    assert (msg.usage.cache_read_input_tokens, msg.usage.cache_creation_input_tokens) == (4, 0)
    reply = smart_reply(tokenizer.decode(engine.requests[0][0]))
    assert msg.usage.output_tokens == len(tokenizer.encode(reply)) + 1  # + EOS


def test_sdk_streaming_thinking_off_and_bearer_auth(server):
    """`auth_token=` sends Authorization: Bearer; thinking disabled gives a text block only."""
    url, engine = server()
    client = _client(url, api_key=None, auth_token=KEY)
    with client.messages.stream(model=MODEL, max_tokens=256, thinking={"type": "disabled"},
                                messages=[{"role": "user", "content": "Hello"}]) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "Hello! How can I help you today?" and len(texts) > 1
    assert [b.type for b in final.content] == ["text"] and final.stop_reason == "end_turn"
    assert final.usage.input_tokens == len(engine.requests[0][0])


def test_sdk_tool_use_round_trip_streaming(server):
    """tool_use (streamed input_json_delta, reassembled by the SDK), then a tool_result turn with the thinking
    and tool_use blocks sent back as the SDK returned them, then the answer."""
    url, engine = server()
    client = _client(url)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with client.messages.stream(model=MODEL, max_tokens=512, tools=[WEATHER], messages=messages) as stream:
        events = [e.type for e in stream]
        first = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert [b.type for b in first.content] == ["thinking", "tool_use", "tool_use"]
    assert first.stop_reason == "tool_use"
    calls = first.content[1:]
    assert [(c.name, c.input) for c in calls] == [("get_weather", {"city": "Paris", "days": 2}),
                                                 ("get_weather", {"city": "Tokyo", "days": 1})]
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "18C"},
                                              {"type": "tool_result", "tool_use_id": calls[1].id,
                                               "content": [{"type": "text", "text": "25C"}]}]}]
    second = client.messages.create(model=MODEL, max_tokens=512, tools=[WEATHER], messages=messages)
    assert second.stop_reason == "end_turn"
    assert second.content[-1].text == "The tool said: 25C"
    prompt = engine.tokenizer.decode(engine.requests[1][0])
    assert "The user wants something. I will answer." in prompt  # the thinking went back into the prompt
    assert "<tool_result>18C</tool_result>" in prompt


def test_sdk_think_max_and_anthropic_prefix(server):
    """output_config.effort max renders the think-max prompt; the `/anthropic` base URL works too."""
    url, engine = server(replies=[think("deep", "42")])
    msg = _client(url + "/anthropic").messages.create(
        model=MODEL, max_tokens=64, thinking={"type": "enabled", "budget_tokens": 1024},
        output_config={"effort": "max"}, messages=[{"role": "user", "content": "6*7?"}])
    assert [b.type for b in msg.content] == ["thinking", "text"] and msg.content[1].text == "42"
    assert "Reasoning Effort: Absolute maximum" in engine.tokenizer.decode(engine.requests[0][0])


def test_sdk_count_tokens_matches_the_prompt(server):
    url, engine = server()
    client = _client(url)
    body = dict(model=MODEL, tools=[WEATHER], system="sys",
                messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    counted = client.messages.count_tokens(**body).input_tokens
    client.messages.create(max_tokens=128, **body)
    assert counted == len(engine.requests[0][0])
    assert httpx.post(url + "/anthropic/v1/messages/count_tokens", json=body,
                      headers={"x-api-key": KEY}).json() == {"input_tokens": counted}


def test_sdk_max_tokens_and_claude_model_names(server):
    url, engine = server(replies=[think("a long reasoning " * 20, "answer")])
    msg = _client(url).messages.create(model="claude-haiku-9-test", max_tokens=5,
                                       messages=[{"role": "user", "content": "hi"}])
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 5
    assert msg.model == "claude-haiku-9-test"  # echoed as asked; served by the flash name
    assert [b.type for b in msg.content] == ["thinking"]


def test_sdk_error_classes(server):
    url, _ = server(max_concurrent=1, max_queue=0)
    ok = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.AuthenticationError) as e:
        _client(url, api_key="wrong").messages.create(model=MODEL, max_tokens=8, messages=ok)
    assert e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        _client(url).messages.create(model="gpt-4o", max_tokens=8, messages=ok)
    assert e.value.body == {"type": "error", "error": {"type": "not_found_error", "message": e.value.body[
        "error"]["message"]}} and "deepseek-v4-flash" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        _client(url).messages.create(model=MODEL, max_tokens=5000, messages=ok)
    assert e.value.body["error"]["type"] == "invalid_request_error"


def test_sdk_rate_limit_while_another_request_streams(server):
    """With one slot and no queue, a second request while the first streams is a 429 rate_limit_error."""
    url, _ = server(max_concurrent=1, max_queue=0, delay=0.05)
    client = _client(url)
    with client.messages.stream(model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as s:
        next(iter(s))  # message_start: the first request holds the slot
        with pytest.raises(anthropic.RateLimitError) as e:
            client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["error"]["type"] == "rate_limit_error"
        assert e.value.response.headers["retry-after"] == "1"
        assert s.get_final_message().stop_reason == "end_turn"


def test_raw_stream_has_event_lines_and_ping(server):
    """On the wire: every event has its `event:` line, a ping follows message_start, no [DONE]."""
    url, _ = server(replies=[tool_calls([{"name": "get_weather", "arguments": {"city": "Oslo"}}], content="Ok.",
                                        reasoning="r")])
    with httpx.stream("POST", url + "/v1/messages", headers={"x-api-key": KEY, "anthropic-version": "2099-01-01",
                                                            "anthropic-beta": "whatever-2030"},
                      json={"model": MODEL, "max_tokens": 128, "stream": True, "tools": [WEATHER],
                            "messages": [{"role": "user", "content": "weather?"}]}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = _sse_events(text)
    assert "[DONE]" not in text
    assert [n for n, _ in events[:2]] == ["message_start", "ping"]
    blocks = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    assert blocks == ["thinking", "text", "tool_use"]
    partial = "".join(d["delta"]["partial_json"] for n, d in events
                      if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    assert json.loads(partial) == {"city": "Oslo"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use" and events[-1][0] == "message_stop"


def test_model_names(server):
    """Served names as they are (also with Claude Code's `[1m]` suffix), claude-opus -> the pro name,
    claude-sonnet/haiku -> the flash name, anything else 404 via the context."""
    ctx = ServeContext(backend=None, config=ServeConfig(served_model_names=[MODEL, "deepseek-v4-pro"]))
    assert A.resolve_model(ctx, MODEL) == MODEL
    assert A.resolve_model(ctx, "deepseek-v4-pro[1m]") == "deepseek-v4-pro"
    assert A.resolve_model(ctx, "claude-opus-4-1") == "deepseek-v4-pro"
    assert A.resolve_model(ctx, "claude-sonnet-4-5") == MODEL
    assert A.resolve_model(ctx, "claude-haiku-4-5") == MODEL
    with pytest.raises(RequestError) as e:
        A.resolve_model(ctx, "gpt-4o")
    assert e.value.status == 404


def test_sdk_stop_sequences(server):
    """The text before the earliest stop string is kept; stop_reason "stop_sequence" names that string."""
    url, _ = server(replies=["Count: 1, 2, 3, 4, 5."])
    msg = _client(url).messages.create(model=MODEL, max_tokens=64, thinking={"type": "disabled"},
                                       stop_sequences=["4", ", 3"],
                                       messages=[{"role": "user", "content": "count"}])
    assert msg.content[0].text == "Count: 1, 2"
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", ", 3")


def test_pings_while_queued_and_disconnect_aborts(server):
    """A streaming request waiting for the only slot gets `ping`s; dropping a stream mid-way aborts its
    engine request."""
    url, engine = server(max_concurrent=1, max_queue=1, keepalive_s=0.05, delay=0.05)
    body = {"model": MODEL, "max_tokens": 256, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-api-key": KEY}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/messages", json=body, headers=headers) as first:
            lines = first.iter_lines()
            assert next(lines) == "event: message_start"
            with http.stream("POST", url + "/v1/messages", json=body, headers=headers) as second:
                names, lines2 = [], second.iter_lines()
                for line in lines2:
                    if line.startswith("event: "):
                        names.append(line[7:])
                    if names.count("ping") >= 3:
                        break
                # the first request is dropped here (its stream closes after this block), freeing the slot
                assert names[0] == "message_start" and set(names) == {"message_start", "ping"}
                first.close()
                rest = [line[7:] for line in lines2 if line.startswith("event: ")]
        assert rest[-1] == "message_stop" and "content_block_delta" in rest
    assert engine.aborted == [0]


def test_context_management_is_reported_streaming_and_not(server, tokenizer):
    """A clear_thinking edit that cleared turns is reported as `context_management.applied_edits` on the message
    and in the final message_delta, with the prompt tokens it saved; the prompt holds only the kept thinking."""
    url, engine = server()
    msgs = _thinking_turns(2)
    cm = {"edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 1}}]}
    payload = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": msgs, "context_management": cm,
               "tools": [WEATHER]}  # with tools the encoder keeps earlier reasoning, so the edit is what drops it
    headers = {"x-api-key": KEY}
    r = httpx.post(url + "/v1/messages", json=payload, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    applied = r.json()["context_management"]["applied_edits"]
    assert len(applied) == 1 and applied[0]["type"] == "clear_thinking_20251015"
    assert applied[0]["cleared_thinking_turns"] == 1 and applied[0]["cleared_input_tokens"] > 0
    prompt = tokenizer.decode(engine.requests[-1][0])
    assert "thought 1" in prompt and "thought 0" not in prompt
    r = httpx.post(url + "/v1/messages", json={**payload, "stream": True}, headers=headers, timeout=30)
    events = _sse_events(r.text)
    delta = [d for name, d in events if name == "message_delta"]
    assert delta[-1]["context_management"] == {"applied_edits": applied}
    keep_all = {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}
    r = httpx.post(url + "/v1/messages", json={**payload, "context_management": keep_all}, headers=headers, timeout=30)
    assert r.json()["context_management"] == {"applied_edits": []}
    assert "thought 0" in tokenizer.decode(engine.requests[-1][0])
    r = httpx.post(url + "/v1/messages", json={**payload, "context_management": {"edits": [{"type": "bogus_1"}]}},
                   headers=headers, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "bogus_1" in r.json()["error"]["message"]
