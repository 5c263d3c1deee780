"""OpenAI legacy text completions (`POST /v1/completions`, `/completions`): the prompt goes to the model as it
is (text or token ids, no chat template, nothing parsed out of the answer). Request schema, conversion to
`CompletionRequest`, and rendering as `text_completion` objects, whole or as SSE chunks; logprobs in the legacy
shape (tokens, token_logprobs, top_logprobs, text_offset). One prompt per request; `suffix` (fill-in-the-middle)
is refused.

Status codes, error body and SSE framing are OpenAI's (`openai_common`).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from ...chat.events import ContentDelta, Finish
from ...engine.sampling import TokenLogprobs
from ..context import ServeContext
from ..plumbing import collect, read_json, sse_response
from ..request import ChatBackend, ChoiceEvent, CompletionRequest, RequestError, Usage
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


# ------------------------------------------------------------------------------------------------ schema
class CompletionBody(LenientModel):
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


# ------------------------------------------------------------------------------------------------ conversion
def to_completion_request(body: CompletionBody, model: str) -> CompletionRequest:
    if body.suffix:
        raise RequestError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    check_stream_options(body.stream, body.stream_options)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise RequestError(400, "one prompt per request", param="prompt")
        prompt = prompt[0]
    return CompletionRequest(model=model, prompt=prompt, max_tokens=body.max_tokens, temperature=body.temperature,
                             top_p=body.top_p, presence_penalty=body.presence_penalty,
                             frequency_penalty=body.frequency_penalty, stop=stop_list(body.stop), seed=body.seed,
                             n=body.n, logprobs=body.logprobs, echo=body.echo)


# ------------------------------------------------------------------------------------------------ rendering
def legacy_logprobs(backend: ChatBackend, lps: list[TokenLogprobs], offset: int) -> dict[str, Any]:
    """The legacy logprobs object of some tokens whose text starts at character `offset` of the choice's text;
    token texts come from the backend's `token_text`."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        text = backend.token_text(lp.token_id)[0]
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({backend.token_text(t)[0]: v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def completion_response(rid: str, model: str, choices: list[dict[str, Any]], usage: Usage | None,
                        created: int | None = None, streaming_usage: bool = False) -> dict[str, Any]:
    """A `text_completion` object; `streaming_usage`: a stream that ends with a usage chunk, whose other chunks
    carry `usage: null`."""
    body = {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "system_fingerprint": "dsv4", "choices": choices}
    if usage is not None or streaming_usage:
        body["usage"] = usage_json(usage) if usage is not None else None
    return body


class CompletionAccumulator:
    """Legacy `text_completion` choices of a whole generation (non-streaming); `echo` is the prompt text each
    choice starts with (echo: true)."""

    def __init__(self, n: int, backend: ChatBackend, logprobs: bool, echo: str = "") -> None:
        self.backend, self.want_lp, self.echo = backend, logprobs, echo
        self.texts = [[echo] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.lps: list[list[TokenLogprobs]] = [[] for _ in range(n)]

    def add(self, ce: ChoiceEvent) -> None:
        if isinstance(ce.event, ContentDelta):
            self.texts[ce.index].append(ce.event.text)
        elif isinstance(ce.event, Finish):
            self.finish[ce.index] = ce.event.reason
        self.lps[ce.index].extend(ce.logprobs)

    def render(self) -> list[dict[str, Any]]:
        return [{"index": i, "text": "".join(t), "finish_reason": self.finish[i] or "stop",
                 "logprobs": legacy_logprobs(self.backend, self.lps[i], len(self.echo)) if self.want_lp else None}
                for i, t in enumerate(self.texts)]


class CompletionChunkRenderer:
    """SSE `text_completion` chunks: one per event (the echoed prompt before a choice's first text), and the usage
    chunk when asked."""

    def __init__(self, rid: str, model: str, backend: ChatBackend, logprobs: bool, echo: str,
                 include_usage: bool) -> None:
        self.rid, self.model, self.backend, self.want_lp = rid, model, backend, logprobs
        self.echo, self.include_usage = echo, include_usage
        self.created = int(time.time())
        self.echoed: set[int] = set()

    def render(self, item: ChoiceEvent | Usage) -> str:
        if isinstance(item, Usage):
            return sse(completion_response(self.rid, self.model, [], item, self.created)) if self.include_usage else ""
        ev = item.event
        text = ev.text if hasattr(ev, "text") else ""
        if self.echo and item.index not in self.echoed:
            self.echoed.add(item.index)
            text = self.echo + text
        lps = legacy_logprobs(self.backend, list(item.logprobs), 0) if self.want_lp else None
        choice = {"index": item.index, "text": text, "logprobs": lps, "finish_reason": getattr(ev, "reason", None)}
        return sse(completion_response(self.rid, self.model, [choice], None, self.created, self.include_usage))


# ------------------------------------------------------------------------------------------------ routes
def router(ctx: ServeContext) -> APIRouter:
    """The legacy completions routes over `ctx` (endpoint names and signatures make the OpenAPI schema)."""
    api = APIRouter()

    @api.post("/v1/completions")
    @api.post("/completions")
    async def completions(request: Request) -> Any:
        body = parse(CompletionBody, await read_json(request))
        creq = to_completion_request(body, ctx.resolve_model(body.model))
        gen = await ctx.start(creq, ctx.backend.complete)
        echo = body.prompt if body.echo and isinstance(body.prompt, str) else ""
        want_lp = creq.logprobs is not None
        rid = new_id("cmpl")
        if not body.stream:
            acc, usage = CompletionAccumulator(creq.n, ctx.backend, want_lp, echo), None
            for item in await collect(gen, request):
                if isinstance(item, Usage):
                    usage = item
                else:
                    acc.add(item)
            return completion_response(rid, body.model, acc.render(), usage)
        renderer = CompletionChunkRenderer(rid, body.model, ctx.backend, want_lp, echo,
                                           include_usage(body.stream_options))
        return sse_response(event_stream(gen, renderer.render))

    return api


PROTOCOL = WireProtocol(name="openai-completions", family="openai", prefixes=("/v1/completions", "/completions"),
                        error_body=error_body, router=router)
