"""OpenAI Chat Completions (`POST /v1/chat/completions`, `/chat/completions`) and the model list (`GET /v1/models`,
`/v1/models/{id}`, both also without `/v1`): request schema (pydantic, unknown keys allowed), conversion to
`ChatRequest`, and rendering of the `ChoiceEvent` / `Usage` stream as a `chat.completion` object or SSE
`chat.completion.chunk`s (DeepSeek's field set: `reasoning_content`, cache hit/miss usage, cost).

Reasoning modes (serving.md 6.3), from `thinking: {type}`, `reasoning_effort` and `chat_template_kwargs`
(`thinking` / `enable_thinking` / `reasoning_effort`, vLLM and SGLang style):
* thinking is on by default (DeepSeek); `thinking.type: "disabled"`, `chat_template_kwargs.thinking: false` or
  `reasoning_effort: "none"` turn it off (-> "non-think"); "disabled" wins over any effort;
* effort `minimal`, `low`, `medium`, `high` -> "think-high" (V4 has two thinking efforts; DeepSeek's launch
  docs map low/medium to high); `max`, `xhigh`, `ultra` -> "think-max". `xhigh` follows the launch docs (max),
  not the later table that mapped it to high: a client asking above "high" wants more reasoning, not less.
* `thinking.type: "adaptive"` is thinking on.

Status codes, error body and SSE framing are OpenAI's (`openai_common`).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field, field_validator

from ...chat.events import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from ...engine.sampling import TokenLogprobs
from ..context import ServeContext
from ..plumbing import collect, read_json, sse_response
from ..request import ChatBackend, ChatRequest, ChoiceEvent, RequestError, Usage
from . import WireProtocol
from .openai_common import (
    LenientModel,
    StreamOptions,
    check_stream_options,
    error_body,
    event_stream,
    include_usage,
    new_id,
    parse,
    sse,
    stop_list,
    usage_json,
)

ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
EFFORTS = {"none": None, "minimal": "think-high", "low": "think-high", "medium": "think-high",
           "high": "think-high", "max": "think-max", "xhigh": "think-max", "ultra": "think-max"}


# ------------------------------------------------------------------------------------------------ schemas
class Message(LenientModel):
    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, v: str) -> str:
        if v not in ROLES:
            raise ValueError(f"unknown role {v!r}; expected one of {', '.join(ROLES)}")
        return v


class Thinking(LenientModel):
    type: Literal["enabled", "disabled", "adaptive"] = "enabled"


class ChatCompletionBody(LenientModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    thinking: Thinking | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    user: str | None = None


# ------------------------------------------------------------------------------------------------ conversion
def reasoning_mode(body: ChatCompletionBody) -> str:
    """The reasoning mode the request asks for (see the module docstring)."""
    kwargs = body.chat_template_kwargs or {}
    enabled = True
    if body.thinking is not None:
        enabled = body.thinking.type != "disabled"
    for key in ("thinking", "enable_thinking"):
        if key in kwargs:
            if not isinstance(kwargs[key], bool):
                raise RequestError(400, f"chat_template_kwargs.{key} must be a boolean",
                                   param=f"chat_template_kwargs.{key}")
            enabled = enabled and kwargs[key]
    effort = body.reasoning_effort if body.reasoning_effort is not None else kwargs.get("reasoning_effort")
    if effort is not None:
        if not isinstance(effort, str) or effort.lower() not in EFFORTS:
            raise RequestError(400, f"reasoning_effort must be one of {', '.join(EFFORTS)}, got {effort!r}",
                               param="reasoning_effort")
        mode = EFFORTS[effort.lower()]
        if mode is None:
            enabled = False
    else:
        mode = "think-high"
    return mode if enabled else "non-think"


def to_chat_request(body: ChatCompletionBody, model: str) -> ChatRequest:
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    check_stream_options(body.stream, body.stream_options)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    opt = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                         "frequency_penalty", "repetition_penalty") if getattr(body, k) is not None}
    return ChatRequest(
        model=model, messages=[m.model_dump(exclude_none=False) for m in body.messages], mode=reasoning_mode(body),
        tools=body.tools, tool_choice=body.tool_choice if body.tool_choice is not None else "auto",
        parallel_tool_calls=body.parallel_tool_calls is not False, response_format=body.response_format,
        max_tokens=max_tokens, stop=stop_list(body.stop), seed=body.seed,
        n=body.n, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0, user=body.user, **opt)


# ------------------------------------------------------------------------------------------------ rendering
class LogprobRenderer:
    """OpenAI `logprobs.content` entries from engine TokenLogprobs, token texts from the backend."""

    def __init__(self, backend: ChatBackend) -> None:
        self.backend = backend

    def entry(self, lp: TokenLogprobs) -> dict[str, Any]:
        text, raw = self.backend.token_text(lp.token_id)
        top = []
        for tid, value in lp.top:
            t, b = self.backend.token_text(tid)
            top.append({"token": t, "logprob": value, "bytes": b})
        return {"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}


class ChatAccumulator:
    """Collects one response's events into `chat.completion` choices (non-streaming)."""

    def __init__(self, n: int, logprobs: LogprobRenderer | None) -> None:
        self.lp = logprobs
        self.choices = [{"reasoning": [], "content": [], "calls": {}, "finish": None, "logprobs": []}
                        for _ in range(n)]

    def add(self, ce: ChoiceEvent) -> None:
        c, ev = self.choices[ce.index], ce.event
        if self.lp is not None:
            c["logprobs"].extend(self.lp.entry(x) for x in ce.logprobs)
        if isinstance(ev, ReasoningDelta):
            c["reasoning"].append(ev.text)
        elif isinstance(ev, ContentDelta):
            c["content"].append(ev.text)
        elif isinstance(ev, ToolCallStart):
            c["calls"][ev.index] = {"id": ev.id, "type": "function", "function": {"name": ev.name, "arguments": ""}}
        elif isinstance(ev, ToolCallArgumentsDelta):
            c["calls"][ev.index]["function"]["arguments"] += ev.text
        elif isinstance(ev, Finish):
            c["finish"] = ev.reason

    def render(self) -> list[dict[str, Any]]:
        out = []
        for i, c in enumerate(self.choices):
            calls = [c["calls"][k] for k in sorted(c["calls"])]
            content = "".join(c["content"])
            message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None,
                                       "reasoning_content": "".join(c["reasoning"]) or None}
            if calls:
                message["tool_calls"] = calls
            out.append({"index": i, "message": message, "finish_reason": c["finish"] or "stop",
                        "logprobs": {"content": c["logprobs"]} if self.lp is not None else None})
        return out


