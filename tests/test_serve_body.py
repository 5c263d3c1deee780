"""`dsv4.serve.body`: what the checks on the raw bytes must not get wrong (brackets and escapes inside strings,
valid surrogate pairs, an escaped backslash before `u`), the limits at their edges, and that every refusal is a
RequestError(400) found without recursion and in bounded time."""

from __future__ import annotations

import json
import time

import pytest

from dsv4.serve.body import MAX_CONTAINERS, MAX_DEPTH, MAX_ITEMS, MAX_STRINGS, decode, lone_surrogate_path
from dsv4.serve.request import RequestError


def refusal(raw: bytes) -> str:
    with pytest.raises(RequestError) as info:
        decode(raw)
    assert info.value.status == 400
    return info.value.message


@pytest.mark.parametrize("value", [
    {"text": "[[[{{{" * 1000},  # brackets inside a string are text
    {"text": '\\"[[[' * 1000 + "\\"},  # escaped quotes and backslashes do not end the string
    {"emoji": "\U0001f600", "pair": "\ud83d\ude00".encode("utf-16", "surrogatepass").decode("utf-16")},
    {"literal": "\\ud800"},  # a backslash, then the text "ud800": no surrogate
    {"ids": list(range(100_000)), "nested": json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))},
])
def test_valid_bodies_decode_as_json_does(value):
    for raw in (json.dumps(value).encode(), json.dumps(value, ensure_ascii=False).encode()):
        assert decode(raw) == json.loads(raw)
    assert decode(b"\xef\xbb\xbf" + json.dumps(value).encode()) == value  # a UTF-8 byte-order mark is skipped


@pytest.mark.parametrize("raw, words", [
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "128 levels"),
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "128 levels"),
    (b"[" + b"[]," * MAX_CONTAINERS + b"[]]", "arrays and objects"),
    (b"[" + b'"",' * MAX_STRINGS + b'""]', "strings"),
    (b"[" + b"0," * (MAX_ITEMS + 1) + b"0]", "array items"),
    (b'{"a": "x\\ud800y"}', "a: invalid Unicode"),
    (b'{"a": [{"b": ["ok", "\\udc00"]}]}', "a.0.b.1: invalid Unicode"),
    (b'{"\\ud800": 1}', "invalid Unicode"),
    (b'"\\ud800"', "the request body: invalid Unicode"),
    (b'{"a": "\xed\xa0\x80"}', "not valid JSON"),  # a surrogate encoded as UTF-8 bytes
    (b"\xff\xfe[\x00]\x00", "not valid JSON"),  # UTF-16
    (b"", "not valid JSON"),
])
def test_hostile_bodies_are_400s(raw, words):
    assert words in refusal(raw)


def test_limits_are_checked_in_bounded_time():
    """The structure is judged on the raw bytes with C-speed operations: a 28 MB body of 10M empty lists (6 s of
    json.loads) or of 10M strings, or 20 MB of brackets inside a string before a real nest too deep, is refused in
    a fraction of a second (under 2 s on a busy machine)."""
    for raw in (b"[" + b"[]," * 10_000_000 + b"[]]", b"[" + b'"",' * 10_000_000 + b'""]',
                b'{"x": "' + b"[" * 20_000_000 + b'", "y": ' + b"[" * 200 + b"]" * 200 + b"}"):
        start = time.monotonic()
        refusal(raw)
        assert time.monotonic() - start < 2.0


def test_surrogate_walk_needs_no_recursion():
    deep: list = ["\ud800"]
    for _ in range(100_000):
        deep = [deep]
    assert lone_surrogate_path(deep) == ".".join(["0"] * 100_001)
