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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import Transformer
from ..model.cache import Cache


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
        drafts.append(int(model.mtp_head(hidden[:, -1:])[0, -1].argmax()))
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
    pending = int(model.logits(streams[:, -1:])[0, -1].argmax())
    stats.main_forwards += 1
    out = [pending]
    if pending == eos_id or len(out) >= max_new_tokens:
        return out, stats
    next_tokens = torch.tensor([prompt_ids[1:] + [pending]], device=device)
    hidden = model.mtp_streams(streams, next_tokens, cache)[:, -1:]
    stats.mtp_forwards += 1

    while True:
        first = int(model.mtp_head(hidden)[0, -1].argmax())
        snap = cache.snapshot(k + 1)
        drafts = mtp_draft(model, cache, [*prompt_ids, *out], first, hidden, k)
        stats.mtp_forwards += k - 1
        verify = torch.tensor([[pending, *drafts]], device=device)
        streams = model.forward_streams(verify, cache)
        greedy = model.logits(streams)[0].argmax(-1).tolist()  # greedy[i] follows verify[0, i]
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
