"""Greedy speculative decoding with the MTP block as drafter (batch 1): emits exactly the plain greedy sequence.

Alignment (architecture §3.9): MTP position i consumes the main model's final streams h_i and the token t_{i+1}
and predicts t_{i+2}. State between steps: the main cache holds t_0..t_{L-1}, the last emitted token t_L is
pending (not yet consumed by the main model), and the MTP cache holds the pairs (h_i, t_{i+1}) for i < L, whose
last logits give the first draft d_1 (for t_{L+1}). One step:

  1. draft: d_1 from those logits; for k > 1 the MTP block runs again on its own output streams (standing in
     for the unknown h_{L+j}) and the previous draft (DeepSeek's reuse of one MTP layer for deeper drafts);
     these MTP writes are provisional;
  2. verify: one main forward of [t_L, d_1..d_k] gives the greedy token after each; accept the longest prefix
     d_1..d_a that agrees, then the main model's own next token is the bonus b (so every step emits a + 1);
  3. roll back: the main cache to L + a + 1 (the rejected drafts' ring slots, compressor tail and entries are
     restored, `Cache.snapshot` / `Cache.rollback`), the MTP cache to L (its provisional writes), then feed the
     MTP block the true pairs (h_{L..L+a}, [d_1..d_a, b]) from the verify forward, whose last logits draft next.

Since the main cache only ever keeps tokens the main model itself chose greedily, the output equals
`dsv4.generate.generate(model, [prompt], n)` (up to last-bit differences between a (k+1)-token verify chunk and
single-token decode, which the cache tests bound at 1e-5 in fp32).

Sampled requests (the engine's per-request primitive; `speculative_generate` itself stays greedy): `draft_tokens`
turns MTP logits into drafts d_j drawn from q_j (the MTP logits processed by the request's own `SamplingParams`,
with the earlier drafts counted as output), and `verify_drafts` is standard speculative sampling (Leviathan et al.
2023, Chen et al. 2023): with p_j the target distribution the `Sampler` would draw from after d_1..d_{j-1},
accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw from
normalise(max(0, p_j - q_j)); if all k are accepted draw a bonus token from p_{k+1}. Every emitted token is then
distributed exactly as the plain sampler would draw it, whatever q is; q only sets the acceptance rate
(sum_x min(p_j(x), q_j(x)) per draft). A greedy request reduces to the rule above: accept while d_j is the argmax,
then emit the argmax, drawing no randomness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import Transformer
from ..model.cache import Cache
from .sampling import (
    Sampler,
    SamplingParams,
    SequenceState,
    TokenLogprobs,
    greedy_tokens,
    process_logits,
    token_logprobs,
)


@dataclass
class SpeculativeStats:
    drafted: int = 0  # draft tokens proposed to the main model
    accepted: int = 0  # of those, how many the main model agreed with
    main_forwards: int = 0  # main-model calls (prefill + one verify per step)
    mtp_forwards: int = 0  # MTP-block calls
    steps: int = 0  # verify steps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Emitted tokens per verify step (1 + accepted drafts on average)."""
        return (self.steps + self.accepted) / self.steps if self.steps else 0.0


def mtp_draft(model: Transformer, cache: Cache, history: list[int], first: int, hidden: Tensor, k: int) -> list[int]:
    """k draft tokens: `first` (the argmax of the MTP logits after the last true pair), then k - 1 more by
    running the MTP block on its own output streams `hidden` [1,1,hc,d]. Writes provisional MTP cache
    entries; the caller rolls them back. `history` (prompt + emitted tokens) is unused here (a hook for
    other drafters)."""
    drafts = [first]
    for _ in range(k - 1):
        hidden = model.mtp_streams(hidden, torch.tensor([[drafts[-1]]], device=hidden.device), cache)
        drafts.append(int(greedy_tokens(model.mtp_head(hidden[:, -1:])[0, -1])))
    return drafts


