"""The FastAPI application: OpenAI routes, errors in each protocol's shape, health, metrics, access log.

Routes (every API route accepts `Authorization: Bearer` or `x-api-key`; `/health` and `/metrics` need no key,
they are for probes and scrapers):

    POST /v1/chat/completions, /chat/completions     chat (stream or not)
    POST /v1/completions, /completions               legacy text completions (no chat template)
    GET  /v1/models, /models, /v1/models/{id}
    GET  /health                                     200 {"status": "ok"}
    GET  /metrics                                    Prometheus text
    the Anthropic routes, from `dsv4.serve.anthropic.install(app, ctx)`

Errors are rendered by path: `/v1/messages*` and `/anthropic/*` in Anthropic's shape, the rest OpenAI's.
Non-streaming requests poll for a disconnect and abort their generation when the client is gone; streaming
ones are cancelled by Starlette when the client disconnects, which closes the `Generation` (engine abort).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import anthropic
from . import openai as oai
from .context import KeepAlive, ServeContext, retry_after_header
from .request import ChoiceEvent, RequestError, Usage

log = logging.getLogger("dsv4.serve.access")

def protocol_of(path: str) -> str:
    if path.startswith("/v1/messages") or path.startswith("/anthropic/"):
        return "anthropic"
    return "openai"


def error_response(path: str, status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The protocol's error body for a request to `path`."""
    if protocol_of(path) == "anthropic":
        body: dict[str, Any] = anthropic.error_body(status, message)
    else:
        body = oai.error_body(status, message, param)
    return JSONResponse(body, status_code=status, headers=headers)


