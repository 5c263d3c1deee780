"""Batched token sampling, in token ids (knows nothing about chat text).

The draw is the official DeepSeek `generate.py` rule: ``probs = softmax(logits / max(T, 1e-5))``, divided by
i.i.d. Exp(1) noise, argmax. For any non-negative weights ``w``, ``argmax_i w_i / E_i`` with ``E_i ~ Exp(1)`` is
index ``i`` with probability ``w_i / sum(w)``: an exact categorical sample, with no cumulative sum and no
renormalisation (filtered tokens get weight 0 and can never win). ``T == 0`` is greedy: argmax, ties to the
lowest id, no noise drawn, the seed unused.

Per row the logits go through, in the order vLLM (v1) uses:

0. the grammar mask of a constrained request (``SamplingParams.grammar``, `dsv4.engine.constraint`): tokens the
   grammar does not allow next get -inf;
1. penalties (skipped when neutral):
   * repetition ``r`` (HF / vLLM): for every token in the prompt or the generated tokens, a positive logit is
     divided by ``r``, a negative one multiplied by ``r``;
   * frequency ``f`` and presence ``p`` (OpenAI): ``logit -= f * count + p * (count > 0)``, ``count`` being how
     many times the token was generated so far by this request (the prompt does not count);
2. temperature: ``logits / max(T, 1e-5)`` then softmax (fp32);
3. min-p: keep tokens with ``prob >= min_p * max prob``;
4. top-k: keep tokens with ``prob >=`` the k-th largest prob (tokens tied with the k-th are all kept);
5. top-p, on the distribution renormalised over what steps 3-4 kept: sort descending, take the shortest prefix
   whose mass reaches ``top_p`` (fp32 cumulative sum ``>= top_p``; the same set as vLLM's and HF's rule) and
   keep every token whose prob is ``>=`` the last one of that prefix: **ties at the boundary are all kept**, so
   the kept set never depends on token ids. Always at least one token survives.
6. the Exp(1)-noise draw above, over the kept tokens.

Steps 3-5 each keep the tokens at or above a probability threshold, so the filters together amount to one
threshold on the step-2 probabilities.

Logprobs convention: ``log_softmax`` of the logits **after penalties and temperature, before min-p / top-k /
top-p** (vLLM's ``processed_logprobs`` minus the filtering; vLLM's default is the raw model logprobs). For a
greedy request (T = 0) the temperature step is skipped (T taken as 1), so its logprobs are the penalised model
logprobs.

`process_logits` applies steps 1-5 and nothing else (no draw, no recording); `Sampler.sample` is that, then
`Sampler.draw` (step 6), then `Sampler.record` per row, so what speculative verification compares drafts against
(`dsv4.engine.speculative.verify_drafts`) is by construction what the sampler would have drawn from.

Randomness: a request with a ``seed`` owns a ``torch.Generator`` seeded once, on the logits' device, at its
first sampled step; each non-greedy step draws exactly one ``[V]`` row of noise from it, so its tokens do not
depend on which batch, or which row, it is sampled in. Unseeded requests share the sampler-wide generator (one
``[n, V]`` draw per step for the n unseeded sampling rows; their tokens do depend on the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .constraint import Grammar, GrammarState

MAX_LOGPROBS = 20
_MIN_TEMPERATURE = 1e-5


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. The defaults are the model's recommended sampling (T = 1, top_p = 1), no
    filters, no penalties.

    ``top_k = 0`` and ``top_p = 1`` and ``min_p = 0`` switch their filter off. ``logprobs = None``: no logprobs;
    ``n`` in [0, 20]: the chosen token's logprob plus the ``n`` most likely (id, logprob). ``stop_token_ids``
    end the request like EOS (which the sampler knows; ``ignore_eos`` makes it an ordinary token).
    ``max_tokens`` bounds the generated tokens (default 16, OpenAI's legacy completions default). ``grammar``
    constrains what may be sampled (None: anything).

    ``prompt_logprobs`` (vLLM's): None, none; ``n`` in [0, 20]: the logprob of every prompt token given the tokens
    before it (the model's own: ``log_softmax`` of its logits, no penalties or temperature) plus the ``n`` most
    likely alternatives; the first prompt token has none. ``max_tokens = 0`` is allowed only with them: a request
    that scores its prompt and generates nothing (how evaluation harnesses compute loglikelihoods)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    grammar: Grammar | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

        if not _is_number(self.temperature) or not self.temperature >= 0 or self.temperature == float("inf"):
            raise bad("temperature", "a finite number >= 0")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an int >= 0 (0 = off)")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2 <= v <= 2:
                raise bad(name, "in [-2, 2]")
        if (not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0
                or self.repetition_penalty == float("inf")):
            raise bad("repetition_penalty", "a finite number > 0")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "an int or None")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise bad("prompt_logprobs", f"None or an int in [0, {MAX_LOGPROBS}]")
        if not _is_int(self.max_tokens) or self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise bad("max_tokens", "an int >= 1 (0 only with prompt_logprobs: a request that only scores its prompt)")
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Sequence):
            raise bad("stop_token_ids", "a sequence of token ids")
        ids = tuple(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in ids):
            raise bad("stop_token_ids", "a sequence of ints >= 0")
        object.__setattr__(self, "stop_token_ids", ids)
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "a bool")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"None or an int in [0, {MAX_LOGPROBS}]")
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise bad("grammar", "a dsv4.engine.constraint.Grammar or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties or a grammar: `process_logits` leaves such a row's logits as they are (fp32),
        so its token is their first maximum (`greedy_tokens`) and its distribution the one-hot there."""
        return self.greedy and not self.penalised and self.grammar is None

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0


