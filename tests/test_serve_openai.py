"""OpenAI-protocol conformance with the official `openai` SDK against a live loopback server.

The engine is `ScriptedEngine` (tests/serve_stubs.py): it writes scripted completion text token by token, so
everything above the engine - ChatService, the parser, the renderers, SSE, uvicorn - runs for real."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from serve_stubs import ScriptedEngine, grammar_accepts, live_server, smart_reply, think, tool_calls

from dsv4.chat.tokenizer import Tokenizer
from dsv4.serve.app import create_app
from dsv4.serve.context import ServeConfig, ServeContext
from dsv4.serve.service import ChatService

KEY = "sk-test"
MODEL = "dsv4-test"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.bundled()


@pytest.fixture(scope="module")
def server(tokenizer):
    engine = ScriptedEngine(tokenizer)
    service = ChatService(engine, tokenizer, [MODEL, "alias"], max_context=2048, max_output_tokens=512)
    config = ServeConfig(served_model_names=[MODEL, "alias"], api_keys=[KEY], max_context=2048,
                         max_output_tokens=512)
    ctx = ServeContext(service, config)
    with live_server(create_app(ctx)) as url:
        yield url, engine, ctx


@pytest.fixture
def engine(server):
    engine = server[1]
    engine.replies, engine.delay = smart_reply, 0.0
    yield engine
    engine.replies, engine.delay = smart_reply, 0.0


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


USER = [{"role": "user", "content": "Hello there"}]


def test_chat_thinking_default(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=USER)
    choice = r.choices[0]
    assert choice.message.reasoning_content == "The user wants something. I will answer."
    assert choice.message.content == "Hello! How can I help you today?"
    assert choice.finish_reason == "stop"
    assert r.object == "chat.completion" and r.model == MODEL
    u = r.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > u.completion_tokens_details.reasoning_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == u.prompt_cache_hit_tokens == 0
    expected = (u.prompt_tokens * 0.14 + u.completion_tokens * 0.28) / 1e6  # the default (Flash) price
    assert u.cost == pytest.approx(expected)


def test_chat_thinking_off_and_max(client, engine, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=USER, extra_body={"thinking": {"type": "disabled"}})
    assert r.choices[0].message.content == "Hello! How can I help you today?"
    assert r.choices[0].message.reasoning_content is None
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    prompt = tokenizer.decode(engine.requests[-1][0])
    assert prompt.endswith("<｜Assistant｜></think>")
    for extra in ({"reasoning_effort": "max"}, {"reasoning_effort": "xhigh"},
                  {"chat_template_kwargs": {"thinking": True, "reasoning_effort": "max"}}):
        client.chat.completions.create(model=MODEL, messages=USER, extra_body=extra)
        prompt = tokenizer.decode(engine.requests[-1][0])
        assert "Reasoning Effort: Absolute maximum" in prompt and prompt.endswith("<think>"), extra
    client.chat.completions.create(model=MODEL, messages=USER, extra_body={"reasoning_effort": "none"})
    assert tokenizer.decode(engine.requests[-1][0]).endswith("</think>")
    client.chat.completions.create(model=MODEL, messages=USER,
                                   extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert tokenizer.decode(engine.requests[-1][0]).endswith("</think>")


def test_chat_stream_deltas_and_usage(client, engine):
    stream = client.chat.completions.create(model=MODEL, messages=USER, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    first = chunks[0].choices[0].delta
    assert first.role == "assistant"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == "The user wants something. I will answer."
    assert content == "Hello! How can I help you today?"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_raw_sse_ends_with_done(server, engine):
    url = server[0]
    with httpx.stream("POST", url + "/chat/completions", headers={"x-api-key": KEY},  # no /v1, x-api-key
                      json={"model": MODEL, "messages": USER, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert "usage" not in json.loads(lines[1][6:])  # only with include_usage


def test_tool_calls_round_trip(client, engine):
    messages = [{"role": "user", "content": "What is the weather in Paris and Tokyo?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert [json.loads(c.function.arguments) for c in msg.tool_calls] == [{"city": "Paris", "days": 2},
                                                                          {"city": "Tokyo", "days": 1}]
    assert all(c.id.startswith("call_") and c.type == "function" for c in msg.tool_calls)
    assert msg.reasoning_content and not msg.content
    # send the assistant message back as-is (reasoning included) plus the tool results
    messages.append(msg.model_dump(exclude_none=True))
    for call, result in zip(msg.tool_calls, ("sunny", "rainy"), strict=True):
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].message.content == "The tool said: rainy"


def test_tool_calls_streamed(client, engine):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather?"}],
                                            tools=TOOLS, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                entry["id"], entry["name"] = tc.id, tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [json.loads(c["arguments"])["city"] for c in calls.values()] == ["Paris", "Tokyo"]
    assert all("DSML" not in c["arguments"] for c in calls.values())


def test_stream_helper_reassembles_tool_calls(client, engine):
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "weather?"}],
                                        tools=TOOLS) as stream:
        final = stream.get_final_completion()
    args = [json.loads(c.function.arguments) for c in final.choices[0].message.tool_calls]
    assert args == [{"city": "Paris", "days": 2}, {"city": "Tokyo", "days": 1}]


def test_tool_choice(client, engine, tokenizer):
    """none: tools are not rendered and no call can be written; named and required, in either mode: the
    service's grammar makes a call (of that tool) with schema-valid arguments the only completion. The scripted
    engine writes its script whatever the grammar says, so the test checks the grammar it was given."""
    call = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" '
            'string="true">Oslo</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none")
    prompt, params = engine.requests[-1]
    assert "get_weather" not in tokenizer.decode(prompt)
    assert not grammar_accepts(params, tokenizer, "Let me check.</think>" + call)
    assert grammar_accepts(params, tokenizer, "Let me check.</think>It is sunny.")
    # named, non-think
    engine.replies = [call]
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       extra_body={"thinking": {"type": "disabled"}})
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    params = engine.requests[-1][1]
    assert grammar_accepts(params, tokenizer, call) and not grammar_accepts(params, tokenizer, "It is sunny.")
    assert not grammar_accepts(params, tokenizer, call.replace('"city" string="true">Oslo', '"town" string="true">O'))
    # required in thinking mode (the default): the model reasons, then must call
    engine.replies = ["I need the weather.</think>" + call]
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required")
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.reasoning_content
    params = engine.requests[-1][1]
    assert grammar_accepts(params, tokenizer, "I need the weather.</think>" + call)
    assert not grammar_accepts(params, tokenizer, "I need the weather.</think>It is sunny.")


def test_logprobs(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, top_logprobs=3,
                                       extra_body={"thinking": {"type": "disabled"}})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob == -0.25 for e in content)
    assert "".join(e.token for e in content).startswith("Hello! How can I help you today?")
    stream = client.chat.completions.create(model=MODEL, messages=USER, logprobs=True, stream=True,
                                            extra_body={"thinking": {"type": "disabled"}})
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(streamed) == len(content)


def test_n_choices(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=USER, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == "Hello! How can I help you today?" for c in r.choices)
    assert [p.seed for _, p in engine.requests[-3:]] == [7, 8, 9]
    one = client.chat.completions.create(model=MODEL, messages=USER)
    assert r.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    stream = client.chat.completions.create(model=MODEL, messages=USER, n=2, stream=True)
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason}
    assert finishes == {0: "stop", 1: "stop"}


def test_stop_strings_abort_the_engine_request(client, engine):
    aborted = len(engine.aborted)
    r = client.chat.completions.create(model=MODEL, messages=USER, stop=["help", "zzz"],
                                       extra_body={"thinking": {"type": "disabled"}})
    assert r.choices[0].message.content == "Hello! How can I "
    assert r.choices[0].finish_reason == "stop"
    assert len(engine.aborted) == aborted + 1
    stream = client.chat.completions.create(model=MODEL, messages=USER, stop="How", stream=True,
                                            extra_body={"thinking": {"type": "disabled"}})
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hello! "


def test_max_tokens_and_length(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3,
                                       extra_body={"thinking": {"type": "disabled"}})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    assert engine.requests[-1][1].max_tokens == 2


def test_thinking_ignores_temperature_non_think_uses_it(client, engine):
    client.chat.completions.create(model=MODEL, messages=USER, temperature=0.2, top_p=0.5)
    assert (engine.requests[-1][1].temperature, engine.requests[-1][1].top_p) == (1.0, 1.0)
    client.chat.completions.create(model=MODEL, messages=USER, temperature=0.2, top_p=0.5,
                                   extra_body={"thinking": {"type": "disabled"}})
    assert (engine.requests[-1][1].temperature, engine.requests[-1][1].top_p) == (0.2, 0.5)


def test_thinking_samples_with_the_models_recommended_setting(tokenizer, tmp_path):
    """A model directory's generation_config.json decides what thinking modes sample with (greedy for the demo
    model); the request's own temperature still counts only in non-think mode."""
    from dsv4.runtime import recommended_sampling
    from dsv4.serve.request import ChatRequest

    assert recommended_sampling(tmp_path) is None  # no file: V4's T = 1, top_p = 1
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6,
                                                                 "top_p": 0.95}))
    assert recommended_sampling(tmp_path) == {"temperature": 0.6, "top_p": 0.95}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    greedy = recommended_sampling(tmp_path)
    service = ChatService(ScriptedEngine(tokenizer), tokenizer, [MODEL], thinking_sampling=greedy)
    think = service.plan(ChatRequest(model=MODEL, messages=USER, temperature=0.7))
    chat = service.plan(ChatRequest(model=MODEL, messages=USER, mode="non-think", temperature=0.7))
    assert (think.params[0].temperature, chat.params[0].temperature) == (0.0, 0.7)