@torch.inference_mode()
def speculative_generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, num_draft: int = 1,
                         eos_id: int | None = None) -> tuple[list[int], SpeculativeStats]:
    """Greedy generation of up to `max_new_tokens` tokens (stopping after `eos_id`), drafting `num_draft`
    tokens per step with the MTP block; returns the tokens and the statistics."""
    if not prompt_ids:
        raise ValueError("the prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not model.args.n_mtp_layers:
        raise ValueError("speculative decoding needs a model with an MTP block")
    k = num_draft
    device = model.embed.weight.device
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens + k + 1)
    if not 1 <= k < cache.ring_limit():
        raise ValueError(f"num_draft must be in [1, {cache.ring_limit() - 1}], got {k}")
    stats = SpeculativeStats()

    prompt = torch.tensor([prompt_ids], device=device)
    streams = model.forward_streams(prompt, cache)
    pending = int(greedy_tokens(model.logits(streams[:, -1:])[0, -1]))
    stats.main_forwards += 1
    out = [pending]
    if pending == eos_id or len(out) >= max_new_tokens:
        return out, stats
    next_tokens = torch.tensor([prompt_ids[1:] + [pending]], device=device)
    hidden = model.mtp_streams(streams, next_tokens, cache)[:, -1:]
    stats.mtp_forwards += 1

    while True:
        first = int(greedy_tokens(model.mtp_head(hidden)[0, -1]))
        snap = cache.snapshot(k + 1, kept=1)  # the pending token is kept
        drafts = mtp_draft(model, cache, [*prompt_ids, *out], first, hidden, k)
        stats.mtp_forwards += k - 1
        verify = torch.tensor([[pending, *drafts]], device=device)
        streams = model.forward_streams(verify, cache)
        greedy = greedy_tokens(model.logits(streams)[0]).tolist()  # greedy[i] follows verify[0, i]
        stats.main_forwards += 1
        stats.steps += 1
        stats.drafted += k
        a = 0
        while a < k and drafts[a] == greedy[a]:
            a += 1
        stats.accepted += a
        new = [*drafts[:a], greedy[a]]
        start = int(snap.lengths[0])
        cache.rollback(snap, lengths=torch.tensor([start + a + 1], device=device))
        for t in new:
            out.append(t)
            if t == eos_id or len(out) >= max_new_tokens:
                return out, stats
        pending = new[-1]
        hidden = model.mtp_streams(streams[:, : a + 1], torch.tensor([new], device=device), cache)[:, -1:]
        stats.mtp_forwards += 1


@dataclass
class VerifyOutput:
    """What one speculative step emits for one request (`verify_drafts`)."""

    token_ids: list[int]  # the accepted drafts then one more token, cut after the first finishing token
    # drafts the verification accepted (0..k), counted before any cut: len(token_ids) == accepted + 1 unless
    # finish_reason is set (the request is over then, so nothing is fed back)
    accepted: int
    finish_reason: str | None  # of the last emitted token: "stop", "length" or None (as `Sampler.record`)
    logprobs: list[TokenLogprobs] | None  # one per emitted token when the params ask for logprobs


@torch.no_grad()
def draft_tokens(sampler: Sampler, logits: Tensor, params: Sequence[SamplingParams],
                 states: Sequence[SequenceState],
                 drafted: Sequence[Sequence[int]] | None = None) -> tuple[Tensor, Tensor | None]:
    """One draft per request from MTP logits [B, V]: returns the tokens [B] int64 (on the logits' device, to feed
    the next MTP call without a host round trip) and q [B, V] fp32, the distributions they were drawn from (pass
    a request's rows to `verify_drafts` as its ``draft_probs``). q is the logits processed exactly as the
    `Sampler` processes target logits, with ``drafted[b]`` (request b's earlier drafts this step) counted as
    output; greedy rows are the argmax with a one-hot q, and when every row is plain greedy q is None (no
    verification of a greedy request reads it). Sampled rows draw from the request's generator (or the
    shared one) with the `Sampler`'s Exp-noise rule, so a seeded request's drafts do not depend on the batch,
    but its stream does differ from non-speculative decoding. Appends nothing to the states."""
    if all(p.plain_greedy for p in params):  # processing would leave the logits as they are: a few ops, not dozens
        return greedy_tokens(logits.to(torch.float32)), None
    scoring = states if drafted is None else [st.counting(d) for st, d in zip(states, drafted, strict=True)]
    processed = process_logits(logits, params, scoring)
    return sampler.draw(processed, params, states), processed.probs()


