"""What the two OpenAI protocols (Chat Completions, legacy completions) share on the wire: lenient request
schemas and their validation, the error body, the usage object, and the SSE framing of a stream.

Status codes: every malformed body, wrong type, out-of-range value or bad message is 400
`invalid_request_error` (what OpenAI answers and what the SDK's BadRequestError expects; DeepSeek's 422 is not
used), 401 a missing/wrong key, 404 an unknown model or path, 413 a body past the server's limit, 429 a full
queue.

Streams are `data: {json}` events ending with `data: [DONE]`; keep-alives while queued are `: keep-alive`
comments; a failure after the 200 is one `data:` event carrying the error body, then `[DONE]`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..context import Generation, KeepAlive
from ..request import ChoiceEvent, RequestError, Usage

log = logging.getLogger("dsv4.serve")

SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"


# ------------------------------------------------------------------------------------------------ requests
class LenientModel(BaseModel):
    """Unknown keys are allowed: clients send fields of newer API versions and of other servers."""

    model_config = ConfigDict(extra="allow")


class StreamOptions(LenientModel):
    include_usage: bool = False


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


def stop_list(stop: str | list[str] | None) -> list[str]:
    """`stop` as OpenAI accepts it (one string or a list) as a list."""
    return [stop] if isinstance(stop, str) else list(stop or [])


def check_stream_options(stream: bool, options: StreamOptions | None) -> None:
    if options is not None and not stream:
        raise RequestError(400, "stream_options is only allowed with stream: true", param="stream_options")


def include_usage(options: StreamOptions | None) -> bool:
    """Whether a stream ends with a usage chunk (and its other chunks carry `usage: null`)."""
    return bool(options and options.include_usage)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------------ responses
def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`. A 404 about the `model` parameter is
    `model_not_found`, any other 404 (a path no route serves) `not_found`."""
    kind, code = {401: ("authentication_error", "invalid_api_key"),
                  404: ("invalid_request_error", "model_not_found" if param == "model" else "not_found"),
                  413: ("invalid_request_error", "request_too_large"),
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


async def event_stream(gen: Generation, render: Callable[[ChoiceEvent | Usage], str]) -> AsyncIterator[str]:
    """The SSE text of a streamed generation: `render(item)` for each item (it may render nothing), a comment per
    keep-alive, then `[DONE]`. A failure after the 200 becomes an error event before `[DONE]`; the generation is
    closed on every exit (a client leaving cancels this generator, which aborts the engine requests)."""
    try:
        async for item in gen:
            text = SSE_KEEPALIVE if isinstance(item, KeepAlive) else render(item)
            if text:
                yield text
    except RequestError as err:
        yield sse(error_body(err.status, err.message, err.param))
    except Exception as err:  # a failure mid-stream: the protocol's error event, then the end
        log.exception("stream failed")
        yield sse(error_body(500, f"generation failed: {type(err).__name__}: {err}"))
    finally:
        await gen.aclose()
    yield SSE_DONE
