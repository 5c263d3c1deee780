"""The engine core: continuous batching with chunked prefill, a paged hybrid KV cache with a byte budget,
preemption by recompute and a prefix cache, in token ids.

`Engine` owns a `KVCacheManager` (`max_batch` sequence slots of fixed state plus a pool of pages for the
compressed entries; see `dsv4.engine.kv_cache`). Every request is a token list (prompt, then its sampled
tokens) of which the cache holds the first `computed`; it needs a forward for the rest. Per `step()`:

1. admission, first come first served: the oldest waiting request takes a free slot if the pool has the pages
   its tokens need (after evicting least-recently-used prefix-cache entries); with the prefix cache it first
   resumes from the longest saved prefix of its tokens;
2. scheduling under a per-step token budget (`prefill_chunk`): every request with one token left (a decode)
   gets it, and the rest of the budget goes to chunked prefill in arrival order, so a long prompt delays
   running decodes by at most one chunk's compute per step and never stops them;
3. memory: each scheduled request gets the pages its chunk needs, oldest first; when the pool is empty the
   prefix cache gives pages back, and then the most recently arrived running request is preempted (its slot
   and pages freed; it waits at its arrival position and later recomputes its prompt and output, which gives
   the same cache, so its continuation is unchanged);
4. one batched model call over the scheduled requests only (one batch row each, through `Cache.select` of
   their slots; idle slots cost nothing); the head runs only at each row's last position (and at every prompt
   position of a request asking for prompt logprobs);
5. the sampler runs on the requests whose tokens are all in the cache; stop id / EOS ("stop") or `max_tokens`
   ("length") end a request and free its slot and pages at once, as does `abort` at any time.

With the prefix cache on, the state is saved at the end of each prompt, at the end of each output and every
`prefix_interval` prompt tokens (chunks are cut there), and each request reports how many prompt tokens it
took from the cache. A prompt whose whole token list is saved samples from the saved logits without a forward.

A request with `prompt_logprobs` (vLLM's prompt logprobs) runs the head on every prompt position of its prefill
chunks, not only the last, and scores each prompt token against the logits before it (`_score_prompt`); its first
update carries them. It never resumes from the prefix cache, whose states keep only the last position's logits
(vLLM skips the lookup for such requests too), but saves its states for others as usual. With `max_tokens = 0` it
finishes right after its prefill ("length"): the request evaluation harnesses send to score a text.

With `num_speculative = k` > 0 every decode step is an MTP speculative step (architecture §3.9): the MTP block
drafts k tokens per decoding request (`_draft`), the main model scores the pending token and the drafts in the
same batched call as the prefill chunks, `verify_drafts` accepts the longest agreeing prefix (greedy) or runs
standard speculative sampling, and `Cache.rollback` restores the rejected drafts' ring slots and compressor
tails exactly; the MTP call that feeds the accepted tokens also takes the emitted one and drafts the next step's
first token. The MTP cache runs one token behind the main cache (the last token's final streams wait in
`hidden` for their successor) whenever a state is saved, so its contents, like the main cache's, depend only on
the token prefix; hence prefix saves and preemption work unchanged. Greedy output is token for token the plain
greedy sequence.

With `decode_graphs` a step whose every row is a plain decode (no prefill chunk, no drafts, no prompt logprobs)
runs as a CUDA graph of its batch and context bucket (`dsv4.engine.graphs`), padded with rows on the cache's spare
slot; its greedy tokens are the eager step's.

`AsyncEngine` wraps an `Engine` for asyncio: `generate(prompt_ids, params)` is an async iterator of the
request's updates, the step loop runs as a background task, and a consumer that stops (cancellation,
`aclose`, leaving the loop early) aborts its request.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from ..model import Transformer
from ..model.cache import CacheRows
from .graphs import DecodeGraphs, uncapturable
from .kv_cache import CacheFullError, KVCacheManager
from .prefix_cache import PrefixCache
from .sampling import Sampler, SamplingParams, SequenceState, TokenLogprobs, token_logprobs
from .speculative import draft_tokens, verify_drafts


@dataclass
class RequestOutput:
    """One step's news about one request: the tokens it generated this step (one, or none for a final
    "abort" update or a prompt-only request's only update), their logprobs (None entries unless the request
    asked for logprobs), and whether it finished ("stop", "length" or "abort"). A request that asked for prompt
    logprobs gets them in its first update, one per prompt token (the first one's logprob is None)."""

    request_id: int
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    generated_tokens: int  # total generated so far, this step's tokens included
    cached_tokens: int = 0  # prompt tokens resumed from the prefix cache
    prompt_logprobs: list[TokenLogprobs] | None = None


@dataclass
class EngineStats:
    running: int
    waiting: int
    pages_used: int
    pages_total: int
    kv_bytes: int  # everything the KV cache allocated (slot states and pages)
    kv_bytes_used: int  # slot states of running requests and pages in use
    preemptions: int
    prefix_entries: int
    prefix_bytes: int
    prefix_lookups: int
    prefix_hits: int
    prefix_hit_tokens: int
    drafted: int  # MTP draft tokens proposed
    accepted: int  # ... and accepted by the main model
    kv_format: str = "model"  # the KV rows' storage format (`dsv4.kv_formats`)
    page_bytes: int = 0  # bytes of one KV page over every layer (MTP layers included)
    slot_bytes: int = 0  # bytes of one sequence slot's fixed state (window rings, compressor tails)
    kernel_backend: str = "reference"  # the kernel backend the model runs on

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass(eq=False)
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    state: SequenceState
    slot: int | None = None
    computed: int = 0  # leading tokens (prompt, then output) the cache holds
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied at first admission
    admitted: bool = False
    ready: Tensor | None = None  # saved logits to sample from without a forward (a whole-token prefix hit)
    hidden: Tensor | None = None  # [hc, dim] final streams of the last cached token, the MTP block's next input
    # after a speculative step the MTP block has already consumed (hidden, pending token): its output streams
    # [hc, dim] and logits [vocab] for the next step's first draft
    drafted: tuple[Tensor, Tensor] | None = None
    # asked for and not delivered yet: the prompt tokens scored so far (kept across a preemption)
    prompt_logprobs: list[TokenLogprobs] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.state.output_ids)

    @property
    def remaining(self) -> int:
        return self.num_tokens - self.computed

    def token_slice(self, lo: int, hi: int) -> list[int]:
        n = len(self.prompt)
        return self.prompt[lo:hi] if hi <= n else (self.prompt + self.state.output_ids)[lo:hi]


