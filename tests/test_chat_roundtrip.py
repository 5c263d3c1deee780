"""Encoding then parsing gives back every assistant message of random conversations.

The encoder (`dsv4.chat.encoding`) and the parsers (`dsv4.chat.parser`, `dsv4.chat.streaming`) are
written independently from the format's specification; rendering a conversation and parsing each
assistant turn back out of the prompt must recover reasoning, content and tool calls (names and
arguments, string and non-string, unicode), for the whole text and for streamed chunks.
"""

from __future__ import annotations

import json
import random

import pytest

from dsv4.chat.encoding import encode_messages
from dsv4.chat.events import aggregate_events
from dsv4.chat.format import ASSISTANT, EOS, THINK_END, THINK_START, USER
from dsv4.chat.parser import parse_completion
from dsv4.chat.streaming import StreamParser

# characters that stress the format: quotes, backslashes, newlines, markup look-alikes, CJK, emoji
ALPHABET = list("abcxyz ABC 0123 .,;:!?-_/\\\"'{}[]<>=|&\n\t") + list("你好世界推理答案｜▁") + ["é", "ß", "😀", "👍🏽"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                      "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "search", "description": "Search the web",
                                      "parameters": {"type": "object", "properties": {}}}},
]


def _text(rng: random.Random, lo: int = 0, hi: int = 40) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi)))


def _value(rng: random.Random, depth: int = 0):
    kind = rng.choice(["str", "str", "int", "float", "bool", "null", "list", "dict"] if depth < 2 else ["str", "int"])
    if kind == "str":
        return _text(rng, 0, 20)
    if kind == "int":
        return rng.randint(-10**6, 10**6)
    if kind == "float":
        return rng.choice([0.1, -2.5, 1e-7, 3.14159, 1e20])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}": _value(rng, depth + 1) for i in range(rng.randint(0, 3))}


def _assistant(rng: random.Random, call_ids: list[str]) -> dict:
    calls = []
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        args = {f"arg_{j}": _value(rng) for j in range(rng.randint(0, 4))}
        call_id = f"call_{len(call_ids)}"
        call_ids.append(call_id)
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": rng.choice(["get_weather", "search"]), "arguments": json.dumps(args)}})
    message = {"role": "assistant", "reasoning_content": _text(rng, 0, 60),
               "content": _text(rng, 0 if calls else 1, 60)}
    if calls:
        message["tool_calls"] = calls
    return message


def _conversation(rng: random.Random) -> list[dict]:
    messages: list[dict] = [{"role": "system", "content": _text(rng, 1, 30), "tools": TOOLS}]
    call_ids: list[str] = []
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": _text(rng, 1, 40)})
        assistant = _assistant(rng, call_ids)
        messages.append(assistant)
        for call in assistant.get("tool_calls", []):
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": _text(rng, 0, 30)})
    return messages


def _completions(prompt: str, thinking: bool) -> list[str]:
    """The text the model wrote in each assistant turn: after `<｜Assistant｜><think>` (or `</think>`)
    up to and including its EOS."""
    opener = THINK_START if thinking else THINK_END
    out = []
    segments = prompt.split(ASSISTANT)[1:]
    if segments and segments[-1] == opener:  # the generation prompt after trailing tool results
        segments.pop()
    for segment in segments:
        turn = segment.split(USER)[0]
        assert turn.startswith(opener) and turn.endswith(EOS)
        out.append(turn[len(opener):])
    return out


def _assert_same(parsed, message: dict, thinking: bool) -> None:
    assert parsed.content == message["content"]
    assert parsed.reasoning_content == (message["reasoning_content"] if thinking else "")
    want = message.get("tool_calls", [])
    assert [c.name for c in parsed.tool_calls] == [c["function"]["name"] for c in want]
    for got, call in zip(parsed.tool_calls, want, strict=True):
        assert json.loads(got.arguments) == json.loads(call["function"]["arguments"])
    assert parsed.finish_reason == ("tool_calls" if want else "stop")


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "chat"])
def test_encode_then_parse_recovers_every_assistant_message(thinking):
    rng = random.Random(1234 + thinking)
    checked = 0
    for _ in range(150):
        messages = _conversation(rng)
        prompt = encode_messages(messages, thinking_mode="thinking" if thinking else "chat", drop_thinking=False)
        assistants = [m for m in messages if m["role"] == "assistant"]
        completions = _completions(prompt, thinking)
        assert len(completions) == len(assistants)
        for text, message in zip(completions, assistants, strict=True):
            _assert_same(parse_completion(text, thinking=thinking), message, thinking)
            checked += 1
    assert checked > 250


def test_streamed_chunks_recover_the_same_messages():
    rng = random.Random(99)
    for _ in range(40):
        messages = _conversation(rng)
        prompt = encode_messages(messages, drop_thinking=False)
        assistants = [m for m in messages if m["role"] == "assistant"]
        for text, message in zip(_completions(prompt, True), assistants, strict=True):
            parser = StreamParser(thinking=True)
            events, i = [], 0
            while i < len(text):
                step = rng.randint(1, 7)
                events += parser.feed(text[i:i + step])
                i += step
            events += parser.finish(None)
            _assert_same(aggregate_events(events), message, True)


def test_token_by_token_stream_through_the_detokenizer():
    """What the server does: generated ids -> incremental detokenizer -> stream parser, one token at a time."""
    from dsv4.chat.tokenizer import Tokenizer

    tokenizer = Tokenizer.bundled()
    rng = random.Random(7)
    for _ in range(15):
        messages = _conversation(rng)
        prompt = encode_messages(messages, drop_thinking=False)
        assistants = [m for m in messages if m["role"] == "assistant"]
        for text, message in zip(_completions(prompt, True), assistants, strict=True):
            detok, parser, events = tokenizer.detokenizer(), StreamParser(thinking=True), []
            for token in tokenizer.encode(text):
                events += parser.feed(detok.add([token]))
            events += parser.feed(detok.flush())
            events += parser.finish(None)
            _assert_same(aggregate_events(events), message, True)
