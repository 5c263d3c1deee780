"""OpenAI legacy text completions (`POST /v1/completions`, `/completions`): the prompt goes to the model as it
is (text or token ids, no chat template, nothing parsed out of the answer). Request schema, conversion to
`CompletionRequest`, and rendering as `text_completion` objects, whole or as SSE chunks; logprobs in the legacy
shape (tokens, token_logprobs, top_logprobs, text_offset), as vLLM returns them: `top_logprobs` holds the chosen
token and the `logprobs` most likely ones, and with `echo` the prompt tokens come first, the first of them with
`null` for its logprob and alternatives. `prompt` takes OpenAI's four forms (one choice per prompt x n, numbered
prompt index * n + i); `max_tokens: 0` with `echo` returns the prompt alone (what harnesses score loglikelihoods
with). `suffix` (fill-in-the-middle) is refused.

Status codes, error body and SSE framing are OpenAI's (`openai_common`).
"""

from __future__ import annotations

import time
from collections import defaultdict
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
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
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
    return CompletionRequest(model=model, prompt=body.prompt, max_tokens=body.max_tokens, temperature=body.temperature,
                             top_p=body.top_p, presence_penalty=body.presence_penalty,
                             frequency_penalty=body.frequency_penalty, stop=stop_list(body.stop), seed=body.seed,
                             n=body.n, logprobs=body.logprobs, echo=body.echo)


# ------------------------------------------------------------------------------------------------ rendering
def legacy_logprobs(backend: ChatBackend, lps: list[TokenLogprobs], offset: int) -> dict[str, Any]:
    """The legacy logprobs object of some tokens whose text starts at character `offset` of the choice's text;
    token texts come from the backend's `token_text`. Each `top_logprobs` entry holds the chosen token, then the
    most likely ones (OpenAI's "up to logprobs + 1"); a token without a logprob (a prompt's first) has null."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        text = backend.token_text(lp.token_id)[0]
        tokens.append(text)
        values.append(lp.logprob)
        tops.append(None if lp.logprob is None else
                    {text: lp.logprob} | {backend.token_text(t)[0]: v for t, v in lp.top})
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
    """Legacy `text_completion` choices of a whole generation (non-streaming), in index order (every choice ends
    with a Finish event, so each one shows up)."""

    def __init__(self, backend: ChatBackend, logprobs: bool) -> None:
        self.backend, self.want_lp = backend, logprobs
        self.texts: dict[int, list[str]] = defaultdict(list)
        self.finish: dict[int, str] = {}
        self.lps: dict[int, list[TokenLogprobs]] = defaultdict(list)

    def add(self, ce: ChoiceEvent) -> None:
        if isinstance(ce.event, ContentDelta):
            self.texts[ce.index].append(ce.event.text)
        elif isinstance(ce.event, Finish):
            self.finish[ce.index] = ce.event.reason
        self.lps[ce.index].extend(ce.logprobs)

    def render(self) -> list[dict[str, Any]]:
        return [{"index": i, "text": "".join(self.texts[i]), "finish_reason": self.finish.get(i) or "stop",
                 "logprobs": legacy_logprobs(self.backend, self.lps[i], 0) if self.want_lp else None}
                for i in sorted(self.texts.keys() | self.finish.keys())]


class CompletionChunkRenderer:
    """SSE `text_completion` chunks: one per event (a choice's echoed prompt is its first), and the usage chunk
    when asked. `text_offset` counts on from the choice's earlier chunks."""

    def __init__(self, rid: str, model: str, backend: ChatBackend, logprobs: bool, include_usage: bool) -> None:
        self.rid, self.model, self.backend, self.want_lp = rid, model, backend, logprobs
        self.include_usage = include_usage
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}  # choice index -> characters of the tokens rendered so far

    def render(self, item: ChoiceEvent | Usage) -> str:
        if isinstance(item, Usage):
            return sse(completion_response(self.rid, self.model, [], item, self.created)) if self.include_usage else ""
        ev = item.event
        text = ev.text if hasattr(ev, "text") else ""
        lps = None
        if self.want_lp:
            lps = legacy_logprobs(self.backend, list(item.logprobs), self.offsets.get(item.index, 0))
            if lps["tokens"]:
                self.offsets[item.index] = lps["text_offset"][-1] + len(lps["tokens"][-1])
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
        want_lp = creq.logprobs is not None
        rid = new_id("cmpl")
        if not body.stream:
            acc, usage = CompletionAccumulator(ctx.backend, want_lp), None
            for item in await collect(gen, request):
                if isinstance(item, Usage):
                    usage = item
                else:
                    acc.add(item)
            return completion_response(rid, body.model, acc.render(), usage)
        renderer = CompletionChunkRenderer(rid, body.model, ctx.backend, want_lp, include_usage(body.stream_options))
        return sse_response(event_stream(gen, renderer.render))

    return api


PROTOCOL = WireProtocol(name="openai-completions", family="openai", prefixes=("/v1/completions", "/completions"),
                        error_body=error_body, router=router)