class Engine:
    """Continuous batching over `max_batch` slots of a paged KV cache; see the module docstring.

    `prefill_chunk` is the per-step token budget (decode tokens count against it; prefill gets the rest).
    `max_seq_len` bounds prompt + max_tokens per request (default: the model's). `eos_id` ends every request
    (unless its params say `ignore_eos`); `seed` seeds the sampler-wide generator that requests without their
    own `seed` share. KV cache: `kv_format` ("model", "bf16" or "fp8"), its size as `kv_budget_bytes` or
    `num_pages` (default: room for every slot at `max_seq_len`), `page_tokens` per page. Prefix cache:
    `prefix_cache_bytes` > 0 turns it on, `prefix_interval` saves long prompts every that many tokens.
    `kernel_backend`: the `dsv4.kernels` backend every model call of a step runs on (None: the process default,
    $DSV4_KERNEL_BACKEND or "reference"). `decode_graphs`: run plain decode steps as CUDA graphs, one per bucket of
    batch size and context (`dsv4.engine.graphs`; on a CPU the same static steps run uncaptured)."""

    def __init__(self, model: Transformer, max_batch: int = 8, max_seq_len: int | None = None,
                 prefill_chunk: int = 64, eos_id: int | None = None, seed: int | None = None, *,
                 kv_format: str = "model", kv_budget_bytes: int | None = None, num_pages: int | None = None,
                 page_tokens: int | None = None, prefix_cache_bytes: int = 0,
                 prefix_interval: int | None = None, num_speculative: int = 0,
                 kernel_backend: str | None = None, decode_graphs: bool = False) -> None:
        max_seq_len = max_seq_len or model.args.max_seq_len
        if max_batch < 1 or max_seq_len < 2 or prefill_chunk < 1:
            raise ValueError(f"Engine needs max_batch >= 1, max_seq_len >= 2 and prefill_chunk >= 1, got "
                             f"{max_batch}, {max_seq_len}, {prefill_chunk}")
        if prefix_cache_bytes < 0 or (prefix_interval is not None and prefix_interval < 1):
            raise ValueError("prefix_cache_bytes must be >= 0 and prefix_interval >= 1")
        if num_speculative < 0 or (num_speculative and not model.args.n_mtp_layers):
            raise ValueError(f"num_speculative={num_speculative}: needs >= 0, and a model with an MTP block to draft")
        self.kernel_backend = kernels.resolve_backend_name(kernel_backend or kernels.default_backend_name(),
                                                           model.embed.weight.device)
        self.kernels = kernels.get_backend(self.kernel_backend)  # an unknown name: ValueError naming the choices
        if decode_graphs and num_speculative:
            raise ValueError("decode_graphs captures plain decode steps; with num_speculative > 0 every decode step "
                             "is a speculative one")
        if decode_graphs and model.embed.weight.device.type == "cuda":
            with torch.inference_mode():
                reason = uncapturable(model, self.kernels)
            if reason is not None:
                raise ValueError(f"decode_graphs: a decode step cannot be captured in a CUDA graph: {reason}")
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.device = model.embed.weight.device
        self.k = num_speculative
        # a verify step appends k + 1 tokens, which may run k past a request's last kept token
        self.kv = KVCacheManager(model, max_batch, max_seq_len + self.k, kv_format, kv_budget_bytes, num_pages,
                                 page_tokens, mtp=self.k > 0, spare=decode_graphs)
        self.cache = self.kv.cache
        self.graphs = DecodeGraphs(model, self.cache, self.kv.spare_slot, max_batch, self.kv.page_tokens) \
            if decode_graphs else None
        if self.k and self.k + 1 > self.cache.ring_limit():
            raise ValueError(f"num_speculative={self.k}: a verify step of k + 1 tokens must fit the smallest cache "
                             f"ring ({self.cache.ring_limit()})")
        self.drafted = self.accepted = 0
        self.prefix = PrefixCache(self.kv, prefix_cache_bytes) if prefix_cache_bytes else None
        self.prefix_interval = prefix_interval
        self.sampler = Sampler(eos_id=eos_id, seed=seed)
        self.preemptions = 0
        self._step_rows: dict[tuple[int, ...], CacheRows] = {}  # `_rows` views made this step, by slots
        self._ids = itertools.count()
        self._waiting: list[_Request] = []  # by id (= arrival), no slot
        self._running: list[_Request] = []  # by id, holding a slot
        self._slots: list[_Request | None] = [None] * max_batch

    # ------------------------------------------------------------------ requests
    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None
                      ) -> tuple[list[int], SamplingParams]:
        """Validate a request without queuing it (a server calls this before it answers 200): ValueError for an
        empty prompt, ids outside the vocabulary, prompt + max_tokens beyond `max_seq_len` or more pages than
        the whole pool. Returns the prompt as a list and the params (defaults filled in)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        vocab = self.model.args.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        total = len(prompt) + params.max_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"engine's max_seq_len {self.max_seq_len}")
        pages = self.kv.pages_for(total + self.k)  # a verify step may hold k tokens past the last kept one
        if pages > self.kv.num_pages:
            raise ValueError(f"prompt + max_tokens ({total} tokens) needs {pages} KV pages; "
                             f"the pool has {self.kv.num_pages}")
        return prompt, params

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. Raises ValueError as `check_request` does."""
        prompt, params = self.check_request(prompt_ids, params)
        req = _Request(next(self._ids), prompt, params, SequenceState(prompt))
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [TokenLogprobs(prompt[0], None, [])]
        self._waiting.append(req)
        return req.id

    def abort(self, request_id: int) -> RequestOutput | None:
        """Drop a request (waiting, mid-prefill or decoding); its slot and pages are free at once. Returns its
        final "abort" update, or None if the id is unknown or already finished."""
        for queue in (self._waiting, self._running):
            for req in queue:
                if req.id == request_id:
                    queue.remove(req)
                    self._free(req)
                    return self._output(req, [], [], "abort")
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

    def stats(self) -> EngineStats:
        kv, lay = self.kv, self.kv.layout
        used_pages = kv.num_pages - kv.pool.free
        p = self.prefix
        prefix = (p.num_entries, p.nbytes, p.lookups, p.hits, p.hit_tokens) if p is not None else (0,) * 5
        return EngineStats(
            running=len(self._running), waiting=len(self._waiting), pages_used=used_pages,
            pages_total=kv.num_pages, kv_bytes=kv.total_bytes,
            kv_bytes_used=(len(self._running) * (lay.state_bytes + lay.mtp_state_bytes)
                           + used_pages * (lay.page_bytes + lay.mtp_page_bytes)),
            preemptions=self.preemptions, prefix_entries=prefix[0], prefix_bytes=prefix[1],
            prefix_lookups=prefix[2], prefix_hits=prefix[3], prefix_hit_tokens=prefix[4],
            drafted=self.drafted, accepted=self.accepted, kv_format=kv.kv_format,
            page_bytes=lay.page_bytes + lay.mtp_page_bytes, slot_bytes=lay.state_bytes + lay.mtp_state_bytes,
            kernel_backend=self.kernel_backend)

    def _output(self, req: _Request, tokens: list[int], logprobs: list, reason: str | None) -> RequestOutput:
        return RequestOutput(req.id, tokens, logprobs, reason is not None, reason, len(req.prompt),
                             len(req.state.output_ids), req.cached_tokens)

    def _free(self, req: _Request) -> None:
        if req.slot is not None:
            self._slots[req.slot] = None
            self.kv.release(req.slot)
            req.slot = None
        req.computed, req.ready, req.hidden, req.drafted = 0, None, None, None

    def _preempt(self, req: _Request) -> None:
        """Free a running request's memory; it waits at its arrival position and recomputes later."""
        self._running.remove(req)
        self._free(req)
        bisect.insort(self._waiting, req, key=lambda r: r.id)
        self.preemptions += 1

    # ------------------------------------------------------------------ admission
    def _admit(self) -> None:
        while self._waiting and None in self._slots:
            req = self._waiting[0]
            tokens = req.token_slice(0, req.num_tokens)
            # a request still scoring its prompt needs the logits of every prompt position: no saved state has them
            hit = self.prefix.lookup(tokens) if self.prefix is not None and req.prompt_logprobs is None else None
            shared = len(hit.state.pages) if hit else 0
            need = self.kv.pages_for(req.num_tokens) - shared
            while need > self.kv.pool.free and self.prefix is not None and self.prefix.num_entries > (hit is not None):
                self.prefix.evict_one()  # the hit is most recently used, so it goes last
            if need > self.kv.pool.free:
                if self._running:
                    return  # wait for memory (first come first served: nobody overtakes)
                if self.prefix is not None:  # alone and still short: only the prefix cache holds pages
                    self.prefix.clear()
                hit, need = None, self.kv.pages_for(req.num_tokens)
            self._waiting.pop(0)
            req.slot = self._slots.index(None)
            self._slots[req.slot] = req
            bisect.insort(self._running, req, key=lambda r: r.id)
            if hit is not None:
                self.kv.load(req.slot, hit.state)
                req.computed = len(hit.tokens)
                req.hidden = hit.hidden
                if req.computed == req.num_tokens:
                    req.ready = hit.logits
            if not req.admitted:
                req.admitted = True
                req.cached_tokens = min(req.computed, len(req.prompt))

    # ------------------------------------------------------------------ the step
    def _schedule(self) -> dict[_Request, int]:
        plan: dict[_Request, int] = {}
        waiting_for_forward = [r for r in self._running if r.ready is None]
        for req in waiting_for_forward:
            if req.remaining == 1:
                plan[req] = 1 + self.k  # the pending token, then k drafts to verify
        budget = self.prefill_chunk - sum(plan.values())
        for req in waiting_for_forward:
            if budget <= 0:
                break
            if req.remaining > 1:
                n = min(budget, req.remaining)
                if self.prefix is not None and self.prefix_interval:  # end chunks where a long prompt is saved
                    boundary = (req.computed // self.prefix_interval + 1) * self.prefix_interval
                    if req.computed + n > boundary and boundary < len(req.prompt):
                        n = boundary - req.computed
                plan[req] = n
                budget -= n
        return plan

    def _reserve(self, plan: dict[_Request, int]) -> None:
        """Pages for every scheduled chunk, oldest request first; evict prefix entries, then preempt."""
        for req in sorted(plan, key=lambda r: r.id):
            if req not in plan:
                continue  # preempted for an older request
            end = req.computed + plan[req]
            if self.graphs is not None and self.kv.min_ratio:  # a static step writes the unfinished entry too:
                # its page, there once the tokens reach the end of the smallest ratio's block
                end = min(-(-end // self.kv.min_ratio) * self.kv.min_ratio, self.kv.max_seq_len)
            while True:
                try:
                    self.kv.ensure(req.slot, end)
                    break
                except CacheFullError:
                    if self.prefix is not None and self.prefix.evict_one():
                        continue
                    victim = self._running[-1]  # the most recent arrival (possibly req itself)
                    plan.pop(victim, None)
                    self._preempt(victim)
                    if victim is req:
                        break

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit, schedule, run one batched model call, sample; returns one update per request that generated
        tokens this step (requests still prefilling produce none)."""
        with kernels.use_backend(self.kernels):
            return self._step()

    def _step(self) -> list[RequestOutput]:
        self._step_rows.clear()
        self._admit()
        plan = self._schedule()
        self._reserve(plan)
        # (request, new tokens, their logprobs, finish reason, the logits after its last cached token)
        sampled: list[tuple[_Request, list[int], list, str | None, Tensor]] = []
        to_sample: list[tuple[_Request, Tensor]] = [(r, r.ready) for r in self._running if r.ready is not None]
        if plan:
            sampled += self._forward(plan, to_sample)
        if to_sample:
            to_sample.sort(key=lambda item: item[0].id)
            reqs = [r for r, _ in to_sample]
            logits = torch.stack([row.to(self.device) for _, row in to_sample])
            out = self.sampler.sample(logits, [r.params for r in reqs], [r.state for r in reqs])
            for (req, row), tok, reason, lp in zip(to_sample, out.token_ids, out.finish_reasons, out.logprobs,
                                                   strict=True):
                req.ready = None
                sampled.append((req, [tok], [lp], reason, row))
        updates = []
        for req, toks, lps, reason, row in sorted(sampled, key=lambda item: item[0].id):
            updates.append(self._output(req, toks, lps, reason))
            updates[-1].prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None  # complete by now
            if reason is not None:
                if self.prefix is not None:  # end of output: the cache holds prompt + output minus the last token
                    self.prefix.store(req.token_slice(0, req.computed), req.slot, row, req.hidden)
                self._running.remove(req)
                self._free(req)
        return updates

    def _forward(self, plan: dict[_Request, int], to_sample: list[tuple[_Request, Tensor]]) -> list:
        """Run the scheduled chunks (drafting and verifying for decodes when speculating); update each request's
        cache position, MTP input, prompt logprobs and prefix saves; append the requests whose tokens are all cached
        to `to_sample` with their last logits, and return what needs no sampler: the speculative decodes' emissions
        and the prompt-only requests (max_tokens 0) whose prefill is done."""
        # a decode drafts from the final streams of the last cached token: none yet for a one-token prompt's first step
        verifying = [r for r in plan if self.k and r.remaining == 1 and r.params.max_tokens and r.hidden is not None]
        drafts: dict[_Request, tuple[list[int], Tensor]] = {}
        if verifying:
            # a verify step keeps its first token; the MTP blocks append before the rollback only where drafting
            # calls them (a request's first draft, or deeper drafts)
            mtp = self.k > 1 or any(r.drafted is None for r in verifying)
            snap = self.cache.snapshot(self.k + 1, kept=1, mtp=mtp)
            drafts = self._draft(verifying)
        start = {r: r.computed for r in plan}
        fed = {r: r.token_slice(r.computed, r.computed + n) for r, n in plan.items()}
        for r, (d, _) in drafts.items():
            fed[r] = fed[r] + d
        # one batch row per scheduled request (not per slot): slots without work are not computed
        row = {req: i for i, req in enumerate(fed)}
        graphed = self._graphed(plan, start, drafts)
        if graphed:  # the head inputs [n, dim] of a decode step, from its graph
            head_rows = self.graphs.heads([t[0] for t in fed.values()], [r.slot for r in fed], max(start.values()))
        else:
            tokens, lengths = self._batch(list(fed.values()))
            streams = self._run_rows(fed, tokens, lengths)  # [n, width, hc, d]

        emitted = []
        kept = {r: len(t) for r, t in fed.items()}
        for req in plan:
            if req.prompt_logprobs is not None:
                self._score_prompt(req, streams[row[req]], start[req], kept[req])
        if verifying:
            keep, keep_mtp = self.cache.lengths.clone(), self.cache.mtp_lengths.clone()
            at = [row[r] for r in verifying]
            fed_rows = streams[:, :self.k + 1] if at == list(range(len(streams))) else \
                streams[torch.tensor(at, device=self.device), :self.k + 1]  # (every row verifying: no gather)
            targets = self.model.logits(fed_rows)  # [n, k+1, vocab], one head call for the batch
            for req, target in zip(verifying, targets, strict=True):
                d, q = drafts[req]
                out = verify_drafts(self.sampler, target, d, q, req.params, req.state)
                self.drafted += self.k
                self.accepted += out.accepted
                kept[req] = len(out.token_ids)
                keep[req.slot] = start[req] + kept[req]
                keep_mtp[req.slot] = start[req]  # the true pair (hidden, pending) drafting consumed stays
                lps = out.logprobs or [None] * len(out.token_ids)
                emitted.append((req, out.token_ids, lps, out.finish_reason, target[kept[req] - 1]))
            self.cache.rollback(snap, keep, keep_mtp, check=False)  # (in range: kept >= 1 token, <= k + 1)
        if self.k:
            finished = {req for req, _, _, reason, _ in emitted if reason is not None}
            self._mtp_catch_up(plan, fed, kept, start, streams, row, verifying, finished)

        for req in plan:
            req.computed += kept[req]
        last_rows = [r for r in plan if r not in drafts]
        if last_rows:
            if graphed:  # (no drafts: every row is a last row)
                heads = head_rows
            else:
                rows = torch.tensor([row[r] for r in last_rows], device=self.device)
                heads = self.model.head_input(streams[rows, lengths[rows] - 1].unsqueeze(1))[:, 0]  # [n, dim] fp32
            greedy = [i for i, req in enumerate(last_rows) if self._greedy_now(req)]
            if greedy:
                emitted += self._greedy_emit([last_rows[i] for i in greedy], heads[greedy])
            rest = sorted(set(range(len(last_rows))) - set(greedy))
            if rest:
                for req, logits in zip([last_rows[i] for i in rest], self.model.head(heads[rest]), strict=True):
                    self._save_prefix(req, logits)  # logits [vocab] fp32
                    if req.remaining == 0 and req.params.max_tokens == 0:
                        emitted.append((req, [], [], "length", logits))
                    elif req.remaining == 0:
                        to_sample.append((req, logits))
        return emitted

    def _graphed(self, plan: dict[_Request, int], start: dict[_Request, int], drafts: dict) -> bool:
        """Whether this step runs as a decode graph: every row a plain decode (one token, no drafts) past position 0,
        none scoring its prompt, within the graphs' buckets."""
        if self.graphs is None or drafts or not plan:
            return False
        if any(n != 1 or start[r] == 0 or r.prompt_logprobs is not None for r, n in plan.items()):
            return False
        return self.graphs.covers(len(plan), max(start.values()))

    def _greedy_now(self, req: _Request) -> bool:
        """Whether all that this step's logits of `req` are for is its greedy token: it samples now (every token
        cached, output wanted), greedily with nothing processing or reporting its logits (no penalties, grammar
        or logprobs), and no prefix save keeps them."""
        p = req.params
        return (req.remaining == 0 and p.max_tokens > 0 and p.plain_greedy and p.logprobs is None
                and not self._saves_prefix(req))

    def _greedy_emit(self, reqs: list[_Request], heads: Tensor) -> list:
        """The next tokens of `_greedy_now` requests from their head inputs [n, dim] (`Transformer.greedy_tokens`:
        the logits' first maximum, which the native backend finds without computing most of them; the Sampler's
        greedy token too), recorded as the Sampler records its own. A finishing request's logits are computed
        when a prefix cache will keep them."""
        out = []
        for i, (req, token) in enumerate(zip(reqs, self.model.greedy_tokens(heads).tolist(), strict=True)):
            reason = self.sampler.record(token, req.params, req.state)
            logits = self.model.head(heads[i]) if reason is not None and self.prefix is not None else None
            out.append((req, [token], [None], reason, logits))
        return out

    def _run_rows(self, fed: dict[_Request, list[int]], tokens: Tensor, lengths: Tensor) -> Tensor:
        """The main model over the step's rows: final streams [n, width, hc, d] (rows right-padded). Rows are
        padded to the widest, and every padded position is computed, so decodes (a token, or the pending token
        and the drafts) do not share a call with prefill chunks: a step with 7 decodes and a 150-token chunk
        would compute 8 x 150 positions instead of 157. Two calls cost one more step's fixed overhead."""
        sizes = [len(t) for t in fed.values()]  # `lengths` as the host has them
        short = [n <= self.k + 1 for n in sizes]
        if all(short) or not any(short):
            return self.model.forward_streams(tokens, self._rows(fed), lengths=lengths)
        a = self.model.args
        streams = torch.zeros(*tokens.shape, a.hc_mult, a.dim, dtype=self.model.dtype, device=self.device)
        reqs = list(fed)
        for group in (True, False):
            picked = [i for i, flag in enumerate(short) if flag is group]
            at = torch.tensor(picked, device=self.device)
            width = max(sizes[i] for i in picked)
            rows = self._rows(reqs[i] for i in picked)
            streams[at, :width] = self.model.forward_streams(tokens[at, :width], rows, lengths=lengths[at])
        return streams

    def _score_prompt(self, req: _Request, streams: Tensor, start: int, n: int) -> None:
        """Extend `req.prompt_logprobs` by the prompt tokens this step's chunk predicts: streams [width, hc, d] of
        its row hold positions start..start + n - 1, and the logits at position p score prompt token p + 1 (the
        last prompt position predicts the first output token instead). Tokens scored before a preemption are not
        scored again."""
        lo, hi = max(start, len(req.prompt_logprobs) - 1), min(start + n, len(req.prompt) - 1)
        if lo >= hi:
            return
        logits = self.model.logits(streams[lo - start:hi - start].unsqueeze(0))[0]  # [hi - lo, vocab] fp32
        targets = torch.tensor(req.prompt[lo + 1:hi + 1], device=logits.device)
        req.prompt_logprobs += token_logprobs(logits, targets, [req.params.prompt_logprobs] * (hi - lo))

    def _draft(self, reqs: list[_Request]) -> dict[_Request, tuple[list[int], Tensor]]:
        """k draft tokens per decoding request from the MTP block: its first call consumes the true pair
        (final streams of the last cached token, the pending token) and drafts d_1 (after a speculative step
        that call already ran, in the step's catch-up: `_Request.drafted`); each further call feeds the block
        its own output streams and the previous draft (DeepSeek's reuse of one MTP layer for deeper drafts).
        Returns each request's drafts and the distributions q [k, vocab] they were drawn from (None when every
        request drafting is greedy: `draft_tokens`)."""
        drafted: list[list[int]] = [[] for _ in reqs]
        qs: list[list[Tensor]] = [[] for _ in reqs]
        fresh = [r for r in reqs if r.drafted is None]  # the others' first MTP call ran with the last step's
        if fresh or self.k > 1:  # an MTP call this step: its inputs
            tok, lengths = self._batch([r.token_slice(r.computed, r.computed + 1) for r in reqs])
            cache = self._rows(reqs)
        if fresh:
            rows = [i for i, r in enumerate(reqs) if r.drafted is None]
            out = self.model.mtp_streams(torch.stack([r.hidden for r in fresh]).unsqueeze(1), tok[rows],
                                         self._rows(fresh), lengths=lengths[rows])
            for r, streams, logits in zip(fresh, out[:, 0], self.model.mtp_head(out)[:, 0], strict=True):
                r.drafted = (streams, logits)
        # [n, 1, hc, d] the MTP block's output (what a deeper draft feeds it); [n, vocab] its logits
        hidden = torch.stack([r.drafted[0] for r in reqs]).unsqueeze(1) if self.k > 1 else None
        logits = torch.stack([r.drafted[1] for r in reqs])
        for r in reqs:
            r.drafted = None
        for depth in range(self.k):
            if depth:
                hidden = self.model.mtp_streams(hidden, tok, cache, lengths=lengths)
                logits = self.model.mtp_head(hidden)[:, 0]  # [n, vocab]
            toks, q = draft_tokens(self.sampler, logits, [r.params for r in reqs], [r.state for r in reqs], drafted)
            for i, t in enumerate(toks.tolist()):
                drafted[i].append(t)
                if q is not None:  # (None: every request greedy, no verification reads q)
                    qs[i].append(q[i])
            tok = toks.view(-1, 1).to(device=self.device, dtype=torch.long)
        return {r: (d, torch.stack(q) if q else None) for r, d, q in zip(reqs, drafted, qs, strict=True)}

    def _mtp_catch_up(self, plan: dict[_Request, int], fed: dict[_Request, list[int]], kept: dict[_Request, int],
                      start: dict[_Request, int], streams: Tensor, row: dict[_Request, int],
                      verifying: list[_Request], finished: set[_Request]) -> None:
        """Feed the MTP block the pairs (final streams at position i, token i + 1) the step made known, up to the
        last kept token, whose streams wait in `hidden` for the next token: the MTP cache stays one token behind
        the main cache, so what it holds is a function of the token prefix alone (prefix-cache safe). A request
        that verified drafts has also emitted the token after its last kept one: its pair joins this call, and
        its output is the next step's first draft (one MTP call per speculative step instead of two). Such a
        request's MTP cache is level with its tokens, not behind; it is saved to the prefix cache only when it
        finishes, and a finished request gets no such pair."""
        pairs: dict[_Request, tuple[Tensor, list[int]]] = {}
        for req in plan:
            if req in finished:
                continue
            m = kept[req]
            if req in verifying:
                # the step emitted its next token too (the last one; the main model has not consumed it): feed
                # that true pair now as well, and the next step drafts from its output without an MTP call
                pairs[req] = (streams[row[req], :m], fed[req][1:m] + [req.state.output_ids[-1]])
            elif start[req] == 0:  # no pair before the first token
                pairs[req] = (streams[row[req], :m - 1], fed[req][1:m])
            else:
                pairs[req] = (torch.cat((req.hidden.unsqueeze(0), streams[row[req], :m - 1])), fed[req][:m])
            req.hidden = streams[row[req], m - 1].clone()
        pairs = {req: p for req, p in pairs.items() if p[1]}  # rows with nothing to feed are left out
        if not pairs:
            return
        tokens, lengths = self._batch([t for _, t in pairs.values()])
        if len(pairs) == 1:
            hidden = next(iter(pairs.values()))[0].unsqueeze(0)  # [1, n, hc, d]: nothing to pad
        else:
            a = self.model.args
            hidden = torch.zeros(len(pairs), tokens.shape[1], a.hc_mult, a.dim, dtype=self.model.dtype,
                                 device=self.device)
            for i, (h, t) in enumerate(pairs.values()):
                hidden[i, :len(t)] = h
        out = self.model.mtp_streams(hidden, tokens, self._rows(pairs), lengths=lengths)
        ahead = [(i, req) for i, req in enumerate(pairs) if req in verifying]
        if ahead:
            if len(ahead) == len(pairs) and all(len(t) == tokens.shape[1] for _, t in pairs.values()):
                last = out[:, -1]  # every row verified and fed the whole width: no gather
            else:
                at = torch.tensor([i for i, _ in ahead], device=self.device)
                last = out[at, lengths[at] - 1]  # [n, hc, d] the MTP block's output after the emitted token
            for (_, req), streams_row, logits_row in zip(ahead, last, self.model.mtp_head(last.unsqueeze(1))[:, 0],
                                                         strict=True):
                req.drafted = (streams_row, logits_row)

    def _batch(self, token_lists: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Token lists as one right-padded batch: tokens [n, width] and lengths [n], on the model's device."""
        sizes = [len(t) for t in token_lists]
        width = max(sizes)
        if min(sizes) == width:  # no padding: one conversion (a decode or verify step's rows)
            tokens = torch.tensor(token_lists, dtype=torch.long)
        else:
            tokens = torch.zeros(len(token_lists), width, dtype=torch.long)
            for i, toks in enumerate(token_lists):
                tokens[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        lengths = torch.tensor(sizes, dtype=torch.long)
        return tokens.to(self.device), lengths.to(self.device)

    def _rows(self, reqs: Iterable[_Request]) -> CacheRows:
        """The cache seen through the slots of `reqs`, in their order (batch row i is reqs[i]'s slot). A view is made
        once a step per list of slots (a speculative step's main and MTP calls see the same rows): views read and
        write the cache in place, and their copies of the page table hold for the step (pages are reserved before
        it)."""
        slots = tuple(r.slot for r in reqs)
        rows = self._step_rows.get(slots)
        if rows is None:
            rows = self._step_rows[slots] = self.cache.select(torch.tensor(slots, dtype=torch.long,
                                                                           device=self.device))
        return rows

    def _saves_prefix(self, req: _Request) -> bool:
        """Whether the prefix cache saves `req`'s state now (at the prompt's end, or every `prefix_interval`
        tokens of a long one) because it does not hold it yet."""
        if self.prefix is None:
            return False
        at_end = req.computed == len(req.prompt)
        at_interval = (self.prefix_interval is not None and req.computed < len(req.prompt)
                       and req.computed % self.prefix_interval == 0)
        return (at_end or at_interval) and not self.prefix.contains(req.prompt[:req.computed])

    def _save_prefix(self, req: _Request, logits: Tensor) -> None:
        if self._saves_prefix(req):
            self.prefix.store(req.prompt[:req.computed], req.slot, logits, req.hidden)


class AsyncEngine:
    """Runs an `Engine`'s step loop as an asyncio background task (on the event loop's thread, yielding to
    other tasks between steps) and streams each request's updates to its consumer.

    Use from one event loop; the loop task starts on the first `generate` and sleeps while there is no work."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[int, asyncio.Queue] = {}
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> None:
        """Raise ValueError for a request the engine would refuse (see `Engine.check_request`)."""
        self.engine.check_request(prompt_ids, params)

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