async def read_json(request: Request) -> Any:
    """The request body as JSON, or RequestError(400) for a body that is not JSON."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the request body is not valid JSON: {err}") from None


class AccessLog:
    """Pure ASGI middleware (a BaseHTTPMiddleware would buffer streams and hide disconnects): one log line per
    HTTP request when its response ends (a stream: when the stream ends) and the request counter by status."""

    def __init__(self, app: Any, ctx: ServeContext) -> None:
        self.app, self.ctx = app, ctx

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            proto = protocol_of(path) if path.startswith(("/v1", "/chat", "/completions", "/anthropic")) else "other"
            self.ctx.metrics.observe_request(proto, status[0])
            client = scope.get("client") or ("-", 0)
            log.info('%s "%s %s" %d %.1fms', client[0], scope.get("method", "-"), path, status[0],
                     (time.monotonic() - start) * 1000)


async def collect(gen: Any, request: Request) -> list[ChoiceEvent | Usage]:
    """A non-streaming generation's items; aborts it (and raises CancelledError) if the client goes away."""
    task = asyncio.ensure_future(gen.collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()
        await gen.aclose()


def create_app(ctx: ServeContext) -> FastAPI:
    app = FastAPI(title="dsv4", description="DeepSeek-V4 server: OpenAI and Anthropic protocols")
    app.state.ctx = ctx

    # ---------------------------------------------------------------- errors
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> JSONResponse:
        return error_response(request.url.path, err.status, err.message, err.param, retry_after_header(err))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(request.url.path, 400, f"{where}: {first.get('msg')}" if where else first.get("msg"),
                              where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(request.url.path, err.status_code, str(err.detail), headers=err.headers)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception) -> JSONResponse:
        logging.getLogger("dsv4.serve").exception("internal error on %s", request.url.path)
        return error_response(request.url.path, 500, f"internal server error: {type(err).__name__}")

    # ---------------------------------------------------------------- operations
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    # ---------------------------------------------------------------- models
    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "dsv4"}

    @app.get("/v1/models")
    @app.get("/models")
    async def list_models(request: Request) -> dict[str, Any]:
        ctx.check_auth(request)
        return {"object": "list", "data": [model_card(n) for n in ctx.config.served_model_names]}

    @app.get("/v1/models/{name:path}")
    @app.get("/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        ctx.check_auth(request)
        return model_card(ctx.resolve_model(name))

    # ---------------------------------------------------------------- chat
    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        ctx.check_auth(request)
        body = oai.parse(oai.ChatCompletionBody, await read_json(request))
        chat = oai.to_chat_request(body, ctx.resolve_model(body.model))
        gen = ctx.start(chat)
        lp = oai.LogprobRenderer(ctx.backend) if chat.logprobs else None
        rid = oai.new_id("chatcmpl")
        if not body.stream:
            acc, usage = oai.ChatAccumulator(chat.n, lp), None
            for item in await collect(gen, request):
                if isinstance(item, Usage):
                    usage = item
                else:
                    acc.add(item)
            return oai.chat_response(rid, body.model, acc.render(), usage)
        renderer = oai.ChunkRenderer(rid, body.model, bool(body.stream_options and body.stream_options.include_usage),
                                     lp)

        async def stream() -> AsyncIterator[str]:
            try:
                async for item in gen:
                    if isinstance(item, KeepAlive):
                        yield oai.SSE_KEEPALIVE
                    elif isinstance(item, Usage):
                        yield renderer.usage(item)
                    else:
                        yield renderer.event(item)
            except RequestError as err:
                yield oai.sse(oai.error_body(err.status, err.message, err.param))
            except Exception as err:  # a failure mid-stream: the protocol's error event, then the end
                logging.getLogger("dsv4.serve").exception("stream failed")
                yield oai.sse(oai.error_body(500, f"generation failed: {type(err).__name__}: {err}"))
            finally:
                await gen.aclose()
            yield oai.SSE_DONE

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    # ---------------------------------------------------------------- legacy completions
    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request) -> Any:
        ctx.check_auth(request)
        body = oai.parse(oai.CompletionBody, await read_json(request))
        creq = oai.to_completion_request(body, ctx.resolve_model(body.model))
        complete = getattr(ctx.backend, "complete", None)
        if complete is None:
            raise RequestError(404, "this backend has no text completions")
        gen = ctx.start(creq, events=complete(creq))
        echo = body.prompt if body.echo and isinstance(body.prompt, str) else ""
        rid = oai.new_id("cmpl")
        if not body.stream:
            acc, usage = oai.CompletionAccumulator(creq.n, ctx.backend, creq.logprobs is not None, echo), None
            for item in await collect(gen, request):
                if isinstance(item, Usage):
                    usage = item
                else:
                    acc.add(item)
            return oai.completion_response(rid, body.model, acc.render(), usage)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        created = int(time.time())

        async def stream() -> AsyncIterator[str]:
            acc = oai.CompletionAccumulator(creq.n, ctx.backend, creq.logprobs is not None)
            echoed: set[int] = set()
            try:
                async for item in gen:
                    if isinstance(item, KeepAlive):
                        yield oai.SSE_KEEPALIVE
                        continue
                    if isinstance(item, Usage):
                        if include_usage:
                            yield oai.sse(oai.completion_response(rid, body.model, [], item, created))
                        continue
                    ev = item.event
                    text = item.event.text if hasattr(ev, "text") else ""
                    if echo and item.index not in echoed:
                        echoed.add(item.index)
                        text = echo + text
                    finish = getattr(ev, "reason", None)
                    lps = acc.legacy_logprobs(list(item.logprobs), 0) if creq.logprobs is not None else None
                    choice = {"index": item.index, "text": text, "logprobs": lps, "finish_reason": finish}
                    yield oai.sse(oai.completion_response(rid, body.model, [choice], None, created, include_usage))
            except RequestError as err:
                yield oai.sse(oai.error_body(err.status, err.message, err.param))
            except Exception as err:
                logging.getLogger("dsv4.serve").exception("stream failed")
                yield oai.sse(oai.error_body(500, f"generation failed: {type(err).__name__}: {err}"))
            finally:
                await gen.aclose()
            yield oai.SSE_DONE

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    # ---------------------------------------------------------------- Anthropic
    anthropic.install(app, ctx)

    app.add_middleware(AccessLog, ctx=ctx)
    return app
