"""Bad input never becomes a 5xx: a corpus of malformed OpenAI-side requests sent with httpx, each answered with
the right 4xx and OpenAI's error body; and a client that disconnects mid-stream frees the real engine's
request (slot and KV pages)."""

from __future__ import annotations

import dataclasses
import time

import httpx
import pytest
from serve_stubs import ScriptedEngine, ScriptedStream, live_server

from dsv4.chat.tokenizer import Tokenizer
from dsv4.config import preset
from dsv4.engine import AsyncEngine, Engine
from dsv4.model import Transformer, init_weights
from dsv4.serve.app import create_app
from dsv4.serve.context import ServeConfig, ServeContext
from dsv4.serve.service import ChatService

KEY = "sk-err"
M = "dsv4-test"
U = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def chat(**kw):
    return {"model": M, "messages": U, **kw}


# (name, path, body (dict, or raw bytes), expected status)
CORPUS = [
    ("malformed json", "/v1/chat/completions", b'{"model": "dsv4-test", "messages": [', 400),
    ("empty body", "/v1/chat/completions", b"", 400),
    ("body is a list", "/v1/chat/completions", [1, 2], 400),
    ("body is a string", "/v1/chat/completions", "hello", 400),
    ("missing model", "/v1/chat/completions", {"messages": U}, 400),
    ("missing messages", "/v1/chat/completions", {"model": M}, 400),
    ("empty messages", "/v1/chat/completions", {"model": M, "messages": []}, 400),
    ("messages not a list", "/v1/chat/completions", {"model": M, "messages": "hi"}, 400),
    ("message not an object", "/v1/chat/completions", {"model": M, "messages": ["hi"]}, 400),
    ("unknown role", "/v1/chat/completions", {"model": M, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("content wrong type", "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": 5}]}, 400),
    ("image part", "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400),
    ("tool message first", "/v1/chat/completions", {"model": M, "messages": [
        {"role": "tool", "tool_call_id": "c", "content": "x"}]}, 400),
    ("ends with assistant", "/v1/chat/completions", {"model": M, "messages": U + [
        {"role": "assistant", "content": "done"}]}, 400),
    ("bad tool-call arguments", "/v1/chat/completions", {"model": M, "messages": U + [
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "1"}]}, 400),
    ("unknown model", "/v1/chat/completions", chat(model="gpt-5"), 404),
    ("model wrong type", "/v1/chat/completions", chat(model=12), 400),
    ("temperature too high", "/v1/chat/completions", chat(temperature=3), 400),
    ("temperature a string", "/v1/chat/completions", chat(temperature="hot"), 400),
    ("top_p zero", "/v1/chat/completions", chat(top_p=0), 400),
    ("max_tokens zero", "/v1/chat/completions", chat(max_tokens=0), 400),
    ("max_tokens over the cap", "/v1/chat/completions", chat(max_tokens=100000), 400),
    ("max_tokens past the context", "/v1/chat/completions", chat(max_tokens=512, messages=[
        {"role": "user", "content": "word " * 700}]), 400),
    ("prompt past the context", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "word " * 3000}]),
     400),
    ("n zero", "/v1/chat/completions", chat(n=0), 400),
    ("n too large", "/v1/chat/completions", chat(n=1000), 400),
    ("top_logprobs without logprobs", "/v1/chat/completions", chat(top_logprobs=3), 400),
    ("top_logprobs too large", "/v1/chat/completions", chat(logprobs=True, top_logprobs=50), 400),
    ("too many stops", "/v1/chat/completions", chat(stop=[str(i) for i in range(17)]), 400),
    ("stop wrong type", "/v1/chat/completions", chat(stop=5), 400),
    ("stream_options without stream", "/v1/chat/completions", chat(stream_options={"include_usage": True}), 400),
    ("bad reasoning_effort", "/v1/chat/completions", chat(reasoning_effort="extreme"), 400),
    ("bad thinking type", "/v1/chat/completions", chat(thinking={"type": "sometimes"}), 400),
    ("thinking kwarg not bool", "/v1/chat/completions", chat(chat_template_kwargs={"thinking": "yes"}), 400),
    ("tools not a list", "/v1/chat/completions", chat(tools={"type": "function"}), 400),
    ("tool without function", "/v1/chat/completions", chat(tools=[{"type": "function"}]), 400),
    ("tool bad name", "/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]),
     400),
    ("tool parameters not an object", "/v1/chat/completions", chat(tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]), 400),
    ("too many tools", "/v1/chat/completions", chat(tools=[
        {"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]), 400),
    ("tool_choice unknown string", "/v1/chat/completions", chat(tools=[TOOL], tool_choice="sometimes"), 400),
    ("tool_choice names a missing tool", "/v1/chat/completions", chat(
        tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}},
        thinking={"type": "disabled"}), 400),
    ("tool_choice required without tools", "/v1/chat/completions", chat(tool_choice="required",
                                                                        thinking={"type": "disabled"}), 400),
    ("response_format schema that cannot be enforced", "/v1/chat/completions",
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}), 400),
    ("response_format unknown type", "/v1/chat/completions", chat(response_format={"type": "yaml"}), 400),
    ("json_schema without schema", "/v1/chat/completions", chat(response_format={"type": "json_schema"}), 400),
    ("completions missing prompt", "/v1/completions", {"model": M}, 400),
    ("completions bad token ids", "/v1/completions", {"model": M, "prompt": [10**9]}, 400),
    ("completions too many prompts", "/v1/completions", {"model": M, "prompt": ["a"] * 129}, 400),
    ("completions too many choices", "/v1/completions", {"model": M, "prompt": ["a"] * 9, "n": 16}, 400),
    ("completions empty prompt list", "/v1/completions", {"model": M, "prompt": []}, 400),
    ("completions empty prompt", "/v1/completions", {"model": M, "prompt": ""}, 400),
    ("completions an empty prompt among several", "/v1/completions", {"model": M, "prompt": [[1, 2], []]}, 400),
    ("completions bad token ids among several", "/v1/completions", {"model": M, "prompt": [[1], [10**9]]}, 400),
    ("completions negative token id", "/v1/completions", {"model": M, "prompt": [-1]}, 400),
    ("completions mixed prompt list", "/v1/completions", {"model": M, "prompt": ["a", 1]}, 400),
    ("completions max_tokens 0 without echo", "/v1/completions", {"model": M, "prompt": "a", "max_tokens": 0}, 400),
    ("completions max_tokens negative", "/v1/completions", {"model": M, "prompt": "a", "max_tokens": -1,
                                                            "echo": True}, 400),
    ("completions suffix", "/v1/completions", {"model": M, "prompt": "a", "suffix": "b"}, 400),
    ("completions unknown model", "/v1/completions", {"model": "x", "prompt": "a"}, 404),
    ("completions logprobs too large", "/v1/completions", {"model": M, "prompt": "a", "logprobs": 99}, 400),
    ("unknown route", "/v1/nothing", {}, 404),
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.bundled()


