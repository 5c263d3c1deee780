"""The KV compressor: gated pooling of `ratio` consecutive tokens into one entry.

Per token t: K_t = wkv(x_t), Z_t = wgate(x_t) + ape[t % ratio] (fp32). Entry j pools its block
B_j = [j*r, (j+1)*r) with a softmax over the tokens, independently per channel.
  * HCA-style (no overlap): width c, candidates = the r tokens of B_j.
  * CSA-style (ratio 4, overlap): the 2c channels are two halves; the first half of the tokens of
    the previous block B_{j-1} and the second half of the tokens of B_j form 2r candidates. For
    j = 0 the previous block does not exist (weight 0).
The pooled vector goes through `norm`, RoPE at position j*r (the block's first token), and the
QAT rounding of its consumer (FP8 on the nope dims for the attention KV; Hadamard + FP4 for the
indexer keys). An entry appears at the block's last token and is visible to that token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import kernels
from ..config import CSA_RATIO, ModelArgs
from ..kernels.paged import gather_rows
from .cache import CompressorState, ForwardContext
from .layers import Linear, RMSNorm, float_weight
from .rope import rope_cos_sin


@dataclass(frozen=True)
class _ChunkPlan:
    """What every compressor of one ratio and ring size computes alike for a chunk (built once per forward)."""

    positions: Tensor  # [B, S] the chunk's positions
    ratio: int
    ring: int
    first: Tensor  # [B] the first entry the chunk can finish
    n_max: int  # the most entries a row finishes
    n_entries: int  # the most entries a row holds afterwards
    host_new: tuple[int, ...]  # the entries each row pools: those it finishes (a static step: one a row)

    @functools.cached_property
    def phase(self) -> Tensor:
        """[B, S] each token's place in its block (its `ape` row); asked for where a chunk is pooled in torch (a
        decode step's `ring_pool` finds it from the positions itself)."""
        return self.positions % self.ratio

    @functools.cached_property
    def ring_slots(self) -> Tensor:
        """[B, S] each token's ring slot."""
        return self.positions % self.ring

    @classmethod
    def build(cls, ctx: ForwardContext, ratio: int, ring: int) -> _ChunkPlan:
        first = torch.div(ctx.start, ratio, rounding_mode="floor")
        if ctx.capacity:  # a static decode step: every row pools entry `first` (finished or not; an unfinished
            # one is masked from every read until the step that finishes it writes it again), and readers take
            # the entries of positions below the capacity
            host_new = (1,) * ctx.positions.shape[0]
            return cls(ctx.positions, ratio, ring, first, 1, ctx.capacity // ratio, host_new)
        # the same counts from the host's copy of the starts and lengths (no read of the device's)
        host_after = [(s + n) // ratio for s, n in zip(ctx.host_starts, ctx.host_lengths, strict=True)]
        host_new = tuple(a - s // ratio for s, a in zip(ctx.host_starts, host_after, strict=True))
        return cls(ctx.positions, ratio, ring, first, max(host_new, default=0), max(host_after, default=0), host_new)


@dataclass(frozen=True)
class _PoolPlan:
    """Where each entry a chunk finishes takes its candidates from in the extended sequence (the ring's tokens,
    then the chunk's), and where it goes: common to the compressors of one ratio (built once per forward)."""

    candidates: Tensor | None  # [B*M, coff*r] rows of the extended sequence viewed as rows of c (see
    # `Compressor._pool`), -1 for the candidates before position 0 (CSA's entry 0: its previous block); None for a
    # decode step's, which `kernels.ring_pool` finds from the positions
    entry_ids: Tensor  # [B, M] the entries, j = first + 0 .. M-1
    rows: Tensor  # the (row, m) pairs that are finished entries (a row may finish fewer than M)
    cols: Tensor | None  # (None when `every`)
    written: Tensor  # entry_ids[rows, cols]: each finished entry's id
    every: bool  # every (row, m) pair is finished: the pairs are the [B, M] grid in order
    cos: Tensor  # [B, M, rope/2] the rotation at each entry's first position j*r
    sin: Tensor

    @classmethod
    def decode(cls, chunk: _ChunkPlan, ratio: int, freqs: Tensor) -> _PoolPlan:
        """A decode step's: each row pools entry `first` (M = 1) from the rings, the candidates left to `ring_pool`;
        the rows that finish it write it (a static step's every row)."""
        j = chunk.first.unsqueeze(1)  # [B,1]
        cos, sin = rope_cos_sin(freqs, j * ratio)
        if sum(chunk.host_new) == j.shape[0]:
            return cls(None, j, torch.arange(j.shape[0], device=j.device), None, chunk.first, True, cos, sin)
        at, cols = _finished_pairs(chunk.host_new, 1, j.device)
        return cls(None, j, at, cols, j[at, cols], False, cos, sin)

    @classmethod
    def build(cls, ctx: ForwardContext, chunk: _ChunkPlan, ratio: int, ring: int, freqs: Tensor) -> _PoolPlan:
        """The candidates index the extended sequence (`ring` ring tokens before the chunk)."""
        r, m, device = ratio, chunk.n_max, ctx.start.device
        overlap = ratio == CSA_RATIO
        b, s = ctx.positions.shape
        j = chunk.first.unsqueeze(1)  # [B,M] entry ids: first + 0 .. M-1
        if m > 1:
            j = j + torch.arange(m, device=device)
        first_pos = j * r  # [B,M] each entry's first position
        cur_pos = first_pos.unsqueeze(-1) + torch.arange(r, device=device)  # [B,M,r]
        offset = (ctx.start - ring).view(-1, 1, 1)  # position of ext row 0
        last = ring + s - 1
        base = (torch.arange(b, device=device) * (ring + s)).view(-1, 1, 1)  # each batch row's first ext row
        cur = base + (cur_pos - offset).clamp(0, last)
        if overlap:  # the previous block's tokens give their first half, this block's their second; entry 0 has
            # no previous block
            prev = base + (cur_pos - r - offset).clamp(0, last)
            prev = (2 * prev).masked_fill((j == 0).unsqueeze(-1), -1)
            rows = torch.cat((prev, 2 * cur + 1), dim=2)  # [B,M,2r] in rows of c
        else:
            rows = cur.expand(b, m, r)
        cos, sin = rope_cos_sin(freqs, first_pos)
        every = sum(chunk.host_new) == b * m
        if every:  # the whole [B, M] grid in order (a static or decode step's one entry a row)
            at = torch.arange(b, device=device) if m == 1 else torch.arange(b, device=device).repeat_interleave(m)
            return cls(rows.flatten(0, 1), j, at, None, j.flatten(), True, cos, sin)
        at, cols = _finished_pairs(chunk.host_new, m, device)
        return cls(rows.flatten(0, 1), j, at, cols, j[at, cols], False, cos, sin)


def _finished_pairs(counts: tuple[int, ...], m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The (row, m) pairs of the entries a chunk finishes, row by row ([B, M] grid order), for `counts` entries in
    each row (at most m): built from the host's counts (the positions where a mask of them is true would be a read
    of the device), their total sizing the result."""
    b, total = len(counts), sum(counts)
    per_row = torch.tensor(counts, device=device)
    at = torch.repeat_interleave(torch.arange(b, device=device), per_row, output_size=total)
    first = torch.repeat_interleave(per_row.cumsum(0) - per_row, per_row, output_size=total)  # each pair's row start
    return at, torch.arange(total, device=device) - first


def _ring_bases(batch: int, ring: int, storage_rows: Tensor | None, device: torch.device) -> Tensor:
    """Where each batch row's ring starts [B] in the rings viewed as [rows * R, ...] (batch row i being ring row
    storage_rows[i], default i)."""
    if storage_rows is None:
        return torch.arange(0, batch * ring, ring, device=device)
    return storage_rows * ring


def _ring_keep_rows(ctx: ForwardContext, ring: int, before: int) -> Tensor:
    """The rows of the extended sequence (`before` ring tokens, then the chunk) a rebuilt ring of R = `ring` slots
    keeps [B, R]: slot s <- the token at the position q = s (mod R) among the last R consumed (a position before 0,
    in a sequence shorter than R, takes any row: no candidate names it). The same for every compressor of a ring
    size in a forward."""
    end = ctx.start + ctx.lengths
    slots = torch.arange(ring, device=ctx.start.device)
    q = (end - ring).unsqueeze(1) + (slots - (end - ring).unsqueeze(1)) % ring  # [B,R]
    return (q - (ctx.start.unsqueeze(1) - before)).clamp(min=0)


class Compressor(nn.Module):
    def __init__(self, args: ModelArgs, ratio: int, head_dim: int, rotate: bool) -> None:
        super().__init__()
        self.ratio = ratio
        self.head_dim = head_dim
        self.rope_head_dim = args.rope_head_dim
        self.rotate = rotate  # indexer keys: Hadamard rotation + FP4; attention KV: FP8 on the nope dims
        self.overlap = ratio == CSA_RATIO
        coff = 2 if self.overlap else 1
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim, dtype=torch.float32))
        # stored bf16 in the checkpoint, run in fp32 like the reference
        self.wkv = Linear(args.dim, coff * head_dim, dtype=torch.float32, official_format="bf16")
        self.wgate = Linear(args.dim, coff * head_dim, dtype=torch.float32, official_format="bf16")
        self.norm = RMSNorm(head_dim, args.norm_eps)

    def forward(self, x: Tensor, ctx: ForwardContext, state: CompressorState, freqs: Tensor) -> int:
        """Pool the blocks this chunk completes into `state.entries`; return n, the largest entry count in the
        batch after the chunk: readers take entries 0..n-1 from `state.entries` (a row's entries beyond its own
        count are stale and masked by every reader)."""
        r = self.ratio
        ring = state.ring  # R = coff * r most recent tokens
        plan = ctx.shared(("compress", r, ring), lambda: _ChunkPlan.build(ctx, r, ring))  # the layers' common part
        if ctx.appends == 1 and not (torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters()))):
            self._decode_step(x, plan, state, freqs, ctx)
            return plan.n_entries
        xf = x.to(torch.float32)
        kv = self.wkv(xf)  # [B,S,coff*c]
        gate = self.wgate(xf)  # [B,S,coff*c], the scores before their position's ape row
        # the rows of ape by phase, gathered (its backward one index_add, where indexing's accumulates by index_put)
        score = gate + self.ape.index_select(0, plan.phase.flatten()).view(*plan.phase.shape, -1)
        in_place = 0 < ctx.appends <= ring  # verify steps: the tokens take their ring slots in place
        if plan.n_max > 0 or not in_place:
            self._pool_and_keep(kv, score, plan, state, freqs, ctx, rewrite=not in_place)
        if in_place:
            state.write_slots(plan.ring_slots, kv.detach(), score.detach())
        return plan.n_entries

    def _decode_step(self, x: Tensor, plan: _ChunkPlan, state: CompressorState, freqs: Tensor,
                     ctx: ForwardContext) -> None:
        """A decode step (a token a row, x [B,1,d]): the token takes its ring slot first, and then the ring holds
        every candidate of the entry it pools (the previous block and its own), which is pooled from the ring in
        place; one `project_ring_pool` op for the projections and both (`ring_pool` after the modules' own calls
        where they are not plain linears), which finds the slots and candidates from the positions."""
        r, ring = self.ratio, state.ring
        ring_kv, ring_score, rows = state.ring_tensors()  # (a cache view's: its parent's rings and its rows there)
        # (the plans hold `rows`, so that no other tensor takes its id while they are kept)
        base = ctx.shared(("ring_base", ring, id(rows)),
                          lambda: (rows, _ring_bases(x.shape[0], ring, rows, x.device)))[1]  # [B]
        x = x.reshape(x.shape[0], -1)  # [B,d]
        wkv, wgate = float_weight(self.wkv), float_weight(self.wgate)
        pool, dtype = plan.n_max > 0, state.entries.dtype
        if wkv is not None and wgate is not None:
            pooled = kernels.project_ring_pool(x, wkv, wgate, self.ape, ctx.start, ring_kv, ring_score, base, pool,
                                               dtype)
        else:
            xf = x.to(torch.float32)
            pooled = kernels.ring_pool(self.wkv(xf), self.wgate(xf), self.ape, ctx.start, ring_kv, ring_score, base,
                                       pool, dtype)
        if pooled is not None:
            self._store(pooled, ctx.shared(("ring_pool", r), lambda: _PoolPlan.decode(plan, r, freqs)), state, ctx)

    def _pool_and_keep(self, kv: Tensor, score: Tensor, plan: _ChunkPlan, state: CompressorState, freqs: Tensor,
                       ctx: ForwardContext, rewrite: bool) -> None:
        """Pool the finished blocks from the ring and the chunk, and (`rewrite`, for a kept chunk the caller does
        not write in place) rebuild the ring from both."""
        ring = state.ring
        # the extended sequence: the ring's tokens (positions start-R .. start-1) then the chunk; a chunk every row
        # of which starts at position 0 alone (the ring's positions are before 0: no candidate)
        before = 0 if ctx.fresh else ring
        ext_kv, ext_score = kv, score
        if before:  # the ring's slots oldest first [B,R]: its tokens at positions start-R .. start-1
            order = ctx.shared(("ring_order", ring), lambda: (ctx.start.unsqueeze(1) - ring + torch.arange(
                ring, device=ctx.start.device)) % ring)
            ext_kv = torch.cat((gather_rows(state.kv, order), kv), dim=1)  # [B,R+S,coff*c]
            ext_score = torch.cat((gather_rows(state.score, order), score), dim=1)
        if plan.n_max > 0:  # (every compressed layer rotates its entries by the same frequencies, as attention's
            # shared cos / sin assume: `rope_frequencies(args, compressed=True)`)
            pool = ctx.shared(("pool", self.ratio, before),
                              lambda: _PoolPlan.build(ctx, plan, self.ratio, before, freqs))
            self._pool(ext_kv, ext_score, pool, state, ctx)
        if ctx.persist and rewrite and ctx.appends > ring:  # every row's last R tokens take every slot, one each
            state.write_slots(plan.ring_slots[:, -ring:], kv[:, -ring:].detach(), score[:, -ring:].detach())
        elif ctx.persist and rewrite:
            ext_index = ctx.shared(("ring_keep", ring, before), lambda: _ring_keep_rows(ctx, ring, before))
            state.kv = gather_rows(ext_kv, ext_index).detach()
            state.score = gather_rows(ext_score, ext_index).detach()

    def _pool(self, ext_kv: Tensor, ext_score: Tensor, pool: _PoolPlan, state: CompressorState,
              ctx: ForwardContext) -> None:
        c = self.head_dim
        # ext [B,R+S,coff*c] (or the rings) as rows of c (CSA's halves are rows of their own) -> [B,M,c] fp32
        pooled = kernels.gated_pool(ext_kv.reshape(-1, c), ext_score.reshape(-1, c), pool.candidates)
        self._store(pooled.to(state.entries.dtype), pool, state, ctx)

    def _store(self, pooled: Tensor, pool: _PoolPlan, state: CompressorState, ctx: ForwardContext) -> None:
        """The pooled entries [B*M, c] (in the entries' dtype) normed, rotated and rounded, and the finished ones
        written: straight into the store in one op where every one is finished and the store is a destination
        (the engine's pages)."""
        pooled = pooled.view(*pool.entry_ids.shape, self.head_dim)
        dest = state.entries.destination() if pool.every else None
        if dest is not None:
            kernels.norm_rope_store(pooled.flatten(0, 1), self.norm.weight, self.norm.eps, pool.cos.flatten(0, 1),
                                    pool.sin.flatten(0, 1), self._qat(ctx.exact), dest, pool.rows, pool.written)
            return
        entry = kernels.norm_rope_qat(pooled, self.norm.weight, self.norm.eps, pool.cos, pool.sin,
                                      self._qat(ctx.exact))
        finished = entry.flatten(0, 1) if pool.every else entry[pool.rows, pool.cols]
        state.entries.write(pool.rows, pool.written, finished)

    def _qat(self, exact: bool) -> str:
        """The rounding the official inference applies to cached entries (`kernels.norm_rope_qat`): indexer keys
        are Hadamard-rotated (and FP4-rounded), the attention KV's nope dims FP8-rounded."""
        if self.rotate:
            return "hadamard_fp4" if exact else "hadamard"
        return "fp8_nope" if exact else "none"
