"""Bad input to the Anthropic routes: every malformed or hostile request gets a 4xx (never a 5xx, also not in
/metrics) with Anthropic's error body `{"type": "error", "error": {"type", "message"}}` and the status that
names its class, on both base paths, streaming or not; unknown keys and headers are never an error; thinking
blocks come back only with the signature this server issued (the official SDK sees Anthropic's 400 otherwise); a
failure after a stream started is an `event: error` ending the stream.

One live server (the real app and `ChatService` over the scripted engine) serves the whole corpus; requests
are sent with httpx so the bodies can be anything, not just what an SDK would build.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from serve_stubs import ScriptedEngine, ScriptedStream, live_server

from dsv4.chat.tokenizer import Tokenizer
from dsv4.serve.app import create_app
from dsv4.serve.context import ServeConfig, ServeContext
from dsv4.serve.protocols.anthropic import sign_thinking
from dsv4.serve.service import ChatService

MODEL = "deepseek-v4-flash"
KEY = "sk-errors"
SIGN_KEY = b"errors signature key"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
USER = [{"role": "user", "content": "hi"}]
MAX_BODY = 2**20  # the corpus server's body limit
TOOL = {"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}


class FailingStream(ScriptedStream):
    """Raises after two tokens, as an engine fault mid-generation would."""

    async def __anext__(self):
        if self._i >= 2:
            self.close()
            raise RuntimeError("engine exploded")
        return await super().__anext__()


class FailingEngine(ScriptedEngine):
    def generate(self, prompt_ids, params=None):
        s = super().generate(prompt_ids, params)
        s.__class__ = FailingStream
        return s


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.bundled()


def _serve(tokenizer, engine_cls=ScriptedEngine):
    cfg = ServeConfig(served_model_names=[MODEL], api_keys=[KEY], max_context=2048, max_output_tokens=512,
                      signature_key=SIGN_KEY, max_body_bytes=MAX_BODY)
    service = ChatService(engine_cls(tokenizer), tokenizer, cfg.served_model_names, max_context=cfg.max_context,
                          max_output_tokens=cfg.max_output_tokens)
    return live_server(create_app(ServeContext(service, cfg)))


@pytest.fixture(scope="module")
def url(tokenizer):
    with _serve(tokenizer) as base:
        yield base


def body(**kw):
    out = {"model": MODEL, "max_tokens": 32, "messages": USER}
    out.update(kw)
    return {k: v for k, v in out.items() if v is not DROP}


DROP = object()


def replayed(*blocks) -> list[dict]:
    """A conversation whose assistant turn is `blocks` then a text block, and a user turn after it."""
    return [*USER, {"role": "assistant", "content": [*blocks, {"type": "text", "text": "a"}]},
            {"role": "user", "content": "q"}]


def raw(text: bytes, where: bytes = b'"messages": [{"role": "user", "content": "%s"}]') -> bytes:
    """A Messages body with raw JSON string bytes `text` at `where`."""
    return b'{"model": "deepseek-v4-flash", "max_tokens": 32, ' + where.replace(b"%s", text) + b"}"


ASSISTANT_CALL = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup",
                                                    "input": {"q": "x"}}]}

# (name, request body (dict) or raw bytes, status, error type, a word the message must contain)
CORPUS = [
    ("not json", b"{not json", 400, "invalid_request_error", "JSON"),
    ("empty body", b"", 400, "invalid_request_error", "JSON"),
    ("json array", b"[1, 2]", 400, "invalid_request_error", "object"),
    ("missing model", body(model=DROP), 400, "invalid_request_error", "model"),
    ("missing max_tokens", body(max_tokens=DROP), 400, "invalid_request_error", "max_tokens"),
    ("max_tokens as string", body(max_tokens="32"), 400, "invalid_request_error", "max_tokens"),
    ("max_tokens as bool", body(max_tokens=True), 400, "invalid_request_error", "max_tokens"),
    ("max_tokens zero", body(max_tokens=0), 400, "invalid_request_error", "max_tokens"),
    ("max_tokens past the cap", body(max_tokens=100000), 400, "invalid_request_error", "max_tokens"),
    ("messages not a list", body(messages={"role": "user"}), 400, "invalid_request_error", "messages"),
    ("messages empty", body(messages=[]), 400, "invalid_request_error", "messages"),
    ("only system messages", body(messages=[{"role": "system", "content": "x"}]), 400,
     "invalid_request_error", "user or assistant"),
    ("system message with an image", body(messages=[{"role": "user", "content": "x"}, {"role": "system", "content": [
        {"type": "image", "source": {}}]}]), 400, "invalid_request_error", "system"),
    ("unknown context management edit", body(context_management={"edits": [{"type": "compact_20260112"}]}), 400,
     "invalid_request_error", "compact_20260112"),
    ("tool role in messages", body(messages=[{"role": "tool", "content": "x"}]), 400, "invalid_request_error",
     "role"),
    ("message without role", body(messages=[{"content": "x"}]), 400, "invalid_request_error", "role"),
    ("content a number", body(messages=[{"role": "user", "content": 7}]), 400, "invalid_request_error",
     "content"),
    ("empty content list", body(messages=[{"role": "user", "content": []}]), 400, "invalid_request_error",
     "empty"),
    ("unknown block type", body(messages=[{"role": "user", "content": [{"type": "hologram"}]}]), 400,
     "invalid_request_error", "hologram"),
    ("text block without text", body(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400,
     "invalid_request_error", "text"),
    ("image block", body(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]), 400,
     "invalid_request_error", "not supported"),
    ("tool_result with no tool_use", body(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_9", "content": "r"}]}]), 400, "invalid_request_error",
     "tool_use_id"),
    ("tool_use never answered", body(messages=[*USER, ASSISTANT_CALL, {"role": "user", "content": "next"}]), 400,
     "invalid_request_error", "tool_result"),
    ("tool_use input not an object", body(messages=[*USER, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "lookup", "input": "q=x"}]}]), 400, "invalid_request_error",
     "input"),
    ("thinking block in a user message", body(messages=[{"role": "user", "content": [
        {"type": "thinking", "thinking": "t", "signature": ""}]}]), 400, "invalid_request_error", "assistant"),
    ("tampered thinking signature", body(messages=[*USER, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "changed", "signature": sign_thinking("original", SIGN_KEY)},
        {"type": "text", "text": "a"}]}, {"role": "user", "content": "q"}]), 400, "invalid_request_error",
     "signature"),
    ("system a number", body(system=5), 400, "invalid_request_error", "system"),
    ("tool name with spaces", body(tools=[{"name": "look up", "input_schema": {"type": "object"}}]), 400,
     "invalid_request_error", "name"),
    ("tool without input_schema", body(tools=[{"name": "lookup"}]), 400, "invalid_request_error",
     "input_schema"),
    ("tool schema not an object", body(tools=[{"name": "lookup", "input_schema": {"type": "array"}}]), 400,
     "invalid_request_error", "object"),
    ("duplicate tool names", body(tools=[TOOL, TOOL]), 400, "invalid_request_error", "duplicate"),
    ("server tool type", body(tools=[{"type": "web_search_20250305", "name": "web_search", "input_schema": {
        "type": "object"}}]), 400, "invalid_request_error", "not supported"),
    ("tool_choice names an absent tool", body(tools=[TOOL], tool_choice={"type": "tool", "name": "other"}), 400,
     "invalid_request_error", "other"),
    ("tool_choice any without tools", body(tool_choice={"type": "any"}), 400, "invalid_request_error",
     "tool_choice"),
    ("tool_choice unknown type", body(tool_choice={"type": "sometimes"}), 400, "invalid_request_error",
     "sometimes"),
    ("temperature out of range", body(temperature=5), 400, "invalid_request_error", "temperature"),
    ("top_p negative", body(top_p=-0.1), 400, "invalid_request_error", "top_p"),
    ("top_k negative", body(top_k=-1), 400, "invalid_request_error", "top_k"),
    ("stop_sequences a string", body(stop_sequences="END"), 400, "invalid_request_error", "stop_sequences"),
    ("stop_sequences with an empty one", body(stop_sequences=[""]), 400, "invalid_request_error",
     "stop_sequences"),
    ("thinking type unknown", body(thinking={"type": "on"}), 400, "invalid_request_error", "thinking"),
    ("budget_tokens not a number", body(thinking={"type": "enabled", "budget_tokens": "lots"}), 400,
     "invalid_request_error", "budget_tokens"),
    ("effort unknown", body(output_config={"effort": "extreme"}), 400, "invalid_request_error", "effort"),
    ("metadata.user_id a number", body(metadata={"user_id": 42}), 400, "invalid_request_error", "user_id"),
    ("stream not a bool", body(stream="yes"), 400, "invalid_request_error", "stream"),
    ("prompt too long", body(messages=[{"role": "user", "content": "word " * 4000}]), 400,
     "invalid_request_error", "context length"),
    ("unknown model", body(model="gpt-4o"), 404, "not_found_error", "gpt-4o"),
    # hostile input (issue 17)
    ("lone surrogate in text", raw(b"a\\ud800b"), 400, "invalid_request_error", "surrogate"),
    ("lone surrogate in system", raw(b"\\udc00", b'"system": "%s", "messages": [{"role": "user", "content": "x"}]'),
     400, "invalid_request_error", "surrogate"),
    ("lone surrogate in tool_use input", raw(b"\\ud800", b'"messages": [{"role": "user", "content": "q"}, '
                                             b'{"role": "assistant", "content": [{"type": "tool_use", "id": "t", '
                                             b'"name": "f", "input": {"q": "%s"}}]}]'),
     400, "invalid_request_error", "messages.1.content.0.input.q"),
    ("surrogate encoded as UTF-8 bytes", raw(b"\xed\xb0\x80"), 400, "invalid_request_error", "JSON"),
    ("nested 100,000 deep", raw(b"x", b'"metadata": ' + b"[" * 100_000 + b"]" * 100_000), 400,
     "invalid_request_error", "128 levels"),
    ("5,000 nested metadata objects", raw(b"x", b'"metadata": ' + b'{"metadata": ' * 5_000 + b"{}" + b"}" * 5_000),
     400, "invalid_request_error", "128 levels"),
    ("body over the size limit", raw(b"9 " * (MAX_BODY // 2)), 413, "request_too_large", "bytes"),
    ("1 MB prompt, refused untokenised", body(messages=[{"role": "user", "content": "9 " * 500_000}]), 400,
     "invalid_request_error", "at least"),
    ("forged thinking signature", body(messages=replayed({"type": "thinking", "thinking": "t",
                                                          "signature": "AAAAbogus"})), 400,
     "invalid_request_error", "Invalid `signature` in `thinking` block"),
    ("thinking without a signature", body(messages=replayed({"type": "thinking", "thinking": "t"})), 400,
     "invalid_request_error", "messages.1.content.0: Invalid `signature`"),
    ("omitted thinking with a forged signature", body(messages=replayed(
        {"type": "thinking", "thinking": "", "signature": "dsv4." + "A" * 43})), 400, "invalid_request_error",
     "Invalid `signature`"),
    ("another server's signature", body(messages=replayed(
        {"type": "thinking", "thinking": "t", "signature": sign_thinking("t", b"another key")})), 400,
     "invalid_request_error", "Invalid `signature`"),
    ("redacted_thinking sent back", body(messages=replayed({"type": "redacted_thinking", "data": "EmwKAhgBEgy3"})),
     400, "invalid_request_error", "Invalid `data` in `redacted_thinking` block"),
]


def _post(base: str, path: str, payload, headers=None) -> httpx.Response:
    headers = dict(HEADERS if headers is None else headers)
    if isinstance(payload, bytes):
        headers["content-type"] = "application/json"
        return httpx.post(base + path, content=payload, headers=headers, timeout=30)
    return httpx.post(base + path, json=payload, headers=headers, timeout=30)


def _check(r: httpx.Response, status: int, etype: str, word: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    data = r.json()
    assert set(data) == {"type", "error"} and data["type"] == "error"
    assert data["error"]["type"] == etype
    assert isinstance(data["error"]["message"], str) and word.lower() in data["error"]["message"].lower(), data


@pytest.mark.parametrize("name, payload, status, etype, word", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_request(url, name, payload, status, etype, word):
    _check(_post(url, "/v1/messages", payload), status, etype, word)


STREAMED = [c for c in CORPUS if isinstance(c[1], dict) and "stream" not in c[1]][::3]


@pytest.mark.parametrize("name, payload, status, etype, word", STREAMED, ids=[c[0] for c in STREAMED])
def test_bad_streaming_request_on_the_anthropic_base(url, name, payload, status, etype, word):
    """The same checks run before a stream's 200, so a streaming request gets the JSON error too."""
    _check(_post(url, "/anthropic/v1/messages", {**payload, "stream": True}), status, etype, word)


