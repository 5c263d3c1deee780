"""The FastAPI application: the registry of wire protocols and the plumbing they share.

The routes of each protocol come from its module in `dsv4.serve.protocols`, registered in `PROTOCOLS`:

    POST /v1/chat/completions, /chat/completions     chat, stream or not                     (openai_chat)
    GET  /v1/models, /models, /v1/models/{id}, /models/{id}                                  (openai_chat)
    POST /v1/completions, /completions               legacy text completions, no template   (openai_completions)
    POST /v1/messages, /v1/messages/count_tokens     Anthropic Messages, also under /anthropic (anthropic)

The app adds what is the same for every protocol:
* the API key: every protocol route accepts `Authorization: Bearer` or `x-api-key` (checked before the route
  runs, so no protocol can forget it); `/health` and `/metrics` need no key, they are for probes and scrapers,
  nor do the chat page `/` and its assets under `/ui/` (`dsv4.serve.ui`), which must load to ask for a key;
* errors: a `RequestError` (the body reader's 400s and 413s among them), a FastAPI validation or HTTP error
  (404, 405) or an unexpected exception raised before a response starts is rendered by the exception handlers
  here, with the error body of the protocol that owns the request (`Registry.owner`: the protocol whose route
  matched, else the one claiming the longest prefix of the path, else the first registered one); a failure after
  a stream started is the protocol's own SSE error event;
* the access log and the request counter by protocol family and status (`AccessLog`), `GET /health` (200
  `{"status": "ok"}`), `GET /metrics` (Prometheus text) and the chat page (`GET /`, `dsv4.serve.ui`).

Client disconnects are not errors. Non-streaming requests poll for a disconnect and abort their generation when the
client is gone (raising Starlette's `ClientDisconnect`, as its body reader does when a client leaves mid-upload);
streaming ones are cancelled by Starlette, and their body also ends itself at the next event (`SSEResponse`: that
cancellation can miss a stream whose next event is always ready); either closes the `Generation` (engine abort).
Either way the request is logged as `client disconnected` and counted with status 499 (nginx's "client closed
request": not a 5xx, and distinct from the 4xx of a client mistake), with no traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.params import Depends as Dependency
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute

from .context import ServeContext, retry_after_header
from .protocols import WireProtocol, anthropic, openai_chat, openai_completions
from .request import RequestError
from .ui import install_ui

log = logging.getLogger("dsv4.serve.access")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client left before its response ended

PROTOCOLS: tuple[WireProtocol, ...] = (
    openai_chat.PROTOCOL,  # first: its error shape is the server's default (unknown paths, /health, /metrics)
    openai_completions.PROTOCOL,
    anthropic.PROTOCOL,
)


class Registry:
    """The protocols one app serves, their routes, and which protocol owns a request."""

    def __init__(self, protocols: Sequence[WireProtocol]) -> None:
        names = [p.name for p in protocols]
        if not protocols or len(set(names)) != len(names):
            raise ValueError(f"need at least one protocol and unique names, got {names}")
        self.protocols = tuple(protocols)
        self.routes: dict[str, list[BaseRoute]] = {}  # protocol name -> its routes
        self._by_endpoint: dict[Callable[..., Any], WireProtocol] = {}

    def install(self, app: FastAPI, ctx: ServeContext, dependencies: Sequence[Dependency]) -> None:
        """Mount every protocol's router on `app`, each route behind `dependencies` (the API-key check)."""
        for proto in self.protocols:
            router = proto.router(ctx)
            self.routes[proto.name] = list(router.routes)
            for route in router.routes:
                self._by_endpoint[route.endpoint] = proto
            app.include_router(router, dependencies=list(dependencies))

    def owner(self, scope: dict[str, Any]) -> WireProtocol | None:
        """The protocol a request belongs to: the owner of the route that matched (also for a 405), else, when no
        route matched (a 404), the protocol claiming the longest prefix of the path; None for the app's own
        routes and for paths no protocol claims."""
        route = scope.get("route")
        if route is not None:
            return self._by_endpoint.get(getattr(route, "endpoint", None))
        path = scope.get("path", "")
        claims = [(len(prefix), proto) for proto in self.protocols for prefix in proto.prefixes
                  if path.startswith(prefix)]
        return max(claims, key=lambda claim: claim[0])[1] if claims else None

    def error_response(self, request: Request, status: int, message: str, param: str | None = None,
                       headers: dict[str, str] | None = None) -> JSONResponse:
        """The error body of the protocol owning `request` (the first protocol's when none does)."""
        proto = self.owner(request.scope) or self.protocols[0]
        return JSONResponse(proto.error_body(status, message, param), status_code=status, headers=headers)

    def family(self, scope: dict[str, Any]) -> str:
        """The `protocol` label of a request in the metrics: its owner's family, or "other"."""
        proto = self.owner(scope)
        return proto.family if proto is not None else "other"


