"""Agent frameworks' structured outputs against the real server on the demo model: LangChain's
`with_structured_output` (json_schema and function_calling send the schema, so the result validates every time;
json_mode sends only `json_object`, so what the server can promise is a JSON object) and pydantic-ai's
`output_type` (a required call of its output tool, in thinking mode, DeepSeek's default). Both talk to the server
over loopback; nothing is downloaded."""

from __future__ import annotations

import json

import pydantic
import pytest
from langchain_openai import ChatOpenAI
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from serve_stubs import live_server

from dsv4.demo import MODEL_NAME
from dsv4.runtime import EngineConfig, ModelSource, ServerConfig, build_serve_context
from dsv4.serve.app import create_app


class Sum(pydantic.BaseModel):
    """The sum of two numbers."""

    a: int
    b: int
    result: int


@pytest.fixture(scope="module")
def url():
    ctx = build_serve_context(ModelSource(), EngineConfig(max_batch=4), ServerConfig())
    with live_server(create_app(ctx)) as base:
        yield base + "/v1"


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(url, method, thinking):
    extra = {} if thinking else {"thinking": {"type": "disabled"}}
    llm = ChatOpenAI(base_url=url, api_key="unused", model=MODEL_NAME, max_tokens=200, max_retries=0,
                     extra_body=extra)
    result = llm.with_structured_output(Sum, method=method).invoke("Calculate 336 + 92")
    assert isinstance(result, Sum)


def test_langchain_json_mode_gives_a_json_object(url):
    llm = ChatOpenAI(base_url=url, api_key="unused", model=MODEL_NAME, max_tokens=120, max_retries=0)
    reply = llm.bind(response_format={"type": "json_object"}).invoke("Calculate 336 + 92 and answer in JSON")
    assert isinstance(json.loads(reply.content), dict)


def test_pydantic_ai_output_type(url):
    model = OpenAIChatModel(MODEL_NAME, provider=OpenAIProvider(base_url=url, api_key="unused"))
    agent = Agent(model, output_type=Sum, model_settings={"max_tokens": 200})
    result = agent.run_sync("Calculate 336 + 92")
    assert isinstance(result.output, Sum)