def test_response_format_rendered(client, engine, tokenizer):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    client.chat.completions.create(model=MODEL, messages=USER, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    prompt = tokenizer.decode(engine.requests[-1][0])
    assert "## Response Format" in prompt and json.dumps(schema) in prompt
    client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_object"})
    assert "json_object" in tokenizer.decode(engine.requests[-1][0])


def test_models(client, server):
    assert [m.id for m in client.models.list()] == [MODEL, "alias"]
    assert client.models.retrieve("alias").id == "alias"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_alias_is_echoed(client, engine):
    assert client.chat.completions.create(model="alias", messages=USER).model == "alias"


def test_legacy_completions(client, engine, tokenizer):
    engine.replies = [" world, again."]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=50, logprobs=2, echo=True)
    c = r.choices[0]
    assert c.text == "Hello world, again." and c.finish_reason == "stop"
    assert len(c.logprobs.tokens) == r.usage.completion_tokens
    assert r.object == "text_completion"
    stream = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, stream=True)
    parts = list(stream)
    assert "".join(p.choices[0].text for p in parts) == tokenizer.decode(tokenizer.encode(" world, again.")[:3])
    assert parts[-1].choices[0].finish_reason == "length"


def test_errors_raise_sdk_exceptions(client, server, engine):
    url = server[0]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model=MODEL, messages=USER)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    assert err.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}])


