"""DeepSeek-V4 attention: one block type for sliding-only, CSA and HCA layers.

  * low-rank query: c_q = q_norm(wq_a(x)); q = wq_b(c_q) per head, weightless per-head RMS, RoPE;
  * one shared key/value head (MQA): kv = kv_norm(wkv(x)) with RoPE; keys are the values;
  * candidates per query: the `window_size` most recent tokens, plus compressed entries — all
    causally complete ones for HCA, the indexer's top-k for CSA;
  * softmax with a learned per-head sink logit in the denominator, then the inverse RoPE on the
    output (the values carried their keys' rotation), then the grouped low-rank output projection
    wo_a (per group of heads) and wo_b.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels
from ..config import CSA_RATIO, ModelArgs
from ..kernels.paged import KVRows, concat_rows, gather_rows
from .cache import ForwardContext, LayerCache
from .compressor import Compressor
from .indexer import Indexer, indexer_kl_loss
from .layers import Linear, RMSNorm, project, project_pair, reads_quantized
from .rope import rope_cos_sin, rope_frequencies


class Attention(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype | None) -> None:
        super().__init__()
        # heads and output groups this module holds: all of them, or a rank's share under tensor
        # parallelism (`dsv4.parallel` slices wq_b / attn_sink / wo_a / wo_b and updates these)
        self.n_heads = args.n_heads
        self.head_dim = args.head_dim
        self.rope_head_dim = args.rope_head_dim
        self.window = args.window_size
        self.n_groups = args.o_groups
        self.o_lora_rank = args.o_lora_rank
        self.eps = args.norm_eps
        self.ratio = args.layer_ratio(layer_id)
        self.wq_a = Linear(args.dim, args.q_lora_rank, dtype=dtype)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, dtype=dtype)
        self.wkv = Linear(args.dim, self.head_dim, dtype=dtype)
        self.kv_norm = RMSNorm(self.head_dim, args.norm_eps)
        # the official convert stores wo_a dequantised (bf16); it is applied per group as an einsum
        self.wo_a = Linear(self.n_heads * self.head_dim // self.n_groups, self.n_groups * self.o_lora_rank,
                           dtype=dtype, official_format="bf16")
        self.wo_b = Linear(self.n_groups * self.o_lora_rank, args.dim, dtype=dtype)
        self.attn_sink = nn.Parameter(torch.zeros(self.n_heads, dtype=torch.float32))
        if self.ratio:
            self.compressor = Compressor(args, self.ratio, self.head_dim, rotate=False)
        if self.ratio == CSA_RATIO:
            self.indexer = Indexer(args, dtype)
        self.register_buffer("freqs", rope_frequencies(args, compressed=self.ratio > 0), persistent=False)

    def reads_quantized(self) -> bool:
        """Whether wq_a and wkv take their input's FP8 quantisation from the caller (`layers.reads_quantized`)."""
        return reads_quantized(self.wq_a, self.wkv)

    def forward(self, x: Tensor, ctx: ForwardContext, cache: LayerCache,
                quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [B,S,d] (the normed sublayer input) -> [B,S,d]; `quantized`: act_quant(x) for wq_a and wkv, where the
        caller has it (`reads_quantized`)."""
        bsz, seqlen, _ = x.shape
        # [B,S,R/2], the same for every layer of this kind (one frequency table per kind)
        cos, sin = ctx.shared(("rope", self.ratio > 0), lambda: rope_cos_sin(self.freqs, ctx.positions))

        # [B,S,q_lora] and [B,S,D] (the KV before its norm and rotation), one op for both where it can
        c_q, raw_kv = project_pair(self.wq_a, self.wkv, x, quantized)
        c_q_quantized = None  # c_q's FP8 quantisation (for wq_b and the indexer's wq_b) where quantised linears read it
        if quantized is not None and reads_quantized(self.wq_b):
            c_q, c_q_quantized = self.q_norm(c_q, True)
        else:
            c_q = self.q_norm(c_q)
        if self.ratio == CSA_RATIO and c_q_quantized is not None:  # (inference) the indexer's queries come from c_q
            # too: both projections in one op
            q, index_q = project_pair(self.wq_b, self.indexer.wq_b, c_q, c_q_quantized)
        else:
            q, index_q = project(self.wq_b, c_q, c_q_quantized), None
        q = q.unflatten(-1, (self.n_heads, self.head_dim))  # [B,S,H,D]
        # normalised, then RoPE; over wq_b's output (this call's own) where no gradient is wanted
        q = kernels.head_norm(q, self.eps, cos.unsqueeze(2), sin.unsqueeze(2), inplace=not torch.is_grad_enabled())

        # the KV's norm and rotation; the official inference rounds the non-rope dims of every cached KV to FP8 after
        # them
        kv_norm = (self.kv_norm.weight, self.kv_norm.eps, cos, sin, "fp8_nope" if ctx.exact else "none")
        # window candidates: the ring holds positions start-W .. start-1, the chunk start .. start+S-1
        window_rows, window_idx, pending = self._window(raw_kv, kv_norm, ctx, cache)
        kv_rows, idx = list(window_rows), window_idx  # runs of KV rows, each query's indices into their concatenation
        if self.ratio:
            xf = x.to(torch.float32)  # [B,S,d] what the compressors' fp32 projections read (the indexer's too)
            n_entries = self.compressor(xf, ctx, cache.compressor, self.freqs)
            offset = sum(run.shape[1] if isinstance(run, Tensor) else run.count for run in window_rows)
            kv_rows.append(cache.compressor.entries.rows(n_entries))  # [B,N,D], paged entries stay in their pages
            if self.ratio == CSA_RATIO:
                dense = ctx.trace is not None and ctx.trace.dense_indexer
                # [B,S,W+k] (W+N when dense): the window slots, then the selected rows of the runs (entry j at
                # offset + j) or -1
                idx, index_scores = self.indexer(x, c_q, cos, sin, self.freqs, ctx, cache.indexer, dense=dense,
                                                 offset=offset, c_q_quantized=c_q_quantized, x_fp32=xf,
                                                 prefix=window_idx, q=index_q)
            else:  # every causally complete entry: the same for every layer of this ratio in a forward (and so
                # is the whole index, for layers whose window indices are the same tensor, held with it)
                key = ("hca_idx", self.ratio, n_entries, offset, id(window_idx))
                idx = ctx.shared(key, lambda: (window_idx, torch.cat(
                    (window_idx, _hca_entry_slots(ctx, self.ratio, n_entries, offset)), dim=-1)))[1]

        scale = self.head_dim**-0.5
        # [B,S,H,D], its rope dims rotated back (the values carried their keys' rotation)
        o = kernels.sparse_attn(q, kv_rows, idx, self.attn_sink, scale, cos, sin)
        if pending is not None:  # the chunk's tokens take their ring slots now that the ring has been read
            cache.write_window_slots(*pending)
        if self.ratio == CSA_RATIO and ctx.trace is not None:
            with torch.no_grad():
                logits = _slot_logits(q, concat_rows(kv_rows), idx) * scale
                logits = logits.to(torch.float32).masked_fill((idx < 0).unsqueeze(2), float("-inf"))
            chosen = idx[..., window_idx.shape[-1]:]  # [B,S,k] the indexer's selection
            ctx.trace.indexer_losses.append(
                indexer_kl_loss(logits, self.attn_sink.detach(), window_idx.shape[-1], chosen, index_scores,
                                queries=torch.arange(seqlen, device=x.device) < ctx.lengths.unsqueeze(1)))

        # grouped output projection: each group of H/G heads -> o_lora_rank, then wo_b. The official einsum
        # "bsgd,grd->bsgr" as the batched product over the groups it reduces to (what einsum itself runs, less
        # its parsing and permutes: a third of the projection's time in a decode step)
        o = o.reshape(bsz * seqlen, self.n_groups, -1).transpose(0, 1)  # [G, B*S, H*D/G]
        wo_a = self.wo_a.weight.view(self.n_groups, self.o_lora_rank, -1)  # [G, R, H*D/G]
        z = torch.bmm(o, wo_a.to(o.dtype).transpose(1, 2))  # [G, B*S, R]
        return self.wo_b(z.transpose(0, 1).reshape(bsz, seqlen, -1))

    def _window(self, raw_kv: Tensor, kv_norm: tuple, ctx: ForwardContext, cache: LayerCache
                ) -> tuple[list[KVRows], Tensor, tuple[Tensor, Tensor] | None]:
        """The window's runs of KV rows, each query's window indices into their concatenation [B, S, W'] (S < W
        slots for a prefill shorter than the window): oldest -> newest, then -1 for the slots before the
        sequence start (the official order, which decides the attention kernel's blocks of candidates), and a
        ring write left for after the attention (slots, rows), or None. The chunk's rows are raw_kv [B, S, D]
        through `kernels.norm_rope_qat(raw_kv, *kv_norm)`.

        A decode step whose ring gives its rows back exactly (as they are, or through a lossless codec) writes the
        token first (normed straight into the ring where the ring is a store destination: one op) and runs on the
        ring alone [B, W, D]. A verify step's few tokens (at most W, every row
        appending them) run on the ring as it is (decoded, under a codec) and the chunk, [B, W, D] and [B, S, D],
        and take their slots once the ring has been read. Otherwise the ring's rows in position order and the chunk
        are one run [B, W+S, D]."""
        W = self.window
        slots = ctx.shared(("slots", W), lambda: ctx.positions % W)  # [B,S] each token's ring slot
        same_form = cache.codec is None and cache.window.dtype == raw_kv.dtype
        # the ring gives back the token's row as written: it may be stored before the ring is read
        lossless = same_form or (cache.codec is not None and cache.codec.round_trips(raw_kv.dtype, ctx.exact))
        if ctx.appends == 1 and lossless:
            dest = cache.window_destination()
            if dest is not None:
                kernels.norm_rope_store(raw_kv, *kv_norm, dest, None, slots)
            else:
                cache.write_window_slots(slots, kernels.norm_rope_qat(raw_kv, *kv_norm).detach())
            return [cache.window_rows()], ctx.shared(("window1", W), lambda: _one_token_window(W, ctx)), None
        kv = kernels.norm_rope_qat(raw_kv, *kv_norm)
        in_place = 0 < ctx.appends <= W
        if in_place and (same_form or cache.codec is not None):
            idx = ctx.shared(("window_ring", W), lambda: _ring_window_indices(W, kv.shape[1], ctx))
            return [cache.window_rows(), kv], idx, (slots, kv.detach())
        ring_slots, idx, keep = ctx.shared(("window", W),
                                           lambda: _window_indices(W, kv.shape[1], ctx, rewrite=not in_place))
        # every row feeds more tokens than the ring holds: its last W take every slot, a slot each
        overwrite = ctx.appends > W
        if ctx.fresh:  # no slot names a ring row (they hold positions before 0): the chunk's rows alone
            idx, keep = ctx.shared(("window_fresh", W), lambda: _without_ring(W, idx, keep))
            if in_place or overwrite:
                cache.write_window_slots(slots[:, -W:], kv[:, -W:].detach())
            elif keep is not None:
                cache.write_window(gather_rows(kv, keep).detach())
            return [kv], idx, None
        ext_kv = torch.cat((gather_rows(cache.read_window(), ring_slots).to(kv.dtype), kv), dim=1)
        if in_place or overwrite:
            cache.write_window_slots(slots[:, -W:], kv[:, -W:].detach())
        elif keep is not None:
            cache.write_window(gather_rows(ext_kv, keep).detach())
        return [ext_kv], idx, None


def _hca_entry_slots(ctx: ForwardContext, ratio: int, n_entries: int, offset: int) -> Tensor:
    """An HCA layer's entry slots [B, S, N] after its window's: entry n (row offset + n of the runs) where it is
    complete at the query's position (n < (p + 1) // ratio), else -1."""
    n = torch.arange(n_entries, device=ctx.positions.device)
    visible = n < torch.div(ctx.positions + 1, ratio, rounding_mode="floor").unsqueeze(-1)
    return torch.where(visible, n + offset, -1)


# the most bytes of scores [B, s, H, N] one block of queries computes in `_slot_logits`
SLOT_SCORES_BYTES = 16 << 20


def _slot_logits(q: Tensor, rows: Tensor, idx: Tensor) -> Tensor:
    """Each query's unscaled logits over its slots, q [B,S,H,D] . rows [B,N,D] at idx [B,S,K] -> [B,S,H,K] (-1 slots:
    any row's). While the rows are few next to the slots (H * N <= K * D: a training chunk over its own window and
    entries) each block of queries scores every row with one GEMM and picks its slots' scores; otherwise the slots'
    rows are gathered, K * D values a query."""
    b, s, h, d = q.shape
    n, k = rows.shape[1], idx.shape[-1]
    slots = idx.clamp_min(0)
    if h * n > k * d:
        return torch.einsum("bshd,bskd->bshk", q, gather_rows(rows, slots))
    block = max(1, SLOT_SCORES_BYTES // max(1, b * h * n * q.element_size()))
    rows_t = rows.to(q.dtype).transpose(1, 2)  # [B, D, N]
    picked = []
    for lo in range(0, s, block):
        hi = min(s, lo + block)
        scores = torch.bmm(q[:, lo:hi].reshape(b, -1, d), rows_t).view(b, hi - lo, h, n)
        picked.append(scores.gather(3, slots[:, lo:hi].unsqueeze(2).expand(-1, -1, h, -1)))
    return torch.cat(picked, dim=1)


def _one_token_window(W: int, ctx: ForwardContext) -> Tensor:
    """A decode step's window read from the ring once the token is in it: its ring slots [B,1,W], oldest -> newest,
    then -1 for the slots before the sequence start (the order `_window_indices` gives, over the same rows)."""
    pos = ctx.start.unsqueeze(1)  # [B,1] the token's position
    # slot j names position q = max(pos - W + 1, 0) + j while j <= pos (q <= pos, the same test: q = j below W - 1)
    q = (pos - (W - 1)).clamp_(min=0) + torch.arange(W, device=pos.device)  # [B,W]
    idx = (q % W).masked_fill_(q > pos, -1).unsqueeze(1)  # [B,1,W]
    if W > 1 and ctx.fresh:
        idx = idx[..., :1]  # a one-token prefill has one window slot, as in `_window_indices`
    return idx


def _ring_window_indices(W: int, seqlen: int, ctx: ForwardContext) -> Tensor:
    """`_window_indices`' window rows [B,S,W'] over the ring as it is and the chunk [ring | chunk] instead of the
    ring in position order and the chunk: the same slots, naming the same rows. Slot j of the query at position p
    names position q = max(p - W + 1, 0) + j while q <= p: ring slot q % W before the chunk's start, chunk row
    q - start after it (row W + q - start of ring + chunk), then -1."""
    q = (ctx.positions.unsqueeze(-1) - (W - 1)).clamp(min=0) + torch.arange(W, device=ctx.positions.device)
    start = ctx.start.view(-1, 1, 1)
    rows = torch.where(q < start, q % W, q - start + W)
    idx = torch.where(q <= ctx.positions.unsqueeze(-1), rows, -1)  # [B,S,W]
    if seqlen < W and ctx.fresh:
        idx = idx[..., :seqlen]  # a prefill shorter than the window has only seqlen window slots
    return idx


def _without_ring(W: int, idx: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """`_window_indices`' window rows and kept rows over the chunk alone, for a chunk every row of which starts at
    position 0: the ring's W rows (positions before 0) are named by no slot, so row W + i of ring + chunk is chunk
    row i; a kept ring row (a sequence shorter than W) keeps chunk row 0 instead, a slot no read reaches."""
    return torch.where(idx >= 0, idx - W, -1), None if keep is None else (keep - W).clamp(min=0)


def _window_indices(W: int, seqlen: int, ctx: ForwardContext, rewrite: bool
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """What `Attention._window` indexes with, the same for every layer of a forward: the ring slots holding
    positions start-W .. start-1 [B,W], each query's window rows of ring + chunk [B,S,W'], and (when the chunk
    is kept and `rewrite`) the ring + chunk rows the ring keeps afterwards [B,W]."""
    device = ctx.positions.device
    start = ctx.start.unsqueeze(1)
    ring_pos = start - W + torch.arange(W, device=device)  # [B,W]
    slot = torch.arange(W, device=device)
    missing = (W - 1 - ctx.positions).clamp(min=0).unsqueeze(-1)  # [B,S,1] window slots before position 0
    rel = torch.arange(seqlen, device=device).view(1, -1, 1) + 1 + slot + missing  # ext row of slot
    idx = torch.where(slot < W - missing, rel, -1)  # [B,S,W]
    if seqlen < W and ctx.fresh:
        idx = idx[..., :seqlen]  # a prefill shorter than the window has only seqlen window slots
    keep = None
    if ctx.persist and rewrite:
        end = (ctx.start + ctx.lengths).unsqueeze(1)
        pos = end - W + (slot - (end - W)) % W  # [B,W] position now owning each slot
        keep = pos - (start - W)
    return ring_pos % W, idx, keep

