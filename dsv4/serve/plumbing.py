"""The HTTP plumbing every protocol's routes share, so no protocol module carries its own copy: the one JSON body
reader, the non-streaming wait that aborts the generation when the client leaves, and the SSE response.

It lives apart from `app.py` because the protocol modules use it and `app.py` imports the protocol modules (to
register them); the app applies the rest of the shared plumbing (API keys, error bodies, metrics) itself.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from .context import Generation
from .request import ChoiceEvent, RequestError, Usage

# no-cache: nothing may replay a stream; x-accel-buffering: nginx must pass the events through as they come
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def read_json(request: Request) -> Any:
    """The request body as JSON, or RequestError(400) for a body that is not JSON (also for bad UTF-8 or a number
    past Python's digit limit, which `json` reports as ValueErrors too)."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as err:
        raise RequestError(400, f"the request body is not valid JSON: {err}") from None


async def collect(gen: Generation, request: Request) -> list[ChoiceEvent | Usage]:
    """A non-streaming generation's items; aborts it (and raises CancelledError) if the client goes away, which
    Starlette does not notice by itself before the response starts."""
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


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A `text/event-stream` response of already framed SSE text. Starlette cancels `events` when the client
    disconnects, so the generator's own cleanup (closing its `Generation`) aborts the engine requests."""
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