def test_queue_full_is_429_with_retry_after(server, engine, tokenizer):
    ctx = server[2]
    lim = ctx.limiter
    saved = lim.max_running, lim.max_queue
    lim.max_running, lim.max_queue = 1, 0
    engine.delay = 0.05
    try:
        with httpx.Client(base_url=server[0], headers={"authorization": f"Bearer {KEY}"}) as http:
            with http.stream("POST", "/v1/chat/completions",
                             json={"model": MODEL, "messages": USER, "stream": True}) as busy:
                assert busy.status_code == 200
                lines = busy.iter_lines()  # keep the iterator: dropping it closes the connection
                next(lines)  # the first request holds the only slot
                client = openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)
                with pytest.raises(openai.RateLimitError) as err:
                    client.chat.completions.create(model=MODEL, messages=USER)
                assert int(err.value.response.headers["retry-after"]) >= 1
    finally:
        lim.max_running, lim.max_queue = saved


def test_keepalive_while_queued(server, engine):
    ctx = server[2]
    lim = ctx.limiter
    saved = lim.max_running, ctx.config.keepalive_s
    lim.max_running, ctx.config.keepalive_s = 1, 0.05
    engine.delay = 0.02
    try:
        with httpx.Client(base_url=server[0], headers={"x-api-key": KEY}, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions",
                             json={"model": MODEL, "messages": USER, "stream": True}) as first:
                first_lines = first.iter_lines()
                next(first_lines)
                with http.stream("POST", "/v1/chat/completions",
                                 json={"model": MODEL, "messages": USER, "stream": True}) as second:
                    lines = [line for line in second.iter_lines() if line]
        assert ": keep-alive" in lines
        assert lines[-1] == "data: [DONE]"
        assert lim.running == 0 and lim.waiting == 0
    finally:
        lim.max_running, ctx.config.keepalive_s = saved


