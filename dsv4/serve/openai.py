"""The OpenAI protocol: request schemas (pydantic, unknown keys allowed), conversion to `ChatRequest` /
`CompletionRequest`, and rendering of the `ChoiceEvent` / `Usage` stream as a `chat.completion` object, SSE
`chat.completion.chunk`s, or legacy `text_completion`s; and the error body.

Reasoning modes (serving.md 6.3), from `thinking: {type}`, `reasoning_effort` and `chat_template_kwargs`
(`thinking` / `enable_thinking` / `reasoning_effort`, vLLM and SGLang style):
* thinking is on by default (DeepSeek); `thinking.type: "disabled"`, `chat_template_kwargs.thinking: false` or
  `reasoning_effort: "none"` turn it off (-> "non-think"); "disabled" wins over any effort;
* effort `minimal`, `low`, `medium`, `high` -> "think-high" (V4 has two thinking efforts; DeepSeek's launch
  docs map low/medium to high); `max`, `xhigh`, `ultra` -> "think-max". `xhigh` follows the launch docs (max),
  not the later table that mapped it to high: a client asking above "high" wants more reasoning, not less.
* `thinking.type: "adaptive"` is thinking on.

Status codes: every malformed body, wrong type, out-of-range value or bad message is 400
`invalid_request_error` (what OpenAI answers and what the SDK's BadRequestError expects; DeepSeek's 422 is not
used), 401 a missing/wrong key, 404 an unknown model, 429 a full queue.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..chat.events import (
    ContentDelta,
    Finish,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
)
from .request import ChatRequest, ChoiceEvent, RequestError, Usage
from .service import CompletionRequest

ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
EFFORTS = {"none": None, "minimal": "think-high", "low": "think-high", "medium": "think-high",
           "high": "think-high", "max": "think-max", "xhigh": "think-max", "ultra": "think-max"}


# ------------------------------------------------------------------------------------------------ schemas
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class Message(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, v: str) -> str:
        if v not in ROLES:
            raise ValueError(f"unknown role {v!r}; expected one of {', '.join(ROLES)}")
        return v


class StreamOptions(_Lenient):
    include_usage: bool = False


class Thinking(_Lenient):
    type: Literal["enabled", "disabled", "adaptive"] = "enabled"


class ChatCompletionBody(_Lenient):
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


class CompletionBody(_Lenient):
    model: str
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate a decoded JSON body; RequestError(400) naming the first bad field."""
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise RequestError(400, f"{where}: {msg}" if where else msg,
                           param=where or None) from None


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


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def to_chat_request(body: ChatCompletionBody, model: str) -> ChatRequest:
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if body.stream_options is not None and not body.stream:
        raise RequestError(400, "stream_options is only allowed with stream: true", param="stream_options")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    opt = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                         "frequency_penalty", "repetition_penalty") if getattr(body, k) is not None}
    return ChatRequest(
        model=model, messages=[m.model_dump(exclude_none=False) for m in body.messages], mode=reasoning_mode(body),
        tools=body.tools, tool_choice=body.tool_choice if body.tool_choice is not None else "auto",
        response_format=body.response_format, max_tokens=max_tokens, stop=_stops(body.stop), seed=body.seed,
        n=body.n, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0, user=body.user, **opt)


def to_completion_request(body: CompletionBody, model: str) -> CompletionRequest:
    if body.suffix:
        raise RequestError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.stream_options is not None and not body.stream:
        raise RequestError(400, "stream_options is only allowed with stream: true", param="stream_options")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise RequestError(400, "one prompt per request", param="prompt")
        prompt = prompt[0]
    return CompletionRequest(model=model, prompt=prompt, max_tokens=body.max_tokens, temperature=body.temperature,
                             top_p=body.top_p, presence_penalty=body.presence_penalty,
                             frequency_penalty=body.frequency_penalty, stop=_stops(body.stop), seed=body.seed,
                             n=body.n, logprobs=body.logprobs, echo=body.echo)


# ------------------------------------------------------------------------------------------------ rendering
def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind, code = {401: ("authentication_error", "invalid_api_key"), 404: ("invalid_request_error", "model_not_found"),
                  429: ("rate_limit_error", "rate_limit_exceeded")}.get(status, (None, None))
    if kind is None:
        kind = code = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage_json(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_cache_hit_tokens": u.cached_tokens,
            "prompt_cache_miss_tokens": u.prompt_tokens - u.cached_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}, "cost": u.cost}


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"


class LogprobRenderer:
    """OpenAI `logprobs.content` entries from engine TokenLogprobs (needs the backend's `token_text`)."""

    def __init__(self, backend: Any) -> None:
        self._text = getattr(backend, "token_text", None)

    def entry(self, lp: Any) -> dict[str, Any]:
        text, raw = self._text(lp.token_id) if self._text else (str(lp.token_id), [])
        top = []
        for tid, value in lp.top:
            t, b = self._text(tid) if self._text else (str(tid), [])
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


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


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


# ------------------------------------------------------------------------------------------------ legacy
class CompletionAccumulator:
    """Legacy `text_completion` choices; logprobs in the legacy shape (tokens, token_logprobs, top_logprobs,
    text_offset)."""

    def __init__(self, n: int, backend: Any, logprobs: bool, echo: str = "") -> None:
        self.backend, self.want_lp, self.echo = backend, logprobs, echo
        self.texts = [[echo] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.lps: list[list[Any]] = [[] for _ in range(n)]

    def add(self, ce: ChoiceEvent) -> None:
        if isinstance(ce.event, ContentDelta):
            self.texts[ce.index].append(ce.event.text)
        elif isinstance(ce.event, Finish):
            self.finish[ce.index] = ce.event.reason
        self.lps[ce.index].extend(ce.logprobs)

    def legacy_logprobs(self, lps: list[Any], offset: int) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        for lp in lps:
            text = self.backend.token_text(lp.token_id)[0]
            tokens.append(text)
            values.append(lp.logprob)
            tops.append({self.backend.token_text(t)[0]: v for t, v in lp.top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def render(self) -> list[dict[str, Any]]:
        return [{"index": i, "text": "".join(t), "finish_reason": self.finish[i] or "stop",
                 "logprobs": self.legacy_logprobs(self.lps[i], len(self.echo)) if self.want_lp else None}
                for i, t in enumerate(self.texts)]


def completion_response(rid: str, model: str, choices: list[dict[str, Any]], usage: Usage | None,
                        created: int | None = None, streaming_usage: bool = False) -> dict[str, Any]:
    body = {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "system_fingerprint": "dsv4", "choices": choices}
    if usage is not None or streaming_usage:
        body["usage"] = usage_json(usage) if usage is not None else None
    return body
