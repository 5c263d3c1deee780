"""What every HTTP route needs, in one object: `ServeContext` (backend, config, metrics, limiter).

Every protocol module (`dsv4.serve.protocols`) handles a generation request the same way; the app has already
checked the API key (`ctx.check_auth`, a RequestError(401) without a valid key when keys are set):

    model = ctx.resolve_model(body.model)          # RequestError(404) for a name the server does not serve
    chat = ChatRequest(model=model, ...)           # the protocol's conversion
    gen = await ctx.start(chat)                    # validates and tokenises in a worker thread (RequestError 4xx:
                                                   # bad input, too long), then takes a queue place (RequestError
                                                   # 429, retry_after)
    # streaming: return the SSE response; inside its body generator
    async for item in gen:                         # KEEPALIVE while queued (every config.keepalive_s),
        ...                                        # then ChoiceEvent ..., then exactly one Usage
    # non-streaming: items = await plumbing.collect(gen, request)   # no KEEPALIVE, just ChoiceEvents and the Usage

`Generation` releases its running slot / queue place and aborts the backend's engine requests when it ends,
when the consumer stops early (`aclose()`, cancellation when the client disconnects) or when it is garbage
collected unstarted. It also records time to first token, inter-token gaps and usage/cost in `ctx.metrics`,
so protocol modules record nothing themselves (HTTP status counts come from the app's middleware).

Errors: everything a route raises as `RequestError` before its response starts is rendered by the app's
exception handler in the error shape of the protocol that owns the route; `QueueFullError` (a `RequestError`
with status 429) adds a `retry-after` header. Once a stream has started, a failure must be sent as the
protocol's error event by the protocol's stream renderer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .metrics import Metrics
from .prices import PriceTable
from .request import ChatBackend, ChatRequest, ChoiceEvent, CompletionRequest, RequestError, Usage


@dataclass
class ServeConfig:
    """Server settings (`dsv4 serve` flags).

    served_model_names: the names clients may put in `model`; the first is the one `/v1/models` lists first.
    api_keys: accepted keys; empty means no authentication. max_concurrent: requests generating at once;
    max_queue: requests waiting for a slot beyond those (a request past it gets 429); max_context: prompt +
    output tokens of one request; max_output_tokens: the default and the cap of `max_tokens`.
    keepalive_s: the interval of keep-alive ticks (`: keep-alive` SSE comments, Anthropic `ping`s) while queued.
    retry_after_s: what a 429 tells the client to wait. max_body_bytes: the largest request body read (a bigger
    one is a 413). signature_key: the HMAC key of Anthropic thinking-block signatures (default: random, so a
    signature verifies only in the process that made it). reasoning_modes: the modes the chat page offers."""

    served_model_names: list[str] = field(default_factory=lambda: ["dsv4"])
    api_keys: list[str] = field(default_factory=list)
    max_concurrent: int = 8
    max_queue: int = 64
    max_context: int = 4096
    max_output_tokens: int = 1024
    prices: PriceTable = field(default_factory=PriceTable)
    keepalive_s: float = 5.0
    retry_after_s: float = 1.0
    max_body_bytes: int = 32 * 2**20
    signature_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    # the reasoning modes the served model was trained for, which the chat page offers (the APIs accept all three)
    reasoning_modes: tuple[str, ...] = ("non-think", "think-high", "think-max")


class QueueFullError(RequestError):
    """429: every running slot is taken and the queue is full. `retry_after` (seconds) becomes the
    `retry-after` header."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(429, message)
        self.retry_after = retry_after


class KeepAlive:
    """The item a `Generation` yields while the request waits in the queue: send a keep-alive (an SSE comment
    `: keep-alive` for OpenAI, an `event: ping` for Anthropic) so clients and proxies keep the connection."""

    def __repr__(self) -> str:
        return "KEEPALIVE"


KEEPALIVE = KeepAlive()