def chat_response(rid: str, model: str, choices: list[dict[str, Any]], usage: Usage | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": "dsv4", "choices": choices, "usage": usage_json(usage) if usage else None}


class ChunkRenderer:
    """SSE `chat.completion.chunk`s for a stream of ChoiceEvents, DeepSeek's order: a first chunk with the role,
    reasoning / content / tool-call deltas, a chunk with finish_reason, and the usage chunk when asked."""

    def __init__(self, rid: str, model: str, include_usage: bool, logprobs: LogprobRenderer | None) -> None:
        self.rid, self.model, self.include_usage, self.lp = rid, model, include_usage, logprobs
        self.created = int(time.time())
        self.started: set[int] = set()

    def _chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        body: dict[str, Any] = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "system_fingerprint": "dsv4", "choices": choices}
        if self.include_usage:
            body["usage"] = usage_json(usage) if usage is not None else None
        return sse(body)

    def render(self, item: ChoiceEvent | Usage) -> str:
        """The SSE text of one stream item ("" for a usage nobody asked for)."""
        return self.usage(item) if isinstance(item, Usage) else self.event(item)

    def event(self, ce: ChoiceEvent) -> str:
        out = ""
        i, ev = ce.index, ce.event
        if i not in self.started:
            self.started.add(i)
            out += self._chunk([{"index": i, "delta": {"role": "assistant", "content": None, "reasoning_content": ""},
                                 "logprobs": None, "finish_reason": None}])
        delta: dict[str, Any]
        finish = None
        if isinstance(ev, ReasoningDelta):
            delta = {"content": None, "reasoning_content": ev.text}
        elif isinstance(ev, ContentDelta):
            delta = {"content": ev.text, "reasoning_content": None}
        elif isinstance(ev, ToolCallStart):
            delta = {"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                     "function": {"name": ev.name, "arguments": ""}}]}
        elif isinstance(ev, ToolCallArgumentsDelta):
            delta = {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]}
        elif isinstance(ev, Finish):
            delta, finish = {}, ev.reason
        elif isinstance(ev, ToolCallEnd) and not ce.logprobs:
            return out
        else:
            delta = {}
        logprobs = None
        if self.lp is not None and ce.logprobs:
            logprobs = {"content": [self.lp.entry(x) for x in ce.logprobs]}
        return out + self._chunk([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

    def usage(self, usage: Usage) -> str:
        return self._chunk([], usage) if self.include_usage else ""


def model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "dsv4"}


# ------------------------------------------------------------------------------------------------ routes
def router(ctx: ServeContext) -> APIRouter:
    """The Chat Completions and model routes over `ctx` (endpoint names and signatures make the OpenAPI schema)."""
    api = APIRouter()

    @api.get("/v1/models")
    @api.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in ctx.config.served_model_names]}

    @api.get("/v1/models/{name:path}")
    @api.get("/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        return model_card(ctx.resolve_model(name))

    def prepare(data: Any) -> tuple[ChatCompletionBody, ChatRequest]:
        """The decoded body validated and converted (in the body reader's worker thread for a big body)."""
        body = parse(ChatCompletionBody, data)
        return body, to_chat_request(body, ctx.resolve_model(body.model))

    @api.post("/v1/chat/completions")
    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body, chat = await read_json(request, prepare)
        gen = await ctx.start(chat)
        lp = LogprobRenderer(ctx.backend) if chat.logprobs else None
        rid = new_id("chatcmpl")
        if not body.stream:
            acc, usage = ChatAccumulator(chat.n, lp), None
            for item in await collect(gen, request):
                if isinstance(item, Usage):
                    usage = item
                else:
                    acc.add(item)
            return chat_response(rid, body.model, acc.render(), usage)
        renderer = ChunkRenderer(rid, body.model, include_usage(body.stream_options), lp)
        return sse_response(event_stream(gen, renderer.render))

    return api


# "/v1" is OpenAI's base URL: an unknown path under it is answered in OpenAI's shape (the longer prefixes of the
# other protocols, such as Anthropic's "/v1/messages", still win)
PROTOCOL = WireProtocol(name="openai-chat", family="openai", prefixes=("/v1", "/chat", "/models"),
                        error_body=error_body, router=router)
