"""The wire protocols the server speaks, one module each, and the contract between a protocol and the app.

A protocol module owns everything that is particular to its wire format: its routes, its request and response
schemas, the conversion of a request to the shared `ChatRequest` / `CompletionRequest` (`dsv4.serve.request`),
the rendering of the backend's stream (including the error event of a stream that fails after its 200), and its
error body. It exposes all of that as one `WireProtocol` named `PROTOCOL`.

The app (`dsv4.serve.app`) does the rest, the same way for every protocol: it mounts each registered protocol's
router behind the API-key check, counts its requests under the protocol's `family`, and renders every error
raised before a response starts (a `RequestError`, FastAPI's validation and HTTP errors, an unexpected
exception) with the `error_body` of the protocol that owns the route. Routes therefore raise client errors and
never catch them.

Adding a protocol: a module here that builds its `APIRouter` over a `ServeContext` and defines `PROTOCOL`, and one
line in `dsv4.serve.app.PROTOCOLS`.

    openai_common.py        OpenAI wire pieces both OpenAI protocols share (error body, usage, SSE framing)
    openai_chat.py          Chat Completions and the model list
    openai_completions.py   legacy text completions
    anthropic.py            Anthropic Messages and count_tokens
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter

from ..context import ServeContext

ErrorBody = Callable[[int, str, str | None], dict[str, Any]]


@dataclass(frozen=True)
class WireProtocol:
    """One wire protocol, as the app registers it.

    name: unique among the registered protocols. family: the API it belongs to, which is the `protocol` label of
    the request metrics ("openai" for both OpenAI protocols). prefixes: the URL space it claims, for requests that
    match none of its routes (a 404 under `/anthropic/` is answered in Anthropic's shape); the longest claiming
    prefix wins. error_body(status, message, param): its JSON error body. router(ctx): its routes over the
    server's `ServeContext`, built once per app."""

    name: str
    family: str
    prefixes: tuple[str, ...]
    error_body: ErrorBody
    router: Callable[[ServeContext], APIRouter]