@pytest.fixture(scope="module")
def url(tokenizer):
    service = ChatService(ScriptedEngine(tokenizer), tokenizer, [M], max_context=1024, max_output_tokens=512)
    config = ServeConfig(served_model_names=[M], api_keys=[KEY], max_context=1024, max_output_tokens=512)
    with live_server(create_app(ServeContext(service, config))) as base:
        yield base


def send(url: str, path: str, body, headers=None) -> httpx.Response:
    headers = {"authorization": f"Bearer {KEY}", **(headers or {})}
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers={**headers, "content-type": "application/json"})
    return httpx.post(url + path, json=body, headers=headers)


def assert_openai_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("name,path,body,status", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_is_a_4xx_with_openai_body(url, name, path, body, status):
    assert_openai_error(send(url, path, body), status)
    assert_openai_error(send(url, path, body, {"accept": "text/event-stream"}), status)  # same for streams
    if isinstance(body, dict) and "model" in body and "stream_options" not in body:  # and with stream: true
        assert_openai_error(send(url, path, {**body, "stream": True}), status)


def test_corpus_is_large():
    assert len(CORPUS) >= 25


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer nope"}, {"x-api-key": "nope"},
                                     {"authorization": "Basic abc"}])
@pytest.mark.parametrize("method,path", [("POST", "/v1/chat/completions"), ("POST", "/chat/completions"),
                                         ("POST", "/v1/completions"), ("GET", "/v1/models")])