class AccessLog:
    """Pure ASGI middleware (a BaseHTTPMiddleware would buffer streams and hide disconnects): one log line per
    HTTP request when its response ends (a stream: when the stream ends) and the request counter by protocol
    family and status. It reads the owner after the request ran, once the router has put the matched route in the
    scope. A request whose client left before the response ended (the app received `http.disconnect` first) is
    recorded as 499 and logged as `client disconnected`, whatever status was sent or attempted."""

    def __init__(self, app: Any, ctx: ServeContext, registry: Registry) -> None:
        self.app, self.ctx, self.registry = app, ctx, registry

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [500]
        ended, left = [False], [False]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended[0] = True
            await send(message)

        async def receive_disconnect() -> dict:
            message = await receive()
            if message["type"] == "http.disconnect" and not ended[0]:
                left[0] = True
            return message

        try:
            await self.app(scope, receive_disconnect, send_status)
        finally:
            code = CLIENT_CLOSED_REQUEST if left[0] else status[0]
            self.ctx.metrics.observe_request(self.registry.family(scope), code)
            client = scope.get("client") or ("-", 0)
            log.info('%s "%s %s" %d %.1fms%s', client[0], scope.get("method", "-"), scope.get("path", ""), code,
                     (time.monotonic() - start) * 1000, " client disconnected" if left[0] else "")


def create_app(ctx: ServeContext, *, protocols: Sequence[WireProtocol] = PROTOCOLS) -> FastAPI:
    """The server over `ctx`, speaking `protocols` (the registered ones unless a test brings its own)."""
    # no /docs or /redoc: FastAPI's pages load their scripts and styles from a CDN, which an offline machine cannot
    # reach (and a served page must not fetch from outside); the schema itself stays at /openapi.json
    app = FastAPI(title="dsv4", description="DeepSeek-V4 server: OpenAI and Anthropic protocols", docs_url=None,
                  redoc_url=None)
    registry = Registry(protocols)
    app.state.ctx, app.state.protocols = ctx, registry

    # ---------------------------------------------------------------- errors, in the owning protocol's shape
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> JSONResponse:
        return registry.error_response(request, err.status, err.message, err.param, retry_after_header(err))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return registry.error_response(request, 400, f"{where}: {first.get('msg')}" if where else first.get("msg"),
                                       where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = f"Invalid URL ({request.method} {request.url.path})" if err.status_code == 404 else str(err.detail)
        return registry.error_response(request, err.status_code, message, headers=err.headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, err: ClientDisconnect) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; the access log records the 499

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception) -> JSONResponse:
        logging.getLogger("dsv4.serve").exception("internal error on %s", request.url.path)
        return registry.error_response(request, 500, f"internal server error: {type(err).__name__}")

    # ---------------------------------------------------------------- operations
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    install_ui(app, ctx)  # the chat page: `/` and `/ui/...`, no key (the page must load to ask for one)

    # ---------------------------------------------------------------- the protocols, behind the API key
    async def check_api_key(request: Request) -> None:
        ctx.check_auth(request)

    registry.install(app, ctx, [Depends(check_api_key)])
    app.add_middleware(AccessLog, ctx=ctx, registry=registry)
    return app
