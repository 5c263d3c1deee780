"""The demo model shipped in the package, through the real server and the official SDKs (greedy decoding).

It must load from the package in exact numerics, answer a held-out sum correctly in think-high mode with its
reasoning in `reasoning_content` (OpenAI Chat Completions), and call the weather tool with the right city
(Anthropic Messages), parsed into a `tool_use` block."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from serve_stubs import live_server

from dsv4.demo import MODEL_DIR, MODEL_NAME
from dsv4.demo.corpus import WEATHER, WEATHER_TOOL, arithmetic, split_of
from dsv4.runtime import EngineConfig, ModelSource, build_serve_context
from dsv4.serve.app import create_app

# a held-out sum (its key is in the corpus's test split, checked below) that the shipped weights get right; they get
# a few held-out sums in a hundred wrong (see the README's evaluation), so this pins the weights and the whole path
QUESTION = (336, "+", 92)
CITY = "Oslo"


@pytest.fixture(scope="module")
def url():
    ctx = build_serve_context(ModelSource(), EngineConfig(max_batch=2))  # the default model: the shipped demo
    assert ctx.config.served_model_names == [MODEL_NAME]
    with live_server(create_app(ctx)) as base:
        yield base


def test_the_shipped_model_is_an_official_checkpoint():
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "deepseek_v4" and config["quantization_config"]["quant_method"] == "fp8"
    assert (MODEL_DIR / "tokenizer.json").is_file() and (MODEL_DIR / "generation_config.json").is_file()
    size = sum(f.stat().st_size for f in MODEL_DIR.glob("*.safetensors"))
    assert 1e6 < size < 8e6, size


def test_think_high_answers_a_held_out_sum_with_its_reasoning(url):
    a, op, b = QUESTION
    assert split_of(f"arith|{a}{op}{b}") == "test"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    question = [{"role": "user", "content": f"Calculate {a} {op} {b}"}]
    r = client.chat.completions.create(model=MODEL_NAME, messages=question, reasoning_effort="high", max_tokens=300)
    message = r.choices[0].message
    reasoning = message.model_extra.get("reasoning_content")
    assert reasoning and "So far" in reasoning
    assert r.choices[0].finish_reason == "stop"
    assert message.content.strip().endswith(f"= {arithmetic(a, op, b)}.")


def test_messages_api_calls_the_weather_tool(url):
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    fn = WEATHER_TOOL["function"]
    tool = {"name": fn["name"], "description": fn["description"], "input_schema": fn["parameters"]}
    assert CITY in WEATHER
    r = client.messages.create(model=MODEL_NAME, max_tokens=200, tools=[tool],
                               messages=[{"role": "user", "content": f"What's the weather in {CITY}?"}])
    assert r.stop_reason == "tool_use"
    calls = [block for block in r.content if block.type == "tool_use"]
    assert [(c.name, c.input) for c in calls] == [("get_weather", {"city": CITY})]