@pytest.mark.parametrize("payload, word", [
    (b"nope", "JSON"),
    ({"messages": USER}, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 1}]}, "content"),
    ({"model": "unknown-model", "messages": USER}, "unknown-model"),
    (b'{"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "9 " * 500_000}]}, "at least"),
    ({"model": MODEL, "messages": replayed({"type": "thinking", "thinking": "t", "signature": "AAAAbogus"})},
     "Invalid `signature`"),
])
def test_bad_count_tokens(url, payload, word):
    r = _post(url, "/v1/messages/count_tokens", payload)
    status = 404 if word == "unknown-model" else 400
    _check(r, status, "not_found_error" if status == 404 else "invalid_request_error", word)


def test_count_tokens_body_over_the_limit(url):
    _check(_post(url, "/v1/messages/count_tokens", raw(b"9 " * MAX_BODY)), 413, "request_too_large", "bytes")


def test_metrics_count_no_5xx_over_the_corpus(url):
    """The whole corpus once more, streaming or not: /metrics holds no 5xx (nor anything for this server's earlier
    tests)."""
    for _, payload, status, _, _ in CORPUS:
        assert _post(url, "/v1/messages", payload).status_code == status
        if isinstance(payload, dict) and "stream" not in payload:
            assert _post(url, "/anthropic/v1/messages", {**payload, "stream": True}).status_code == status
    lines = [line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith("dsv4_requests_total")]
    assert lines and not [line for line in lines if 'status="5' in line], lines


