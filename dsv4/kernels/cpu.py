"""The CPU kernel backend: the reference arithmetic with far fewer torch ops per step.

On the CPU a small model's step is overhead, not arithmetic: every torch op costs a microsecond or two before it
touches a number, and the reference spends tens of ops where one would do (dtype round trips of the FP8/FP4
simulation, a weight decoded on every call, a Python loop over experts with a mask per expert, every paged row
decoded for every query). This backend computes what the reference computes, in the same rounding order where
the order decides the bits (see each op), so its results are the reference's:

* **block quantisation** (`act_quant`, `fp8_simulate`, `fp4_simulate`): the power-of-two scale straight from
  the fp32 bit pattern (round the mantissa up into the exponent) instead of frexp / where / ldexp, and the e2m1
  rounding as one round-to-even on a power-of-two step instead of encode + table decode. Elementwise exact.
* **FP8 / FP4 GEMMs**: the weight's element values and block scales are decoded once and kept
  (`DecodedWeights`, bounded by ``$DSV4_DECODED_WEIGHTS_MB``, default 2048; past it a weight is decoded per
  call as the reference does); the per-block partial products are one batched matmul over the blocks, with
  the weight blocks laid out as the reference slices them (the partials are bit-identical), summed in block
  order.
* **routed experts**: tokens sorted by expert once; experts with quantised weights run on their contiguous rows
  with one activation quantisation shared by w1 and w3 (the same row groups as the reference, so the same
  GEMM shapes and bits); float experts (plain numerics, training) run as one batched GEMM per projection over
  the experts' stacked weights when the step is small (decode), else on their contiguous rows.
* **sparse attention**: only the rows the indices name are read (paged entries are decoded row by row from the
  pool, never page by page), every 64-slot block's logits and value products in one batched op each, and the
  official online-softmax combination across blocks in block order.
* **Sinkhorn**: the same sequence of row and column normalisations, in place on one buffer.

Ops this backend does not override are the reference's. Everything here runs on any device torch runs on, but
the dispatcher picks it for CPU tensors (`dsv4.kernels`, "auto").
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4.quant import (
    ACT_AMAX_FLOOR,
    FP4_AMAX_FLOOR,
    FP4_BLOCK,
    FP4_MAX,
    FP8_BLOCK,
    FP8_MAX,
    INDEXER_SIM_BLOCK,
    KV_SIM_BLOCK,
    e2m1_decode,
    e8m0_to_float,
    merge_blocks,
    split_blocks,
    unpack_fp4,
)

from .experts import ExpertWeights
from .paged import KVRows, PagedRows
from .reference import ATTN_BLOCK, ReferenceBackend, compute_dtype, flatten_tokens

CACHE_ENV_VAR = "DSV4_DECODED_WEIGHTS_MB"
DEFAULT_CACHE_MB = 2048
# float experts run as one batched GEMM over per-row gathered weights up to this many routed rows
GATHER_ROWS = 64

_MANTISSA = 0x007FFFFF
_EXPONENT = 0x7F800000


def _pow2_ceil(ratio: Tensor) -> Tensor:
    """2**ceil(log2(ratio)) for positive normal fp32 ratios, read off the bit pattern: adding a full mantissa
    carries into the exponent unless the mantissa is already 0 (an exact power of two). Clamped to the e8m0
    range like `dsv4.quant.pow2_scale`, which it equals on every ratio the quantisers form (their amax floors
    keep the ratio at or above the smallest normal)."""
    bits = ratio.view(torch.int32).add(_MANTISSA).bitwise_and_(_EXPONENT)
    return bits.view(torch.float32).clamp_(2.0**-127, 2.0**127)


def _block_scales(blocks: Tensor, floor: float, elem_max: float) -> Tensor:
    """The per-block power-of-two scale [..., nb] of fp32 blocks [..., nb, block]."""
    amax = torch.linalg.vector_norm(blocks, ord=float("inf"), dim=-1).clamp_(min=floor)
    return _pow2_ceil(amax.mul_(1.0 / elem_max))


def _e2m1_round(v: Tensor) -> Tensor:
    """Values |v| <= 6 (already divided by their scale) rounded to the e2m1 grid, ties to even, saturating at
    ±6, sign kept (-0.0 included): the grid's step is 0.5 below 2, then the leading power of two over 2, so
    one round-half-even of v/step lands on the even code exactly where `e2m1_encode` does."""
    mag = v.abs().clamp_(max=FP4_MAX)
    step = (mag.view(torch.int32) & _EXPONENT).view(torch.float32).mul_(0.5).clamp_(min=0.5)
    return torch.copysign(mag.div_(step).round_().mul_(step), v)


class DecodedWeights:
    """Element values (fp32) and per-block scales (fp32) of FP8 / packed FP4 weights, decoded once per weight.

    Kept per weight tensor (by identity, checked with a weak reference) and dropped when the weight is freed or
    modified in place (its version counter moves). Bounded by `limit_bytes`: a weight that does not fit is
    decoded for its call only, so memory never grows past the bound and the results are the same either way."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._entries: dict[int, tuple] = {}

    def get(self, weight: Tensor, scale: Tensor, fp4: bool) -> tuple[Tensor, Tensor]:
        """(values [N, K] fp32 unscaled, scales [N, K/block] fp32), block 128 (FP8) or 32 (FP4)."""
        key = id(weight)
        entry = self._entries.get(key)
        version = _version(weight), _version(scale)
        if entry is not None and entry[0]() is weight and entry[1]() is scale and entry[2] == version:
            return entry[3], entry[4]
        values, scales = _decode(weight, scale, fp4)
        size = values.numel() * 4 + scales.numel() * 4
        if entry is not None:
            self._drop(key)
        if self.used_bytes + size <= self.limit_bytes:
            self._entries[key] = (weakref.ref(weight, lambda _, k=key: self._drop(k)), weakref.ref(scale), version,
                                  values, scales, size)
            self.used_bytes += size
        return values, scales

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used_bytes -= entry[5]

    def clear(self) -> None:
        self._entries.clear()
        self.used_bytes = 0


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter and cannot change outside inference mode
        return -1