@dataclass
class SequenceState:
    """What the sampler remembers about one request between steps: its prompt, the tokens sampled so far
    (`Sampler.sample` appends to ``output_ids``), and, created on first need, its seeded generator, the
    penalty tensors (generated-token counts and the prompt's token set, ``[V]`` each on the logits' device) and
    its position in its grammar."""

    prompt_ids: Sequence[int] = ()
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = field(default=None, repr=False)
    seed: int | None = None
    output_counts: Tensor | None = field(default=None, repr=False)
    prompt_mask: Tensor | None = field(default=None, repr=False)
    grammar_state: GrammarState | None = field(default=None, repr=False)
    ahead: tuple[int, ...] = ()  # a `counting` copy's tokens past the grammar state's committed ones

    def counting(self, tokens: Sequence[int]) -> SequenceState:
        """A throwaway copy that counts ``tokens`` as generated after this state's own, to score speculative drafts
        as if they had been accepted without touching this state. It copies the penalty counts (if built), shares
        the read-only prompt mask and the grammar state (its masks are taken ``tokens`` further on, the state left
        as it is), but not the generator: draw with the original state, never the copy."""
        counts = None if self.output_counts is None else self.output_counts.clone()
        if counts is not None and tokens:
            counts.index_add_(0, torch.tensor(list(tokens), device=counts.device),
                              torch.ones(len(tokens), dtype=counts.dtype, device=counts.device))
        return SequenceState(self.prompt_ids, [*self.output_ids, *tokens], output_counts=counts,
                             prompt_mask=self.prompt_mask, grammar_state=self.grammar_state,
                             ahead=(*self.ahead, *tokens))

    def grammar_mask(self, params: SamplingParams, vocab: int, device: torch.device) -> Tensor:
        """bool [vocab]: the tokens the request's grammar allows next; in the grammar's closing window, only the
        one its closer picks (when it picks one)."""
        grammar = params.grammar
        assert grammar is not None
        committed = len(self.output_ids) - len(self.ahead)
        allowed = self._grammar(grammar, committed).mask(vocab, device, self.ahead)
        remaining = params.max_tokens - len(self.output_ids)
        if grammar.closer is not None and remaining <= grammar.closer.window(params.max_tokens):
            forced = grammar.closer(self.output_ids, allowed)
            if forced is not None and bool(allowed[forced]):
                allowed = torch.zeros_like(allowed)
                allowed[forced] = True
        return allowed

    def _grammar(self, grammar: Grammar, committed: int) -> GrammarState:
        """The grammar state, started on first need and brought up to the first `committed` output tokens."""
        if self.grammar_state is None:
            self.grammar_state = grammar.start()
            for token in self.output_ids[:committed]:
                self.grammar_state.consume(token)
        return self.grammar_state

    def _generator(self, seed: int, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
            self.seed = seed
        elif self.seed != seed:
            raise ValueError(f"request seeded with {self.seed} was sampled with seed {seed}")
        return self.generator

    def _penalty_tensors(self, vocab: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.output_counts is None:
            counts = torch.zeros(vocab, dtype=torch.int32, device=device)
            if self.output_ids:
                counts.index_add_(0, torch.tensor(self.output_ids, device=device),
                                  torch.ones(len(self.output_ids), dtype=torch.int32, device=device))
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            if len(self.prompt_ids):
                mask[torch.tensor(list(self.prompt_ids), device=device)] = True
            self.output_counts, self.prompt_mask = counts, mask
        assert self.prompt_mask is not None
        return self.output_counts, self.prompt_mask


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's logprob and the ``top`` n most likely (id, logprob), most likely first (ties: lower
    id first). Among prompt logprobs the first token's ``logprob`` is None (nothing precedes it), ``top`` empty."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class SampleOutput:
    tokens: Tensor  # [B] int64 on the logits' device (feed the model without a host round trip)
    token_ids: list[int]
    finish_reasons: list[str | None]  # "stop" (stop id / EOS), "length" (max_tokens reached) or None
    logprobs: list[TokenLogprobs | None]

    @property
    def stopped(self) -> list[bool]:
        """Whether each chosen token is a stop id or EOS."""
        return [r == "stop" for r in self.finish_reasons]


def apply_penalties(logits: Tensor, output_counts: Tensor, prompt_mask: Tensor, presence: Tensor,
                    frequency: Tensor, repetition: Tensor) -> Tensor:
    """logits [n, V] fp32; output_counts [n, V] (generated-token counts); prompt_mask [n, V] bool;
    presence / frequency / repetition [n]. Returns new logits (see the module docstring for the formulas)."""
    counts = output_counts.to(logits.dtype)
    seen = prompt_mask | (output_counts > 0)
    r = repetition.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (output_counts > 0).to(logits.dtype)


def filter_mask(probs: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """probs [n, V] (each row a distribution); top_k [n] int (0 = off), top_p [n], min_p [n]. Returns the
    bool mask [n, V] of the tokens kept by min-p, then top-k, then top-p (module docstring, steps 3-5)."""
    n, vocab = probs.shape
    sorted_p = torch.sort(probs, dim=-1, descending=True).values
    thr = min_p.unsqueeze(1) * sorted_p[:, :1]  # min-p
    k = top_k.clamp(min=0, max=vocab).to(torch.long)
    kth = sorted_p.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
    thr = torch.where((k > 0).unsqueeze(1), torch.maximum(thr, kth), thr)  # top-k
    kept_sorted = sorted_p * (sorted_p >= thr)
    csum = kept_sorted.cumsum(dim=-1)
    total = csum[:, -1:]
    # index of the last token of the shortest prefix whose (renormalised) mass reaches top_p
    j = (csum < top_p.unsqueeze(1) * total).sum(dim=-1, keepdim=True)
    n_kept = (sorted_p >= thr).sum(dim=-1, keepdim=True)
    j = torch.minimum(j, n_kept - 1)
    thr = torch.where((top_p < 1).unsqueeze(1), torch.maximum(thr, sorted_p.gather(1, j)), thr)  # top-p
    return probs >= thr


@dataclass
class ProcessedLogits:
    """A batch of logits after steps 1-5 (penalties, temperature, min-p / top-k / top-p), before any draw: what
    `Sampler.sample` draws from, and what speculative verification compares drafts against. Built only by
    `process_logits`, so the two can never disagree."""

    logits: Tensor  # [B, V] fp32 after penalties: a greedy row's token is its argmax (lowest id among ties)
    scaled: Tensor  # [B, V] fp32 after penalties and temperature (greedy rows: T = 1); logprobs are its log_softmax
    rand: list[int]  # the rows that sample (T > 0), in order; the others are greedy
    # [len(rand), V] fp32: softmax of those rows of `scaled`, filtered tokens zeroed and *not* renormalised (the
    # Exp-noise draw needs no renormalisation, and skipping it keeps `Sampler.sample`'s bits as they always were)
    weights: Tensor

    def probs(self) -> Tensor:
        """[B, V] fp32: the distribution each row's token is drawn from; a greedy row is one-hot at its argmax."""
        out = torch.nn.functional.one_hot(self.logits.argmax(dim=-1), self.logits.shape[-1]).to(torch.float32)
        if self.rand:
            out[torch.tensor(self.rand, device=out.device)] = self.weights / self.weights.sum(dim=-1, keepdim=True)
        return out


@torch.no_grad()
def process_logits(logits: Tensor, params: Sequence[SamplingParams],
                   states: Sequence[SequenceState]) -> ProcessedLogits:
    """logits [B, V] (any float dtype; computed in fp32), the params and states of the B requests. Applies steps
    1-5 of the module docstring. Draws nothing and leaves the states' tokens and generators alone; the only thing
    it may do to a state is create its cached penalty tensors (derived from its tokens, as `Sampler.sample` would
    on its first penalised step)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    n_rows, vocab = logits.shape
    if len(params) != n_rows or len(states) != n_rows:
        raise ValueError(f"{n_rows} logits rows but {len(params)} params and {len(states)} states")
    device = logits.device
    logits = logits.to(torch.float32)

    # 0. grammar masks
    constrained = [i for i, p in enumerate(params) if p.grammar is not None]
    if constrained:
        logits = logits.clone()
        for i in constrained:
            logits[i].masked_fill_(~states[i].grammar_mask(params[i], vocab, device), float("-inf"))

    def col(values: list[float] | list[int], rows: list[int], dtype=torch.float32) -> Tensor:
        return torch.tensor([values[i] for i in rows], dtype=dtype, device=device)

    # 1. penalties
    pen = [i for i, p in enumerate(params) if p.penalised]
    if pen:
        tensors = [states[i]._penalty_tensors(vocab, device) for i in pen]
        idx = torch.tensor(pen, device=device)
        logits = logits.clone()
        logits[idx] = apply_penalties(
            logits[idx], torch.stack([c for c, _ in tensors]), torch.stack([m for _, m in tensors]),
            col([p.presence_penalty for p in params], pen), col([p.frequency_penalty for p in params], pen),
            col([p.repetition_penalty for p in params], pen))

    # 2. temperature (greedy rows keep T = 1: their logprobs are the penalised model logprobs)
    temps = [max(p.temperature, _MIN_TEMPERATURE) if not p.greedy else 1.0 for p in params]
    scaled = logits  # every row at T = 1 (greedy decoding): dividing would copy the [B, V] logits unchanged
    if any(t != 1.0 for t in temps):
        scaled = logits / torch.tensor(temps, dtype=torch.float32, device=device).unsqueeze(1)

    rand = [i for i, p in enumerate(params) if not p.greedy]
    probs = torch.softmax(scaled[torch.tensor(rand, dtype=torch.long, device=device)], dim=-1)  # [len(rand), V]
    # 3-5. min-p, top-k, top-p
    filt = [j for j, i in enumerate(rand) if params[i].filtered]
    if filt:
        fidx = torch.tensor(filt, device=device)
        rows = [rand[j] for j in filt]
        keep = filter_mask(probs[fidx], col([p.top_k for p in params], rows, torch.long),
                           col([p.top_p for p in params], rows), col([p.min_p for p in params], rows))
        probs[fidx] = probs[fidx] * keep
    return ProcessedLogits(logits, scaled, rand, probs)


# the greedy token's search: the maximum of each block of this many logits first (a vectorised reduction, unlike
# a maximum with its index), then the index inside the first block that holds the row's maximum
GREEDY_BLOCK = 128
# the smallest vocabulary whose greedy search goes block by block (measured crossover, one row to eight)
GREEDY_BLOCKED_VOCAB = 32768


def greedy_tokens(logits: Tensor) -> Tensor:
    """The greedy token of each row of logits [..., V]: its first maximum (the lowest id among ties; a NaN counts
    as the maximum, as in argmax). torch.max's indices, which equal argmax's and take a third of its time on this
    CPU; over a vocabulary of whole GREEDY_BLOCKs (V4's 129,280 ids) the first block holding the maximum is found
    from the blocks' maxima (NaN propagates through both), then the first maximum inside it: the same index,
    2-2.5x faster (61 -> 30 us for one row, 245 -> 106 us for 8). Below GREEDY_BLOCKED_VOCAB its four ops cost
    more than torch.max's one (the demo's 2,048 ids: 30 us against 5)."""
    v = logits.shape[-1]
    if v % GREEDY_BLOCK or v < GREEDY_BLOCKED_VOCAB:
        return logits.max(dim=-1).indices
    blocks = logits.unflatten(-1, (v // GREEDY_BLOCK, GREEDY_BLOCK))  # [..., nb, GREEDY_BLOCK]
    best = blocks.amax(dim=-1).max(dim=-1).indices  # [...] the first block holding the maximum
    inside = blocks.gather(-2, best[..., None, None].expand(*best.shape, 1, GREEDY_BLOCK)).squeeze(-2)
    return best * GREEDY_BLOCK + inside.max(dim=-1).indices


def token_logprobs(scaled: Tensor, tokens: Tensor, top_n: Sequence[int]) -> list[TokenLogprobs]:
    """scaled [n, V] (`ProcessedLogits.scaled` rows), tokens [n] (the token chosen after each row), top_n [n]
    (each row's ``SamplingParams.logprobs``): the logprobs as the module docstring defines them."""
    lps = torch.log_softmax(scaled, dim=-1)
    chosen = lps.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    n_top = max(top_n, default=0)
    top_v: list[list[float]] = [[] for _ in top_n]
    top_i: list[list[int]] = [[] for _ in top_n]
    if n_top:
        # descending logprob; the stable sort keeps lower ids first among ties
        vals, ids = torch.sort(lps, dim=-1, descending=True, stable=True)
        top_v, top_i = vals[:, :n_top].tolist(), ids[:, :n_top].tolist()
    return [TokenLogprobs(t, c, list(zip(ti[:n], tv[:n], strict=True)))
            for t, c, ti, tv, n in zip(tokens.tolist(), chosen, top_i, top_v, top_n, strict=True)]


class Sampler:
    """Samples one token per row for a batch of requests. ``eos_id``: the token that ends every request (unless
    its params say ``ignore_eos``); ``seed``: the sampler-wide generator's seed (None: a random one)."""

    def __init__(self, eos_id: int | None = None, seed: int | None = None):
        self.eos_id = eos_id
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            if self.seed is None:
                g.seed()
            else:
                g.manual_seed(self.seed)
            self._generators[device] = g
        return g

    def generator(self, params: SamplingParams, state: SequenceState, device: torch.device) -> torch.Generator:
        """The generator a request's random draws come from: its own (seeded once, on first use) when its params
        carry a seed, else the sampler-wide one of that device."""
        if params.seed is None:
            return self._shared_generator(device)
        return state._generator(params.seed, device)

    def draw(self, processed: ProcessedLogits, params: Sequence[SamplingParams],
             states: Sequence[SequenceState]) -> Tensor:
        """Step 6: one token per row of `processed` ([B] int64 on its device): greedy rows their argmax, the others
        the official probs / Exp(1)-noise argmax. Each seeded row draws one [V] noise row from its own generator,
        the unseeded rows one [n, V] draw from the shared one. Records nothing."""
        tokens = greedy_tokens(processed.logits)  # greedy rows
        rand, probs = processed.rand, processed.weights
        if not rand:
            return tokens
        device, vocab = probs.device, probs.shape[-1]
        noise = torch.empty_like(probs)
        shared = [j for j, i in enumerate(rand) if params[i].seed is None]
        if len(shared) == len(rand):
            noise.exponential_(1, generator=self._shared_generator(device))
        else:
            if shared:
                sidx = torch.tensor(shared, device=device)
                noise[sidx] = torch.empty(len(shared), vocab, device=device).exponential_(
                    1, generator=self._shared_generator(device))
            for j, i in enumerate(rand):
                if params[i].seed is not None:
                    noise[j].exponential_(1, generator=self.generator(params[i], states[i], device))
        tokens[torch.tensor(rand, device=device)] = (probs / noise).argmax(dim=-1)
        return tokens

    def record(self, token: int, params: SamplingParams, state: SequenceState) -> str | None:
        """Appends a chosen token to the request's state (tokens and penalty counts) and says whether it ends the
        request: "stop" (a stop id, or EOS unless ``ignore_eos``), "length" (``max_tokens`` reached) or None."""
        state.output_ids.append(token)
        if state.output_counts is not None:
            state.output_counts[token] += 1
        if params.grammar is not None:
            state._grammar(params.grammar, len(state.output_ids) - 1).consume(token)
        if token in params.stop_token_ids or (not params.ignore_eos and self.eos_id is not None
                                              and token == self.eos_id):
            return "stop"
        if len(state.output_ids) >= params.max_tokens:
            return "length"
        return None

    @torch.no_grad()
    def sample(self, logits: Tensor, params: Sequence[SamplingParams],
               states: Sequence[SequenceState]) -> SampleOutput:
        """logits [B, V] (the next-token logits of each request, any float dtype; computed in fp32), the
        params and states of the B requests. Appends each chosen token to its state's ``output_ids``."""
        processed = process_logits(logits, params, states)
        tokens = self.draw(processed, params, states)
        token_ids = tokens.tolist()

        # logprobs (after penalties and temperature, before filtering)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        lp_out: list[TokenLogprobs | None] = [None] * len(params)
        if want:
            widx = torch.tensor(want, device=tokens.device)
            for i, lp in zip(want, token_logprobs(processed.scaled[widx], tokens[widx],
                                                  [params[i].logprobs or 0 for i in want]), strict=True):
                lp_out[i] = lp

        reasons = [self.record(t, p, st) for t, p, st in zip(token_ids, params, states, strict=True)]
        return SampleOutput(tokens, token_ids, reasons, lp_out)