def test_sdk_thinking_signatures(url):
    """The official SDK: a thinking block this server signed goes back as it came, also shown with display
    "omitted" (empty text, the signature alone); a forged signature or a redacted_thinking block is the
    BadRequestError Anthropic raises, with its message."""
    client = anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0)
    question = {"role": "user", "content": "hi"}
    for thinking in ({"type": "enabled", "budget_tokens": 1024}, {"type": "adaptive", "display": "omitted"}):
        first = client.messages.create(model=MODEL, max_tokens=64, thinking=thinking, messages=[question])
        assert first.content[0].type == "thinking" and first.content[0].signature.startswith("dsv4.")
        assert bool(first.content[0].thinking) == ("display" not in thinking)
        history = [question, {"role": "assistant", "content": first.content}, {"role": "user", "content": "again"}]
        again = client.messages.create(model=MODEL, max_tokens=64, thinking=thinking, messages=history)
        assert again.stop_reason == "end_turn"
        block = first.content[0].model_dump()
        other = {**block, "signature": sign_thinking(block["thinking"], b"another key")}
        for forged in ({**block, "signature": "AAAAbogus"}, other, {**block, "thinking": block["thinking"] + "!"}):
            history[1] = {"role": "assistant", "content": [forged, *first.content[1:]]}
            with pytest.raises(anthropic.BadRequestError, match=r"messages\.1\.content\.0: Invalid `signature` in "
                                                                 r"`thinking` block"):
                client.messages.create(model=MODEL, max_tokens=64, thinking=thinking, messages=history)
    history[1] = {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "EmwKAhgBEgy3"},
                                                   *first.content[1:]]}
    with pytest.raises(anthropic.BadRequestError, match="Invalid `data` in `redacted_thinking` block"):
        client.messages.create(model=MODEL, max_tokens=64, messages=history)


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"},
                                     {"authorization": "Basic c2s6eA=="}])