def _decode(weight: Tensor, scale: Tensor, fp4: bool) -> tuple[Tensor, Tensor]:
    if fp4:
        return e2m1_decode(unpack_fp4(weight)), e8m0_to_float(scale)
    n = weight.shape[0]
    return weight.float(), e8m0_to_float(scale).repeat_interleave(FP8_BLOCK, dim=0)[:n]


def _block_gemm(x: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor, block: int) -> Tensor:
    """The reference's two-level accumulation ``sum_b (x_b @ w_b^T) * x_scale[:, b] * w_scale[:, b]`` in block
    order, with all block products in one batched matmul when K is a whole number of blocks. x [M, K],
    w [N, K] unscaled fp32; x_scale [M, nb], w_scale [N, nb]."""
    m, k = x.shape
    n = w.shape[0]
    nb = -(-k // block)
    if k % block or nb == 1:
        acc = None
        for b in range(nb):
            cols = slice(b * block, (b + 1) * block)
            term = (x[:, cols] @ w[:, cols].T) * (x_scale[:, b : b + 1] * w_scale[:, b].unsqueeze(0))
            acc = term if acc is None else acc.add_(term)
        return acc
    # [nb, M, block] @ [nb, block, N]: w viewed block-major and transposed, the layout of w[:, cols].T
    partial = torch.bmm(x.view(m, nb, block).transpose(0, 1), w.view(n, nb, block).transpose(0, 1).transpose(1, 2))
    partial.mul_(x_scale.T.unsqueeze(-1) * w_scale.T.unsqueeze(1))  # [nb, M, N]
    acc = partial[0]  # added block by block: torch's sum over the blocks may pair them up, for some N
    for b in range(1, nb):
        acc.add_(partial[b])
    return acc


class CpuBackend(ReferenceBackend):
    """The reference's arithmetic with fewer ops; see the module docstring."""

    name = "cpu"

    def __init__(self, cache_mb: int | None = None) -> None:
        if cache_mb is None:
            cache_mb = int(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_MB)
        self.decoded = DecodedWeights(cache_mb << 20)
        self._stacks: dict[tuple[int, str], tuple] = {}

    # ------------------------------------------------------------------------------------------ quantisation

    def act_quant(self, x: Tensor, block_size: int = FP8_BLOCK) -> tuple[Tensor, Tensor]:
        blocks = split_blocks(x, block_size)
        scale = _block_scales(blocks, ACT_AMAX_FLOOR, FP8_MAX)
        q = (blocks / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return merge_blocks(q, x.shape[-1]), scale

    def fp8_simulate(self, x: Tensor, block_size: int = KV_SIM_BLOCK) -> Tensor:
        blocks = split_blocks(x, block_size)
        scale = _block_scales(blocks, ACT_AMAX_FLOOR, FP8_MAX).unsqueeze(-1)
        q = (blocks / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return merge_blocks(q.float().mul_(scale), x.shape[-1]).to(x.dtype)

    def fp4_simulate(self, x: Tensor, block_size: int = INDEXER_SIM_BLOCK) -> Tensor:
        blocks = split_blocks(x, block_size)
        scale = _block_scales(blocks, FP4_AMAX_FLOOR, FP4_MAX).unsqueeze(-1)
        return merge_blocks(_e2m1_round(blocks / scale).mul_(scale), x.shape[-1]).to(x.dtype)

    # ------------------------------------------------------------------------------------------ GEMMs

    def fp8_gemm(self, xq: Tensor, xs: Tensor, w: Tensor, ws: Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
        x, x_scale = flatten_tokens(xq, xs)
        values, w_scale = self.decoded.get(w, ws, fp4=False)
        acc = _block_gemm(x, x_scale, values, w_scale, FP8_BLOCK)
        return acc.to(out_dtype).reshape(*xq.shape[:-1], w.shape[0])

    def fp4_gemm(self, xq: Tensor, xs: Tensor, w: Tensor, ws: Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
        x, x_scale = flatten_tokens(xq, xs)
        values, w_scale = self.decoded.get(w, ws, fp4=True)
        if values.shape[1] != x.shape[1]:
            raise ValueError(f"fp4_gemm: activation K={x.shape[1]} but packed weight holds K={values.shape[1]}")
        x_scale = x_scale.repeat_interleave(FP8_BLOCK // FP4_BLOCK, dim=1)[:, : x.shape[1] // FP4_BLOCK]
        acc = _block_gemm(x, x_scale, values, w_scale, FP4_BLOCK)
        return acc.to(out_dtype).reshape(*xq.shape[:-1], values.shape[0])

    # ------------------------------------------------------------------------------------------ experts

    def routed_experts(self, x: Tensor, weights: Tensor, ids: Tensor, experts: Sequence[ExpertWeights | None],
                       which: Sequence[int], limit: float) -> Tensor:
        """As the reference. The routed rows are sorted by expert once (a stable sort keeps each expert's rows in
        token order: the reference's row groups, so the same GEMM shapes and bits), and each token's outputs are
        added in increasing expert id, the reference's order of additions. Training (gradients wanted) runs the
        reference, whose zero-row experts keep expert-parallel gradients whole."""
        if not which or torch.is_grad_enabled() and (x.requires_grad or experts[which[0]].w1.requires_grad):
            return super().routed_experts(x, weights, ids, experts, which, limit)
        t, k = ids.shape
        flat = ids.flatten()
        order = torch.sort(flat, stable=True).indices  # routed rows grouped by expert, token order inside
        counts = torch.bincount(flat, minlength=len(experts)).tolist()
        starts = [0] * len(counts)
        for e in range(1, len(counts)):
            starts[e] = starts[e - 1] + counts[e - 1]
        which = [e for e in which if counts[e]]
        if len(which) < len(counts) - counts.count(0):  # some routed rows belong to experts run elsewhere
            keep = torch.cat([order[starts[e] : starts[e] + counts[e]] for e in which])
        else:
            keep = order
        tokens = torch.div(keep, k, rounding_mode="floor")
        rows_x = x.index_select(0, tokens)  # [R, d]
        rows_w = weights.flatten().index_select(0, keep).unsqueeze(-1)  # [R, 1] fp32
        sizes = [counts[e] for e in which]
        if experts[which[0]].w1.is_floating_point() and keep.numel() <= GATHER_ROWS:
            out = self._gathered_swiglu(rows_x, rows_w, experts, which, sizes, limit)
        else:
            outs, lo = [], 0
            for e, n in zip(which, sizes, strict=True):
                outs.append(self.swiglu(rows_x[lo : lo + n], experts[e], limit, rows_w[lo : lo + n]))
                lo += n
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
        # back to the (token, slot) places, zero where another rank's expert was chosen
        per_slot = torch.zeros(t * k, x.shape[-1], dtype=torch.float32, device=x.device)
        per_slot[keep] = out.to(torch.float32)
        if k == 1:
            return per_slot
        per_slot = per_slot.view(t, k, -1)
        if k > 2:  # a sum of two is the same either way round; longer ones go in increasing expert id
            by_id = ids.argsort(dim=1, stable=True)
            per_slot = per_slot.gather(1, by_id.unsqueeze(-1).expand_as(per_slot))
        y = per_slot[:, 0] + per_slot[:, 1]
        for slot in range(2, k):
            y.add_(per_slot[:, slot])
        return y

    def swiglu(self, x: Tensor, expert: ExpertWeights, limit: float, weights: Tensor | None = None) -> Tensor:
        """As the reference, with one activation quantisation for w1 and w3 (they read the same x)."""
        if expert.w1.is_floating_point() or expert.w3.is_floating_point():
            return super().swiglu(x, expert, limit, weights)
        xq, xs = self.act_quant(x)
        gemm1 = self.fp8_gemm if expert.w1.dtype == torch.float8_e4m3fn else self.fp4_gemm
        gemm3 = self.fp8_gemm if expert.w3.dtype == torch.float8_e4m3fn else self.fp4_gemm
        gate = gemm1(xq, xs, expert.w1, expert.s1, x.dtype).to(torch.float32).clamp_(max=limit)
        up = gemm3(xq, xs, expert.w3, expert.s3, x.dtype).to(torch.float32).clamp_(-limit, limit)
        hidden = F.silu(gate) * up
        if weights is not None:
            hidden = weights * hidden
        return self.linear(hidden.to(x.dtype), expert.w2, expert.s2)

    def _gathered_swiglu(self, x: Tensor, w: Tensor, experts: Sequence[ExpertWeights | None], which: list[int],
                         sizes: list[int], limit: float) -> Tensor:
        """Float experts over a few routed rows: each row's expert weights gathered from the experts' stacked
        weights, and one batched GEMM per projection."""
        expert_of_row = torch.repeat_interleave(torch.tensor(which, device=x.device),
                                                torch.tensor(sizes, device=x.device))
        w1, w3, w2 = (self._stack(experts, which, name).index_select(0, expert_of_row) for name in ("w1", "w3", "w2"))
        xr = x.to(w1.dtype).unsqueeze(1)  # [R, 1, d]
        gate = torch.bmm(xr, w1.transpose(1, 2)).squeeze(1).to(torch.float32).clamp_(max=limit)
        up = torch.bmm(xr, w3.transpose(1, 2)).squeeze(1).to(torch.float32).clamp_(-limit, limit)
        hidden = (w * (F.silu(gate) * up)).to(x.dtype)
        return torch.bmm(hidden.to(w2.dtype).unsqueeze(1), w2.transpose(1, 2)).squeeze(1).to(x.dtype)

    def _stack(self, experts: Sequence[ExpertWeights | None], which: list[int], name: str) -> Tensor:
        """The float weights `name` of every expert as one [E, N, K] tensor (zeros for experts held elsewhere),
        kept per expert table; the experts about to run are checked (identity and version of their weight) and
        re-copied if they changed."""
        key = (id(experts), name)
        entry = self._stacks.get(key)
        if entry is None or entry[0]() is not experts:
            tensors = [getattr(e, name) if e is not None else None for e in experts]
            first = next(t for t in tensors if t is not None)
            stacked = torch.stack([t if t is not None else torch.zeros_like(first) for t in tensors])
            stamps = [(id(t), _version(t)) if t is not None else None for t in tensors]
            try:
                owner = weakref.ref(experts)
            except TypeError:  # a plain list: stacked for this call only
                return stacked
            entry = self._stacks[key] = (owner, stacked, stamps)
        _, stacked, stamps = entry
        for e in which:
            t = getattr(experts[e], name)
            if stamps[e] != (id(t), _version(t)):
                stacked[e].copy_(t)
                stamps[e] = (id(t), _version(t))
        return stacked

    # ------------------------------------------------------------------------------------------ attention

    def sparse_attn(self, q: Tensor, kv: Tensor | Sequence[KVRows], idx: Tensor, sink: Tensor,
                    scale: float) -> Tensor:
        """As the reference: the rows idx names are gathered once (dense runs by index, paged runs row by row
        from the pool, decoded after the gather), then per 64-slot block the same fp32 logits, shifts and
        unnormalised bf16-rounded probabilities, each block's value product in one batched einsum, and the
        blocks folded into the running sum and accumulator in block order."""
        rows = _gather_kv(kv, idx)  # [B, S, K, D] in the first run's dtype
        kv_dtype = rows.dtype
        acc = compute_dtype(q, rows, sink)
        b, s, h, d = q.shape
        n_slots = idx.shape[-1]
        if n_slots == 0:
            return torch.zeros_like(q)
        blocks = -(-n_slots // ATTN_BLOCK)
        pad = blocks * ATTN_BLOCK - n_slots
        valid = idx >= 0
        rows = rows.to(acc)
        if pad:
            rows = F.pad(rows, (0, 0, 0, pad))
            valid = F.pad(valid, (0, pad))
        logits = torch.einsum("bshd,bskd->bshk", q.to(acc), rows).mul_(scale)  # [B, S, H, nb*64]
        logits.masked_fill_(~valid.unsqueeze(2), float("-inf"))
        logits = logits.view(b, s, h, blocks, ATTN_BLOCK)
        run_max = logits.amax(dim=-1).cummax(dim=-1).values.detach()  # [B, S, H, nb] running max after block i
        shift = torch.where(run_max.isfinite(), run_max, torch.zeros_like(run_max))
        p = torch.exp(logits - shift.unsqueeze(-1))
        block_sum = p.sum(dim=-1)  # [B, S, H, nb]
        if kv_dtype != acc:
            p = p.to(kv_dtype).to(acc)
        block_out = torch.einsum("bshnk,bsnkd->bshnd", p, rows.view(b, s, blocks, ATTN_BLOCK, d))
        # fold: denom = denom * exp(m_prev - m) + sum_i, out likewise; m_prev starts at -inf
        denom, out = block_sum[..., 0], block_out[..., 0, :]
        for i in range(1, blocks):
            rescale = torch.exp(run_max[..., i - 1] - shift[..., i])
            denom = denom * rescale + block_sum[..., i]
            out = out * rescale.unsqueeze(-1) + block_out[..., i, :]
        final = run_max[..., -1]
        sink_logit = sink.to(acc).view(1, 1, -1).expand(b, s, h)
        last_shift = torch.where(final.isfinite(), final, sink_logit.detach())
        denom = denom + torch.exp(sink_logit - last_shift)
        return (out / denom.unsqueeze(-1)).to(q.dtype)

    # ------------------------------------------------------------------------------------------ mHC

    def hc_split_sinkhorn(self, mixes: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int,
                          eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """As the reference, the normalisations in place on one buffer (the same divisions in the same order)."""
        h = hc_mult
        if mixes.shape[-1] != (2 + h) * h or iters < 1 or mixes.requires_grad or torch.is_grad_enabled():
            return super().hc_split_sinkhorn(mixes, scale, base, hc_mult, iters, eps)
        acc = compute_dtype(mixes, scale, base)
        m, scale, base = mixes.to(acc), scale.to(acc), base.to(acc)
        pre = torch.sigmoid(m[..., :h] * scale[0] + base[:h]).add_(eps)
        post = torch.sigmoid(m[..., h : 2 * h] * scale[1] + base[h : 2 * h]).mul_(2.0)
        comb = (m[..., 2 * h :] * scale[2] + base[2 * h :]).unflatten(-1, (h, h))
        comb = torch.exp(comb - comb.amax(dim=-1, keepdim=True))
        sums = comb.sum(dim=-1, keepdim=True)
        comb.div_(sums).add_(eps)
        col = torch.sum(comb, dim=-2, keepdim=True)
        comb.div_(col.add_(eps))
        for _ in range(iters - 1):
            torch.sum(comb, dim=-1, keepdim=True, out=sums)
            comb.div_(sums.add_(eps))
            torch.sum(comb, dim=-2, keepdim=True, out=col)
            comb.div_(col.add_(eps))
        return pre, post, comb


def _gather_kv(kv: Tensor | Sequence[KVRows], idx: Tensor) -> Tensor:
    """The rows [B, S, K, D] that idx [B, S, K] names in the concatenation of the runs (-1: any row, masked
    later), in the first run's dtype; paged runs are read row by row from their pool and decoded after."""
    runs = [kv] if isinstance(kv, Tensor) else list(kv)
    b = idx.shape[0]
    flat = idx.reshape(b, -1)  # [B, S*K]
    out = None
    lo = 0
    dtype = runs[0].dtype
    for run in runs:
        n = run.shape[1] if isinstance(run, Tensor) else run.count
        if n == 0:
            continue
        inside = (flat >= lo) & (flat < lo + n)
        local = torch.where(inside, flat - lo, 0)
        if isinstance(run, Tensor):
            got = torch.gather(run, 1, local.unsqueeze(-1).expand(-1, -1, run.shape[-1]))
        else:
            got = _paged_rows(run, local)
        got = got.to(dtype)
        out = got if out is None else torch.where(inside.unsqueeze(-1), got, out)
        lo += n
    if out is None:  # no rows at all: every index is -1
        return torch.zeros(*idx.shape, runs[0].shape[-1], dtype=dtype, device=idx.device)
    return out.view(*idx.shape, -1)


def _paged_rows(run: PagedRows, local: Tensor) -> Tensor:
    """Rows `local` [B, M] of each batch row of a paged run, decoded: [B, M, D]."""
    per_page = run.rows_per_page
    page = run.table.gather(1, torch.div(local, per_page, rounding_mode="floor").clamp_(max=run.table.shape[1] - 1))
    stored = run.pool.view(-1, run.pool.shape[-1]).index_select(0, (page * per_page + local % per_page).flatten())
    stored = stored.view(*local.shape, -1)
    return stored if run.codec is None else run.codec.decode(stored)