class Limiter:
    """At most `max_running` requests hold a slot; up to `max_queue` more wait in arrival order."""

    def __init__(self, max_running: int, max_queue: int) -> None:
        if max_running < 1 or max_queue < 0:
            raise ValueError(f"need max_running >= 1 and max_queue >= 0, got {max_running}, {max_queue}")
        self.max_running = max_running
        self.max_queue = max_queue
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _grant_next(self) -> None:
        while self._waiters and self.running < self.max_running:
            fut = self._waiters.popleft()
            if not fut.done():
                self.running += 1
                fut.set_result(None)


class Admission:
    """One request's place in the limiter, taken by `ServeContext.admit()` (which raises `QueueFullError` when
    there is no room even in the queue). Either it holds a running slot at once, or it is queued.

    * `async with admission:` waits for the slot (no ticks) and releases it on exit;
    * `async for _ in admission.wait(interval):` yields None every `interval` seconds while still queued and
      ends once the slot is held (send a keep-alive per tick); call `release()` when done;
    * `release()` is idempotent and also leaves the queue; it runs from `__del__` as a last resort, so an
      admission that is dropped unused never leaks a slot.
    """

    def __init__(self, limiter: Limiter, retry_after: float = 1.0) -> None:
        self._limiter = limiter
        self._future: asyncio.Future | None = None
        self._released = True  # until a place is taken (so __del__ of a refused admission gives nothing back)
        if limiter.running < limiter.max_running and not limiter.waiting:
            limiter.running += 1
            self.holding = True
        elif limiter.waiting >= limiter.max_queue:
            raise QueueFullError(f"server busy: {limiter.running} requests running and {limiter.waiting} queued; "
                                 "retry later", retry_after=retry_after)
        else:
            self._future = asyncio.get_running_loop().create_future()
            limiter._waiters.append(self._future)
            self.holding = False
        self._released = False

    async def wait(self, interval: float | None = None) -> AsyncIterator[None]:
        """Yield a tick every `interval` seconds (None: never) until the slot is held."""
        if self.holding:
            return
        assert self._future is not None
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(self._future), interval)
            except asyncio.TimeoutError:
                yield None
                continue
            except BaseException:
                self.release()
                raise
            self.holding = True
            return

    async def acquire(self) -> None:
        async for _ in self.wait(None):
            pass

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        lim = self._limiter
        if self._future is not None and not self.holding:
            if self._future.done() and not self._future.cancelled():
                lim.running -= 1  # granted but never noticed: give the slot back
            else:
                self._future.cancel()
                with contextlib.suppress(ValueError):
                    lim._waiters.remove(self._future)
        else:
            lim.running -= 1
        lim._grant_next()

    async def __aenter__(self) -> Admission:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


class Generation:
    """A validated, admitted-or-queued generation (from `ServeContext.start`): an async iterator of
    `KEEPALIVE` (while queued), then the backend's `ChoiceEvent`s, then one `Usage`. Iterate it once.
    `aclose()` (or cancellation, or garbage collection) aborts the engine requests and frees the slot."""

    def __init__(self, ctx: ServeContext, request: ChatRequest | CompletionRequest,
                 events: AsyncIterator[ChoiceEvent | Usage], admission: Admission) -> None:
        self.ctx = ctx
        self.request = request
        self.usage: Usage | None = None  # set when the Usage item has passed
        self._events = events
        self._admission = admission
        self._timer = ctx.metrics.timer()
        self._iter = self._run()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> KeepAlive | ChoiceEvent | Usage:
        return await self._iter.__anext__()

    async def _run(self) -> AsyncIterator[KeepAlive | ChoiceEvent | Usage]:
        try:
            async for _ in self._admission.wait(self.ctx.config.keepalive_s):
                yield KEEPALIVE
            async for item in self._events:
                if isinstance(item, Usage):
                    self.usage = item
                    self.ctx.metrics.add_usage(self.request.model, item)
                else:
                    self._timer.tick()
                yield item
        finally:
            await self._close_events()
            self._admission.release()

    async def _close_events(self) -> None:
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    async def aclose(self) -> None:
        await self._iter.aclose()
        await self._close_events()
        self._admission.release()

    async def collect(self) -> list[ChoiceEvent | Usage]:
        """Every item but the keep-alives (for non-streaming responses)."""
        try:
            return [item async for item in self if not isinstance(item, KeepAlive)]
        finally:
            await self.aclose()


