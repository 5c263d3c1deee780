"""Structured outputs and tool choice on the shipped demo model, through a real server with the official SDKs.

* no tools, or tool_choice "none": a question the model answers with a call gets no call (the tool-call markup
  cannot be written);
* response_format json_object / json_schema (OpenAI, with the SDK's `.parse()`), output_config.format
  (Anthropic): the output parses and validates;
* tool_choice "required" / named (OpenAI) and "any" / "tool" (Anthropic) in thinking mode: the model reasons,
  then calls (that) tool with arguments valid for its schema;
* the conformance suite: 50 schemas (`structured_schemas.py`) x both protocols x thinking on and off, every
  output validated with `jsonschema`.

The demo model was never trained on JSON: what it writes inside the structure is nonsense, and it validates
because the grammar and the closer leave nothing else possible.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import jsonschema
import openai
import pydantic
import pytest
from serve_stubs import live_server
from structured_schemas import SCHEMAS

from dsv4.demo import MODEL_NAME
from dsv4.demo.corpus import CALCULATOR_TOOL, WEATHER_TOOL
from dsv4.runtime import EngineConfig, ModelSource, ServerConfig, build_serve_context
from dsv4.serve.app import create_app

WEATHER_QUESTION = [{"role": "user", "content": "What's the weather in Oslo?"}]
NO_THINKING = {"thinking": {"type": "disabled"}}
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def url():
    ctx = build_serve_context(ModelSource(), EngineConfig(max_batch=8), ServerConfig())
    with live_server(create_app(ctx)) as base:
        yield base


@pytest.fixture(scope="module")
def oai(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(url):
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)


def valid_arguments(call, tool) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


# ---------------------------------------------------------------------------------------------- tools


def test_no_declared_tool_can_be_called(oai, claude):
    """The demo answers the weather question with a get_weather call whenever it can (see the README); with no
    tools, or tool_choice "none", it cannot."""
    with_tools = oai.chat.completions.create(model=MODEL_NAME, messages=WEATHER_QUESTION, tools=[WEATHER_TOOL],
                                             extra_body=NO_THINKING, max_tokens=80)
    assert with_tools.choices[0].message.tool_calls  # the control: it does call when it may
    for kwargs in ({}, {"tools": [WEATHER_TOOL], "tool_choice": "none"}):
        for extra in (NO_THINKING, {}):
            r = oai.chat.completions.create(model=MODEL_NAME, messages=WEATHER_QUESTION, max_tokens=80,
                                            extra_body=extra, **kwargs)
            choice = r.choices[0]
            assert not choice.message.tool_calls and choice.finish_reason != "tool_calls", choice
            assert "DSML" not in (choice.message.content or "") + (choice.message.reasoning_content or "")
    m = claude.messages.create(model=MODEL_NAME, max_tokens=80, messages=WEATHER_QUESTION)
    assert all(block.type != "tool_use" for block in m.content) and m.stop_reason != "tool_use"


def test_required_and_named_tool_choice_reason_then_call(oai):
    question = [{"role": "user", "content": "Calculate 336 + 92"}]  # a sum it would answer without a tool
    r = oai.chat.completions.create(model=MODEL_NAME, messages=question, tools=[WEATHER_TOOL, CALCULATOR_TOOL],
                                    tool_choice="required", reasoning_effort="high", max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.model_extra.get("reasoning_content")
    call = choice.message.tool_calls[0]
    tool = {t["function"]["name"]: t for t in (WEATHER_TOOL, CALCULATOR_TOOL)}[call.function.name]
    valid_arguments(call, tool)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for extra in ({"reasoning_effort": "high"}, {"extra_body": NO_THINKING}):
        r = oai.chat.completions.create(model=MODEL_NAME, messages=question, tools=[WEATHER_TOOL, CALCULATOR_TOOL],
                                        tool_choice=named, max_tokens=200, **extra)
        calls = r.choices[0].message.tool_calls
        assert [c.function.name for c in calls] == ["get_weather"] and r.choices[0].finish_reason == "tool_calls"
        valid_arguments(calls[0], WEATHER_TOOL)


def test_anthropic_any_and_tool_choice_in_thinking_mode(claude):
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in (WEATHER_TOOL, CALCULATOR_TOOL)]
    question = [{"role": "user", "content": "Calculate 336 + 92"}]
    for choice, names in (({"type": "any"}, {"get_weather", "calculator"}),
                          ({"type": "tool", "name": "calculator"}, {"calculator"})):
        m = claude.messages.create(model=MODEL_NAME, max_tokens=200, messages=question, tools=tools,
                                   tool_choice=choice, thinking={"type": "enabled", "budget_tokens": 1024})
        kinds = [b.type for b in m.content]
        assert kinds[0] == "thinking" and "tool_use" in kinds and m.stop_reason == "tool_use", kinds
        use = next(b for b in m.content if b.type == "tool_use")
        assert use.name in names
        jsonschema.validate(use.input, next(t["input_schema"] for t in tools if t["name"] == use.name))


# ---------------------------------------------------------------------------------------------- JSON


class Sum(pydantic.BaseModel):
    a: int
    b: int
    result: int
    explanation: str


def test_sdk_parse_and_json_object(oai):
    for extra in ({"reasoning_effort": "high"}, {"extra_body": NO_THINKING}):
        parsed = oai.beta.chat.completions.parse(model=MODEL_NAME, messages=[{"role": "user", "content":
                                                 "Calculate 336 + 92"}], response_format=Sum, max_tokens=MAX_TOKENS,
                                                 **extra)
        assert isinstance(parsed.choices[0].message.parsed, Sum), parsed.choices[0].message
        r = oai.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Say hi in JSON"}],
                                        response_format={"type": "json_object"}, max_tokens=MAX_TOKENS, **extra)
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def _openai_output(url: str, schema: dict, thinking: bool) -> str:
    response_format = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Reply in JSON."}],
            "response_format": response_format, "max_tokens": MAX_TOKENS,
            **({"reasoning_effort": "high"} if thinking else NO_THINKING)}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _anthropic_output(url: str, schema: dict, thinking: bool) -> str:
    body = {"model": MODEL_NAME, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "Reply in JSON."}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
            "thinking": {"type": "enabled", "budget_tokens": 1024} if thinking else {"type": "disabled"}}
    r = httpx.post(url + "/v1/messages", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return "".join(b["text"] for b in r.json()["content"] if b["type"] == "text")


def test_conformance_suite_every_output_validates(url):
    cases = [(i, protocol, thinking) for i in range(len(SCHEMAS)) for protocol in ("openai", "anthropic")
             for thinking in (False, True)]

    def run(case):
        i, protocol, thinking = case
        text = (_openai_output if protocol == "openai" else _anthropic_output)(url, SCHEMAS[i], thinking)
        try:
            jsonschema.validate(json.loads(text), SCHEMAS[i])
            return None
        except (ValueError, jsonschema.ValidationError) as err:
            return f"schema {i} {protocol} thinking={thinking}: {type(err).__name__} on {text!r}"

    with ThreadPoolExecutor(max_workers=8) as pool:  # the engine batches them
        failures = [f for f in pool.map(run, cases) if f is not None]
    assert len(cases) == 200 and not failures, f"{len(failures)}/200 invalid:\n" + "\n".join(failures[:10])