def test_auth_required_on_every_route(url, headers, method, path):
    r = httpx.request(method, url + path, headers=headers, json=chat())
    assert_openai_error(r, 401)
    assert r.json()["error"]["type"] == "authentication_error"


def test_both_key_headers_accepted(url):
    assert httpx.get(url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # probes need no key


def test_unknown_keys_are_ignored(url):
    r = send(url, "/v1/chat/completions", chat(store=True, metadata={"a": "b"}, service_tier="auto",
                                               parallel_tool_calls=False, logit_bias={}, whatever={"x": [1]},
                                               messages=[{"role": "user", "content": "hi", "name": "bob",
                                                          "extra": 1}]))
    assert r.status_code == 200, r.text


def test_developer_role_accepted(url):
    r = send(url, "/v1/chat/completions", chat(messages=[{"role": "developer", "content": "Be brief."}] + U))
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------------ disconnect
@pytest.fixture(scope="module")
def real(tokenizer):
    """A real Engine over the tiny preset with random weights and the official vocabulary."""
    args = dataclasses.replace(preset("tiny"), vocab_size=tokenizer.vocab_size)
    model = init_weights(Transformer(args), seed=0)
    engine = Engine(model, max_batch=2, max_seq_len=256, prefill_chunk=64, eos_id=None)
    service = ChatService(AsyncEngine(engine), tokenizer, [M], max_output_tokens=200)
    with live_server(create_app(ServeContext(service, ServeConfig(served_model_names=[M])))) as base:
        yield base, engine


def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0 and s.pages_used == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {engine.stats()}")


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees_kv(real, stream):
    base, engine = real
    body = chat(max_tokens=200, stream=stream, thinking={"type": "disabled"})
    if stream:
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]  # a few chunks: the request is decoding
            assert all(line.startswith("data: ") or not line for line in got)
            assert engine.stats().running == 1 and engine.stats().pages_used > 0
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/chat/completions", json=body, timeout=0.5)
    wait_idle(engine)  # the client left: the request was aborted, its slot and pages are free
    s = engine.stats()
    assert (s.running, s.waiting, s.pages_used) == (0, 0, 0)


def test_real_engine_completes_a_request(real):
    base, engine = real
    r = httpx.post(base + "/v1/chat/completions", json=chat(max_tokens=5, thinking={"type": "disabled"}), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 5
    wait_idle(engine)


@pytest.mark.parametrize("stream", [True, False])
def test_engine_limits_are_a_400_before_the_stream_starts(tokenizer, stream):
    """A request the engine's KV pool could never hold is refused with a 400 (not a 200 and an error event)."""
    args = dataclasses.replace(preset("tiny"), vocab_size=tokenizer.vocab_size)
    engine = Engine(init_weights(Transformer(args), seed=0), max_batch=1, max_seq_len=256, num_pages=2,
                    page_tokens=8)
    service = ChatService(AsyncEngine(engine), tokenizer, [M], max_output_tokens=200)
    with live_server(create_app(ServeContext(service, ServeConfig(served_model_names=[M])))) as base:
        body = chat(max_tokens=150, stream=stream, thinking={"type": "disabled"})
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert "KV pages" in r.json()["error"]["message"]
        r = httpx.post(base + "/v1/chat/completions", json=chat(max_tokens=2, thinking={"type": "disabled"}),
                       timeout=60)
        assert r.status_code == 200, r.text


def test_failure_mid_stream_ends_with_error_event(tokenizer):
    import openai

    class FailingStream(ScriptedStream):
        async def __anext__(self):
            if self._i >= 3:
                raise RuntimeError("device lost")
            return await super().__anext__()

    class Broken(ScriptedEngine):
        stream_class = FailingStream

    engine = Broken(tokenizer)
    service = ChatService(engine, tokenizer, [M], max_context=1024)
    with live_server(create_app(ServeContext(service, ServeConfig(served_model_names=[M])))) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="device lost"):
            for _ in client.chat.completions.create(model=M, messages=U, stream=True):
                pass
        assert httpx.get(base + "/health").status_code == 200
        r = httpx.post(base + "/v1/chat/completions", json=chat())  # non-streaming: a 500 in OpenAI's shape
        assert r.status_code == 500 and "error" in r.json()
        assert engine.active == set()