@torch.no_grad()
def verify_drafts(sampler: Sampler, target_logits: Tensor, drafts: Sequence[int], draft_probs: Tensor | None,
                  params: SamplingParams, state: SequenceState) -> VerifyOutput:
    """Standard speculative sampling for one request (module docstring). ``target_logits`` [k+1, V]: the main
    model's logits for the fed tokens [pending, d_1..d_k] (row i scores the token after the i-th fed token);
    ``drafts``: d_1..d_k; ``draft_probs`` [k, V]: q_1..q_k, each a distribution (sum 1) that d_j was drawn from
    (`draft_tokens`; unused, and may be None, when the request is greedy). Row i of the target is processed with
    d_1..d_i counted as output, so penalties see the drafts that precede it.

    The emitted tokens are recorded in ``state`` exactly as `Sampler.sample` records its tokens (stop ids, EOS,
    ``max_tokens``), stopping at the first finishing token. A sampled request draws k uniforms then one [V]
    Exp(1) noise row from its generator (its own when seeded, else the sampler's shared one), whatever the
    outcome; with k = 0 this is exactly `Sampler.sample` for that request."""
    k = len(drafts)
    if target_logits.dim() != 2 or target_logits.shape[0] != k + 1:
        raise ValueError(f"{k} drafts need target logits [{k + 1}, V], got shape {tuple(target_logits.shape)}")
    device, vocab = target_logits.device, target_logits.shape[1]
    if draft_probs is None and not params.greedy:
        raise ValueError("a sampled request's drafts need the distributions they were drawn from (draft_probs)")
    if draft_probs is not None and tuple(draft_probs.shape) != (k, vocab):
        raise ValueError(f"{k} drafts need draft probs [{k}, {vocab}], got shape {tuple(draft_probs.shape)}")
    if params.plain_greedy and params.logprobs is None:  # accept while d_j is the greedy token, then emit it
        target = greedy_tokens(target_logits.to(torch.float32)).tolist()  # [k+1]
        accepted = 0
        while accepted < k and drafts[accepted] == target[accepted]:
            accepted += 1
        return _emit([*drafts[:accepted], target[accepted]], accepted, sampler, params, state, None)
    if params.penalised:
        state._penalty_tensors(vocab, device)  # build the counts once on the request; the copies clone them
    if params.penalised or params.grammar is not None:  # row i sees d_1..d_i as output (counts, grammar)
        rows = [state.counting(drafts[:i]) for i in range(k + 1)]
    else:
        rows = [state] * (k + 1)  # processing without penalties or grammar never reads the state
    processed = process_logits(target_logits, [params] * (k + 1), rows)
    d = torch.tensor(list(drafts), dtype=torch.long, device=device)  # [k]
    if params.greedy:
        target = greedy_tokens(processed.logits)  # [k+1], Sampler's greedy token of each row
        accept = d == target[:k]  # [k]
    else:
        p = processed.probs()  # [k+1, V]
        q = draft_probs.to(device=device, dtype=torch.float32)
        g = sampler.generator(params, state, device)
        ar = torch.arange(k, device=device)
        u = torch.rand(k, generator=g, device=device) if k else torch.empty(0, device=device)
        accept = u * q[ar, d] < p[ar, d]  # [k]: u < p / q without the division (q = 0 < p accepts)
        noise = torch.empty(vocab, device=device).exponential_(1, generator=g)  # [V]
    accepted = int(accept.to(torch.long).cumprod(dim=0).sum()) if k else 0
    if params.greedy:
        last = target[accepted]
    elif accepted < k:
        residual = (p[accepted] - q[accepted]).clamp(min=0)  # [V]
        # p == q up to rounding leaves no mass (a rejection there has probability ~0): fall back to p itself
        last = (torch.where(residual.sum() > 0, residual, p[accepted]) / noise).argmax()
    else:
        last = (processed.weights[k] / noise).argmax()  # the bonus token: Sampler.sample's own draw from p_{k+1}
    return _emit([*drafts[:accepted], int(last)], accepted, sampler, params, state, processed.scaled)


def _emit(tokens: list[int], accepted: int, sampler: Sampler, params: SamplingParams, state: SequenceState,
          scaled: Tensor | None) -> VerifyOutput:
    """Record the step's tokens in `state` as `Sampler.sample` records its own, stopping at the first finishing
    token; their logprobs from the processed target rows `scaled` when the params ask for them."""
    emitted: list[int] = []
    reason = None
    for t in tokens:
        emitted.append(t)
        reason = sampler.record(t, params, state)
        if reason is not None:
            break
    logprobs = None
    if params.logprobs is not None:
        n = len(emitted)
        logprobs = token_logprobs(scaled[:n], torch.tensor(emitted, device=scaled.device), [params.logprobs] * n)
    return VerifyOutput(emitted, accepted, reason, logprobs)