def test_health_and_metrics(server, client, engine):
    client.chat.completions.create(model=MODEL, messages=USER)
    url = server[0]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    for name in ("dsv4_requests_total", "dsv4_prompt_tokens_total", "dsv4_completion_tokens_total",
                 "dsv4_cached_prompt_tokens_total", "dsv4_time_to_first_token_seconds_bucket",
                 "dsv4_inter_token_latency_seconds_bucket", "dsv4_queue_depth", "dsv4_running_requests",
                 "dsv4_kv_cache_usage_ratio", "dsv4_prefix_cache_hit_rate", "dsv4_cost_usd_total"):
        assert name in text, name
    assert 'dsv4_requests_total{protocol="openai",status="200"}' in text


def test_scripted_think_and_content_with_calls(client, engine):
    engine.replies = [think("Plan: call it.", "Sure."),
                      tool_calls([{"name": "get_weather", "arguments": {"city": "Rome"}}], content="Checking.",
                                 reasoning="Need data.")]
    r = client.chat.completions.create(model=MODEL, messages=USER)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("Plan: call it.", "Sure.")
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS)
    m = r.choices[0].message
    assert (m.reasoning_content, m.content) == ("Need data.", "Checking.")
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Rome"}


def test_serve_command_context(monkeypatch, tmp_path):
    """`dsv4 serve`'s own wiring: the default model (the shipped demo), DSV4_API_KEY, a price file, the real engine."""
    from dsv4.cli import build_parser
    from dsv4.commands.serve import configs
    from dsv4.runtime import build_serve_context

    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"mine": {"input": 1, "cache_hit": 0.5, "output": 2}}))
    monkeypatch.setenv("DSV4_API_KEY", "env-key")
    args = build_parser().parse_args(["serve", "--served-model-name", "mine", "other", "--api-key", "flag-key",
                                      "--max-concurrent", "2", "--prefix-cache-mb", "0", "--price-file", str(prices)])
    ctx = build_serve_context(*configs(args))
    assert ctx.config.api_keys == ["flag-key", "env-key"] and ctx.config.served_model_names == ["mine", "other"]
    with live_server(create_app(ctx)) as url:
        for key in ("flag-key", "env-key"):
            c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            r = c.chat.completions.create(model="mine", messages=USER, max_tokens=4,
                                          extra_body={"thinking": {"type": "disabled"}})
            assert r.choices[0].finish_reason in ("length", "stop")
            u = r.usage
            assert u.cost == pytest.approx((u.prompt_tokens * 1 + u.completion_tokens * 2) / 1e6)
