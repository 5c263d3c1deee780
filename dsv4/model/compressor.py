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

import torch
from torch import Tensor, nn

from .. import kernels
from ..config import CSA_RATIO, ModelArgs
from ..kernels.paged import gather_rows
from .cache import CompressorState, ForwardContext
from .layers import Linear, RMSNorm
from .rope import apply_rope, rope_cos_sin


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
        ring = state.kv.shape[1]  # R = coff * r most recent tokens
        start, n_valid = ctx.start, ctx.lengths
        xf = x.to(torch.float32)
        kv = self.wkv(xf)  # [B,S,coff*c]
        score = self.wgate(xf) + self.ape[ctx.positions % r]

        first = torch.div(start, r, rounding_mode="floor")
        after = torch.div(start + n_valid, r, rounding_mode="floor")  # [B] entries once the chunk is in
        n_max, n_entries = torch.stack((after - first, after)).amax(dim=1).tolist()  # most entries finished now
        in_place = 0 < ctx.appends <= ring  # decode / verify steps: the tokens take their ring slots in place
        if n_max > 0 or not in_place:
            self._pool_and_keep(kv, score, first, after - first, n_max, state, freqs, ctx, rewrite=not in_place)
        if in_place:
            state.write_slots(ctx.positions % ring, kv.detach(), score.detach())
        return n_entries

    def _pool_and_keep(self, kv: Tensor, score: Tensor, first: Tensor, n_new: Tensor, n_max: int,
                       state: CompressorState, freqs: Tensor, ctx: ForwardContext, rewrite: bool) -> None:
        """Pool the finished blocks from the ring and the chunk, and (`rewrite`, for a kept chunk the caller does
        not write in place) rebuild the ring from both."""
        ring, start = state.kv.shape[1], ctx.start
        # the extended sequence: the ring's tokens (positions start-R .. start-1) then the chunk
        ring_pos = start.unsqueeze(1) - ring + torch.arange(ring, device=kv.device)  # [B,R]
        ext_kv = torch.cat((gather_rows(state.kv, ring_pos % ring), kv), dim=1)  # [B,R+S,coff*c]
        ext_score = torch.cat((gather_rows(state.score, ring_pos % ring), score), dim=1)
        if n_max > 0:
            self._pool(ext_kv, ext_score, first, n_new, n_max, ring, state, freqs, ctx)
        if ctx.persist and rewrite:
            # ring slot s <- the token at the position q ≡ s (mod R) among the last R consumed
            end = start + ctx.lengths
            slots = torch.arange(ring, device=kv.device)
            q = (end - ring).unsqueeze(1) + (slots - (end - ring).unsqueeze(1)) % ring  # [B,R]
            ext_index = q - (start.unsqueeze(1) - ring)
            state.kv = gather_rows(ext_kv, ext_index).detach()
            state.score = gather_rows(ext_score, ext_index).detach()

    def _pool(self, ext_kv: Tensor, ext_score: Tensor, first: Tensor, n_new: Tensor, n_max: int, ring: int,
              state: CompressorState, freqs: Tensor, ctx: ForwardContext) -> None:
        r, c = self.ratio, self.head_dim
        device = ext_kv.device
        j = first.unsqueeze(1) + torch.arange(n_max, device=device)  # [B,M] entry ids
        valid = torch.arange(n_max, device=device).unsqueeze(0) < n_new.unsqueeze(1)  # [B,M]
        offset = (ctx.start - ring).view(-1, 1, 1)  # position of ext row 0
        cur_pos = j.unsqueeze(-1) * r + torch.arange(r, device=device)  # [B,M,r]
        last = ext_kv.shape[1] - 1
        cur = (cur_pos - offset).clamp(0, last)
        if self.overlap:
            prev_pos = cur_pos - r
            prev = (prev_pos - offset).clamp(0, last)
            kv = torch.cat((gather_rows(ext_kv[..., :c], prev), gather_rows(ext_kv[..., c:], cur)), dim=2)
            score = torch.cat((gather_rows(ext_score[..., :c], prev), gather_rows(ext_score[..., c:], cur)), dim=2)
            exists = torch.cat((prev_pos >= 0, cur_pos >= 0), dim=2)  # [B,M,2r]
            score = score.masked_fill(~exists.unsqueeze(-1), float("-inf"))
            kv = kv.masked_fill(~exists.unsqueeze(-1), 0.0)
        else:
            kv = gather_rows(ext_kv, cur)
            score = gather_rows(ext_score, cur)
        pooled = (kv * score.softmax(dim=2)).sum(dim=2)  # [B,M,c] fp32
        entry = self.norm(pooled.to(state.entries.dtype))
        cos, sin = rope_cos_sin(freqs, j * r)
        entry = apply_rope(entry, cos, sin)
        entry = self._qat(entry, ctx.exact)
        rows, cols = valid.nonzero(as_tuple=True)
        state.entries.write(rows, j[rows, cols], entry[rows, cols])

    def _qat(self, entry: Tensor, exact: bool) -> Tensor:
        """The rounding the official inference applies to cached entries (values stay in entry.dtype)."""
        if self.rotate:
            entry = kernels.hadamard(entry)
            return kernels.fp4_simulate(entry) if exact else entry
        if not exact:
            return entry
        nope = self.head_dim - self.rope_head_dim
        return torch.cat((kernels.fp8_simulate(entry[..., :nope]), entry[..., nope:]), dim=-1)
