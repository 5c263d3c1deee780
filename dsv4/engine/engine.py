"""The engine core: continuous batching with chunked prefill over one caller-owned `Cache`, in token ids.

`Engine` owns a `Cache` of `max_batch` rows ("slots"); each running request holds one slot. Per `step()`:

1. admission: waiting requests take free slots first-come-first-served (the slot's cache row is reset);
2. every request whose prompt is fully prefilled decodes one token (running decodes always proceed);
3. the rest of the per-step token budget (`prefill_chunk` minus the decode tokens) goes to chunked prefill of
   the slotted requests whose prompts are not finished, in arrival order; so a long prompt delays running
   decodes by at most one chunk's worth of compute per step and never stops them;
4. one batched model call over all slots: each row gets its decode token or its prefill chunk, right-padded,
   with `lengths` per row (rows without work get length 0 and are left untouched);
5. the sampler runs on the rows whose prompt is complete (decodes, and prefills that just finished), and
   requests that stopped (stop id / EOS: "stop", `max_tokens`: "length") free their slot.

No preemption in this version: a request keeps its slot until it finishes or is aborted, and admission only
waits for a free slot (prompt + max_tokens <= max_seq_len is checked at `add_request`, so an admitted request
always fits its cache row). When the decode tokens alone reach `prefill_chunk`, prefill waits for decodes to
finish (bounded by their `max_tokens`).

`AsyncEngine` wraps an `Engine` for asyncio: `generate(prompt_ids, params)` is an async iterator of the
request's updates, the step loop runs as a background task, and a consumer that stops (cancellation,
`aclose`, leaving the loop early) aborts its request.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..model import Transformer
from .sampling import Sampler, SamplingParams, SequenceState, TokenLogprobs


@dataclass
class RequestOutput:
    """One step's news about one request: the tokens it generated this step (one, or none for a final
    "abort" update), their logprobs (None entries unless the request asked for logprobs), and whether it
    finished ("stop", "length" or "abort")."""

    request_id: int
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    generated_tokens: int  # total generated so far, this step's tokens included


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    state: SequenceState
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    pending: list[int] = field(default_factory=list)  # sampled tokens not yet fed to the model

    @property
    def prompt_done(self) -> bool:
        return self.prefilled == len(self.prompt)


class Engine:
    """Continuous batching over `max_batch` cache slots; see the module docstring for the schedule.

    `prefill_chunk` is the per-step token budget (decode tokens count against it; prefill gets the rest).
    `max_seq_len` bounds prompt + max_tokens per request (default: the model's). `eos_id` ends every request
    (unless its params say `ignore_eos`); `seed` seeds the sampler-wide generator that requests without their
    own `seed` share."""

    def __init__(self, model: Transformer, max_batch: int = 8, max_seq_len: int | None = None,
                 prefill_chunk: int = 64, eos_id: int | None = None, seed: int | None = None) -> None:
        max_seq_len = max_seq_len or model.args.max_seq_len
        if max_batch < 1 or max_seq_len < 2 or prefill_chunk < 1:
            raise ValueError(f"Engine needs max_batch >= 1, max_seq_len >= 2 and prefill_chunk >= 1, got "
                             f"{max_batch}, {max_seq_len}, {prefill_chunk}")
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.device = model.embed.weight.device
        self.cache = model.new_cache(max_batch, max_seq_len)
        self.sampler = Sampler(eos_id=eos_id, seed=seed)
        self._ids = itertools.count()
        self._waiting: list[_Request] = []  # arrival order, no slot yet
        self._running: list[_Request] = []  # arrival order, holding a slot
        self._slots: list[_Request | None] = [None] * max_batch

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. Raises ValueError for an empty prompt, ids outside the vocabulary
        or prompt + max_tokens beyond `max_seq_len`."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        vocab = self.model.args.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"engine's max_seq_len {self.max_seq_len}")
        req = _Request(next(self._ids), prompt, params, SequenceState(prompt))
        self._waiting.append(req)
        return req.id

    def abort(self, request_id: int) -> RequestOutput | None:
        """Drop a request (waiting, mid-prefill or decoding); its slot is free at once. Returns its final
        "abort" update, or None if the id is unknown or already finished."""
        for queue in (self._waiting, self._running):
            for req in queue:
                if req.id == request_id:
                    queue.remove(req)
                    self._free(req)
                    return RequestOutput(req.id, [], [], True, "abort", len(req.prompt), len(req.state.output_ids))
        return None

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_free_slots(self) -> int:
        return sum(s is None for s in self._slots)

    def slot_of(self, request_id: int) -> int | None:
        for req in self._running:
            if req.id == request_id:
                return req.slot
        return None

    def _free(self, req: _Request) -> None:
        if req.slot is not None:
            self._slots[req.slot] = None
            self.cache.reset([req.slot])
            req.slot = None

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit, schedule, run one batched model call, sample; returns one update per request that generated
        a token this step (requests still prefilling produce none)."""
        while self._waiting and None in self._slots:  # first-come-first-served admission
            req = self._waiting.pop(0)
            req.slot = self._slots.index(None)
            self._slots[req.slot] = req
            self.cache.reset([req.slot])
            self._running.append(req)

        work: dict[int, list[int]] = {}  # slot -> tokens fed this step
        decoding = [r for r in self._running if r.prompt_done]
        for req in decoding:
            work[req.slot] = req.pending[-1:]
        budget = self.prefill_chunk - len(decoding)
        for req in self._running:
            if budget <= 0:
                break
            if not req.prompt_done:
                n = min(budget, len(req.prompt) - req.prefilled)
                work[req.slot] = req.prompt[req.prefilled:req.prefilled + n]
                req.prefilled += n
                budget -= n
        if not work:
            return []

        width = max(len(t) for t in work.values())
        tokens = torch.zeros(self.max_batch, width, dtype=torch.long)
        lengths = torch.zeros(self.max_batch, dtype=torch.long)
        for slot, toks in work.items():
            tokens[slot, :len(toks)] = torch.tensor(toks)
            lengths[slot] = len(toks)
        tokens, lengths = tokens.to(self.device), lengths.to(self.device)
        logits = self.model(tokens, self.cache, lengths=lengths)  # [max_batch, width, V]

        ready = [r for r in self._running if r.prompt_done and r.slot in work]  # sample these
        if not ready:
            return []
        slots = torch.tensor([r.slot for r in ready], device=self.device)
        last = logits[slots, lengths[slots] - 1]
        out = self.sampler.sample(last, [r.params for r in ready], [r.state for r in ready])
        updates = []
        for req, tok, reason, lp in zip(ready, out.token_ids, out.finish_reasons, out.logprobs, strict=True):
            req.pending = [tok]
            updates.append(RequestOutput(req.id, [tok], [lp], reason is not None, reason, len(req.prompt),
                                         len(req.state.output_ids)))
            if reason is not None:
                self._running.remove(req)
                self._free(req)
        return updates


class AsyncEngine:
    """Runs an `Engine`'s step loop as an asyncio background task (on the event loop's thread, yielding to
    other tasks between steps) and streams each request's updates to its consumer.

    Use from one event loop; the loop task starts on the first `generate` and sleeps while there is no work."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[int, asyncio.Queue] = {}
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> RequestStream:
        """Queue a request (invalid input raises ValueError here) and return the async iterator of its updates,
        which ends after the one that says `finished`. Use it inside a running event loop."""
        rid = self.engine.add_request(prompt_ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        self._ensure_loop()
        return RequestStream(self, rid, queue)

    def abort(self, request_id: int) -> None:
        """Abort from outside the consumer: the engine drops it and its stream ends with an "abort" update."""
        final = self.engine.abort(request_id)
        queue = self._queues.get(request_id)
        if final is not None and queue is not None:
            queue.put_nowait(final)

    def _ensure_loop(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        assert self._wake is not None
        try:
            while True:
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                for update in self.engine.step():
                    queue = self._queues.get(update.request_id)
                    if queue is not None:
                        queue.put_nowait(update)
                await asyncio.sleep(0)
        except Exception as exc:  # hand the failure to every consumer (and drop its request) rather than hang them
            for rid, queue in list(self._queues.items()):
                self.engine.abort(rid)
                queue.put_nowait(exc)

    async def close(self) -> None:
        """Stop the background task (pending requests stay in the engine)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


class RequestStream:
    """One request's updates as an async iterator (`async for update in stream`). A consumer that stops before
    the request finished aborts it: cancellation while waiting for an update, an exception or cancellation in
    the loop body once the stream is dropped, `close()` / `aclose()`, or leaving `async with stream:`."""

    def __init__(self, owner: AsyncEngine, request_id: int, queue: asyncio.Queue) -> None:
        self.request_id = request_id
        self._owner = owner
        self._queue = queue
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:
            self.close()
            raise
        if isinstance(item, BaseException):
            self._finish()
            raise item
        if item.finished:
            self._finish()
        return item

    def _finish(self) -> None:
        self._done = True
        self._owner._queues.pop(self.request_id, None)

    def close(self) -> None:
        """Abort the request unless it already finished."""
        if not self._done:
            self._finish()
            self._owner.engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