def test_auth_errors(url, headers):
    for path in ("/v1/messages", "/anthropic/v1/messages/count_tokens"):
        _check(_post(url, path, body(), headers=headers), 401, "authentication_error", "API key")


def test_unknown_keys_and_headers_are_accepted(url):
    """New API fields and versions must not break the server: unknown top-level, message, block and tool keys,
    any anthropic-version / anthropic-beta, `Authorization: Bearer`."""
    payload = body(
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"},
                                                "citations": None}], "name": "x"}],
        tools=[{**TOOL, "cache_control": {"type": "ephemeral"}, "strict": True}], tool_choice={"type": "auto",
                                                                                              "future": 1},
        thinking={"type": "enabled", "budget_tokens": 1024, "display": "summarized"}, service_tier="auto",
        container=None, mcp_servers=[], context_management={"edits": []}, some_future_field={"a": [1]},
        top_k=3, metadata={"user_id": "u", "other": 1})
    headers = {"authorization": f"Bearer {KEY}", "anthropic-version": "2099-12-31",
               "anthropic-beta": "interleaved-thinking-2025-05-14,unknown-beta"}
    r = _post(url, "/v1/messages", payload, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "message"


def test_wrong_method_and_unknown_path_use_the_anthropic_shape(url):
    r = httpx.get(url + "/v1/messages", headers=HEADERS)
    assert r.status_code == 405 and r.json()["type"] == "error"
    r = httpx.post(url + "/anthropic/v1/nothing", headers=HEADERS, json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_failure_mid_stream_is_an_error_event(tokenizer):
    """An engine fault after the 200: the stream ends with `event: error` (api_error), no message_stop; the
    same fault without streaming is a 500 api_error (a real server fault)."""
    with _serve(tokenizer, FailingEngine) as base:
        with httpx.stream("POST", base + "/v1/messages", headers=HEADERS, json=body(stream=True), timeout=30) as r:
            assert r.status_code == 200
            text = r.read().decode()
        chunks = [c.split("\n") for c in text.strip().split("\n\n")]
        names = [c[0].removeprefix("event: ") for c in chunks]
        assert names[0] == "message_start" and names[-1] == "error" and "message_stop" not in names
        last = json.loads(chunks[-1][1].removeprefix("data: "))
        assert last == {"type": "error", "error": {"type": "api_error", "message": last["error"]["message"]}}
        r = _post(base, "/v1/messages", body())
        assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