@dataclass
class ServeContext:
    """The backend, the settings, the metrics and the concurrency limiter shared by every route."""

    backend: ChatBackend
    config: ServeConfig = field(default_factory=ServeConfig)
    metrics: Metrics = field(default_factory=Metrics)
    limiter: Limiter | None = None

    def __post_init__(self) -> None:
        if self.limiter is None:
            self.limiter = Limiter(self.config.max_concurrent, self.config.max_queue)
        lim = self.limiter
        stats = getattr(self.backend, "engine_stats", None)
        self.metrics.set_sources(lambda: lim.waiting, lambda: lim.running, stats)

    # ---------------------------------------------------------------- checks
    def check_auth(self, request) -> None:
        """Raise RequestError(401) unless no keys are configured or the request carries one of them, as
        `Authorization: Bearer KEY` or `x-api-key: KEY` (both accepted on every route, as DeepSeek does).
        `request` is a `fastapi.Request` (anything with a case-insensitive `headers` mapping)."""
        keys = self.config.api_keys
        if not keys:
            return
        offered = []
        auth = request.headers.get("authorization")
        if auth:
            scheme, _, value = auth.partition(" ")
            offered.append(value.strip() if scheme.lower() == "bearer" else auth.strip())
        if request.headers.get("x-api-key"):
            offered.append(request.headers["x-api-key"].strip())
        for key in offered:
            if any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
                return
        raise RequestError(401, "invalid or missing API key (send Authorization: Bearer KEY or x-api-key: KEY)"
                           if offered else "missing API key (send Authorization: Bearer KEY or x-api-key: KEY)")

    def resolve_model(self, name: str) -> str:
        """The served model a request's `model` names, or RequestError(404) naming the served ones. The name
        is returned as given (responses echo it); protocol-specific aliases (e.g. Anthropic's `claude-*`) are
        the protocol module's business: map them to a served name before calling this."""
        names = self.config.served_model_names
        if not isinstance(name, str) or name not in names:
            raise RequestError(404, f"The model {name!r} does not exist; this server serves {', '.join(names)}",
                               param="model")
        return name

    # ---------------------------------------------------------------- admission and generation
    def admit(self) -> Admission:
        """A place in the limiter (a running slot now, or a queue place), or QueueFullError (429 with
        retry-after). Use as `async with ctx.admit():` or with `Admission.wait` ticks (see `Admission`)."""
        return Admission(self.limiter, self.config.retry_after_s)

    async def start(self, request: ChatRequest | CompletionRequest,
                    generate: Callable[[ChatRequest | CompletionRequest], AsyncIterator[ChoiceEvent | Usage]]
                    | None = None) -> Generation:
        """Validate and encode `request` in a worker thread, then take a limiter place (QueueFullError). Nothing
        runs on the engine until the returned `Generation` is iterated and its slot is granted.

        `generate(request)` (default `backend.generate`; legacy completions pass `backend.complete`) validates
        before it returns its async iterator (ChatService and the test stubs do): it raises RequestError for bad
        messages or tools, a prompt past the context, max_tokens out of range..., so every client mistake is a 4xx
        before a stream's 200. It runs in a worker thread because that is where a request's CPU work is
        (rendering and tokenising a prompt of megabytes takes seconds), which must not stop the event loop
        from serving everyone else; it must not need the event loop (the iterator runs on it later)."""
        events = await asyncio.to_thread(generate or self.backend.generate, request)
        return Generation(self, request, events, self.admit())  # an unstarted iterator: dropped on 429, ran nothing


def retry_after_header(err: RequestError) -> dict[str, str]:
    """Headers a 429 carries (`retry-after` in whole seconds, `retry-after-ms` for the OpenAI SDK)."""
    retry = getattr(err, "retry_after", None)
    if retry is None:
        return {}
    return {"retry-after": str(max(1, math.ceil(retry))), "retry-after-ms": str(int(retry * 1000))}
