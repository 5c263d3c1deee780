"""The HTTP plumbing every protocol's routes share, so no protocol module carries its own copy: the one JSON body
reader (size limit, then `body.decode`), the non-streaming wait that aborts the generation when the client leaves,
and the SSE response.

It lives apart from `app.py` because the protocol modules use it and `app.py` imports the protocol modules (to
register them); the app applies the rest of the shared plumbing (API keys, error bodies, metrics) itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from . import body
from .context import Generation
from .request import ChoiceEvent, RequestError, Usage

# no-cache: nothing may replay a stream; x-accel-buffering: nginx must pass the events through as they come
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

# bodies up to this size are decoded and validated on the event loop (well under a millisecond); bigger ones in a
# worker thread, where the event loop runs between their steps (each C step holds the GIL; `body.decode` bounds them)
INLINE_BODY_BYTES = 2**16

T = TypeVar("T")


def _same(value: Any) -> Any:
    return value


async def read_json(request: Request, then: Callable[[Any], T] = _same) -> T:
    """The request body as JSON, passed through `then` (a protocol's schema validation and conversion, which for a
    body of 100,000 messages takes most of a second: in the same worker thread as the decoding, the event loop
    runs meanwhile). RequestError(413) past the server's `max_body_bytes` (refused from its content-length before
    reading, or as soon as a chunked body passes it), RequestError(400) for what `body.decode` refuses (not JSON,
    nested too deep, too many values, invalid Unicode); `then` raises RequestError for its own refusals. The limit
    comes from the app's `ServeContext`, so every protocol's routes get it without passing it."""
    limit = request.app.state.ctx.config.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if len(raw) <= INLINE_BODY_BYTES:
        return then(body.decode(raw))
    return await asyncio.to_thread(lambda: then(body.decode(raw)))


def _too_large(limit: int) -> RequestError:
    return RequestError(413, f"the request body is larger than {limit:,} bytes, the most this server accepts")


async def collect(gen: Generation, request: Request) -> list[ChoiceEvent | Usage]:
    """A non-streaming generation's items. Starlette does not notice a client leaving before the response starts,
    so this polls for it; when the client is gone it stops the generation (aborting its engine requests) and
    raises `ClientDisconnect`, which the app records as 499 without a traceback.

    The generation runs in a task of its own; stopping it means cancelling that task and waiting for it to end,
    since the generation's own cleanup runs in it (closing the generation from here while the task still iterated
    it was the "aclose(): asynchronous generator is already running" error)."""
    task = asyncio.ensure_future(gen.collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnect()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its cleanup aborts the engine requests; its CancelledError stays there
        elif not task.cancelled():
            task.exception()  # a failure that came as the client left is retrieved (not logged as never retrieved)


def sse_response(events: AsyncGenerator[str, None]) -> StreamingResponse:
    """A `text/event-stream` response of already framed SSE text (`SSEResponse`); when the client leaves, the
    generator's own cleanup (closing its `Generation`) aborts the engine requests."""
    return SSEResponse(events)


class SSEResponse(StreamingResponse):
    """A streaming response that also ends its events itself once the client has left.

    Starlette cancels the body's task when it receives `http.disconnect`, but anyio delivers that cancellation only
    while the task waits on a future that is not done. A stream whose next event is ready each time the delivery
    is tried (the engine emits a token every step, and sends to a gone client return at once) kept generating to
    max_tokens: 1 run in 4 of the chat page's stop test, 12 s of tokens nobody read. So the disconnect the
    response listens for also sets a flag, and the body stops after the event it is sending; closing `events` runs
    their cleanup."""

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        self.client_left = False
        super().__init__(self._until_client_left(events), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _until_client_left(self, events: AsyncGenerator[str, None]) -> AsyncIterator[str]:
        try:
            async for text in events:
                yield text
                if self.client_left:
                    break
        finally:
            await events.aclose()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def watched() -> Any:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client_left = True
            return message

        await super().__call__(scope, watched, send)
