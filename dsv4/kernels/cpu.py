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
  GEMM shapes and bits); float experts (plain numerics) run as one batched GEMM per projection over all
  experts' stacked weights (kept while the weights are unchanged), each expert's rows padded to the largest
  group, when most experts run (a batch, a prefill) and the routing is not so skewed that padding dominates.
* **sparse attention**: over rows in a narrower dtype than the compute (bf16 models), the reference's 64-slot
  blocks: the rows the indices name gathered once, every block's logits and value products in one batched op
  each, and the official online-softmax combination across blocks in block order (bit-equal). Over fp32 rows,
  where rounding the probabilities changes nothing and the blocks only order fp32 sums, one softmax: a prefill
  chunk, 64 queries at a time, scores the rows they name with one GEMM (each row weighted by the number of slots
  naming it, exp's arguments floored where its results are below fp32's resolution of the sum), a decode reads
  only the rows it names (paged entries row by row from the pool, never page by page). Differentiable, so
  training uses it.
* **Sinkhorn**: the same sequence of row and column normalisations, in place on one buffer (token-minor for
  many tokens, so each sum runs over contiguous rows).
* **the head**: a vocabulary-sized float projection multiplies a kept transposed copy of its weight; its
  cross-entropy in training runs a block of rows at a time (`cross_entropy.py`).

Ops this backend does not override are the reference's. Everything here runs on any device torch runs on, but
the dispatcher picks it for CPU tensors (`dsv4.kernels`, "auto").
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Sequence
from functools import partial

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

from .cross_entropy import IGNORE_INDEX, chunked_head_cross_entropy, torch_rows
from .experts import ExpertWeights, add_routed_rows, group_routed_rows
from .paged import KVRows, PagedRows, concat_rows, gather_rows
from .reference import ATTN_BLOCK, ReferenceBackend, compute_dtype, flatten_tokens, plus_rounded

CACHE_ENV_VAR = "DSV4_DECODED_WEIGHTS_MB"
DEFAULT_CACHE_MB = 2048
# float experts run as one batched GEMM over every expert, rows padded to the largest group, when at least half
# the experts run and the padded rows number at most this many times the routed ones; else expert by expert
# (reading every expert's weights to use two of them costs more than the ops it saves)
PAD_WASTE = 4
# fp32 attention over a chunk scores every row with one GEMM per block of this many queries (the block's band of
# window rows and the compressed entries; small preset, batch 1: 22 -> 15 ms per prefill's attention from blocks of
# 120, with the exp clamp), while a block's score slab stays under DENSE_SCORES_BYTES
DENSE_QUERY_BLOCK = 64
DENSE_SCORES_BYTES = 256 << 20
DENSE_ROWS_PER_SLOT = 8
# the smallest argument `_dense_softmax` hands to exp: exp(-87) is fp32's smallest normal order of magnitude
EXP_FLOOR = -87.0
# its training forward's (`_DenseSoftmax`): the weights then stay normal when the backward multiplies them
TRAIN_EXP_FLOOR = -60.0
# attention over a prefill chunk runs in blocks of queries whose gathered rows and scores stay under this: about
# what the caches hold, so the products read the rows the gather just wrote from cache, not memory (small preset,
# bf16 rows, 256 queries: 15 -> 6 ms at batch 1 and 100 -> 37 ms at batch 8 from 64 MiB; 4 MiB is slower again)
GATHER_BYTES = 12 << 20
# Sinkhorn over at least this many tokens runs on token-minor matrices (bit-equal from 3 tokens up on this build)
SINKHORN_TOKEN_MINOR = 16
# float projections with at least this many outputs (vocabularies) use a transposed copy of their weight
VOCAB_ROWS = 32768

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
    """Forms of weights worth computing once: the element values (fp32) and per-block scales (fp32) of FP8 /
    packed FP4 weights, and the transposed copy of a vocabulary projection.

    Kept per weight tensor (by identity, checked with a weak reference) and dropped when the weight is freed or
    modified in place (its version counter moves). Bounded by `limit_bytes`: a form that does not fit is built
    for its call only, so memory never grows past the bound and the results are the same either way."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._entries: dict[tuple[int, str], tuple] = {}
        # kind -> (weight, scale) -> the form's tensors; a backend deriving from this one may add its own kinds
        self.builders = dict(_BUILD)

    def get(self, weight: Tensor, scale: Tensor | None, kind: str) -> tuple[Tensor, ...]:
        """The form `kind` of `weight` (with its `scale`): "fp8" / "fp4" -> (values [N, K] fp32 unscaled,
        scales [N, K/block] fp32), block 128 or 32; "transposed" -> (weight^T contiguous [K, N],)."""
        key = (id(weight), kind)
        entry = self._entries.get(key)
        version = _version(weight), None if scale is None else _version(scale)
        if (entry is not None and entry[0]() is weight and entry[1] == version
                and (scale is None or entry[2]() is scale)):
            return entry[3]
        form = self.builders[kind](weight, scale)
        size = sum(t.numel() * t.element_size() for t in form)
        if entry is not None:
            self._drop(key)
        if self.used_bytes + size <= self.limit_bytes:
            scale_ref = None if scale is None else weakref.ref(scale)
            self._entries[key] = (weakref.ref(weight, lambda _, k=key: self._drop(k)), version, scale_ref, form,
                                  size)
            self.used_bytes += size
        return form

    def keeps(self, weight: Tensor, kind: str, size: int) -> bool:
        """Whether the form `kind` of `weight` (`size` bytes) is kept, or would be: a form worth having only
        when kept (a copy of a whole vocabulary projection) is not built for one call."""
        entry = self._entries.get((id(weight), kind))
        return (entry is not None and entry[0]() is weight) or self.used_bytes + size <= self.limit_bytes

    def _drop(self, key: tuple[int, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used_bytes -= entry[4]


def _version(t: Tensor) -> int:
    # an inference tensor keeps no version counter (reading it raises, slowly) and cannot change outside
    # inference mode
    return -1 if t.is_inference() else t._version


_BUILD = {
    "fp8": lambda w, s: (w.float(), e8m0_to_float(s).repeat_interleave(FP8_BLOCK, dim=0)[: w.shape[0]]),
    "fp4": lambda w, s: (e2m1_decode(unpack_fp4(w)), e8m0_to_float(s)),
    "transposed": lambda w, s: (w.detach().T.contiguous(),),
}


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
        self._scored_widths: dict[int, bool] = {}  # `_scores_every_slot`'s findings by head width
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
        values, w_scale = self.decoded.get(w, ws, "fp8")
        acc = _block_gemm(x, x_scale, values, w_scale, FP8_BLOCK)
        return acc.to(out_dtype).reshape(*xq.shape[:-1], w.shape[0])

    def fp4_gemm(self, xq: Tensor, xs: Tensor, w: Tensor, ws: Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
        x, x_scale = flatten_tokens(xq, xs)
        values, w_scale = self.decoded.get(w, ws, "fp4")
        if values.shape[1] != x.shape[1]:
            raise ValueError(f"fp4_gemm: activation K={x.shape[1]} but packed weight holds K={values.shape[1]}")
        x_scale = x_scale.repeat_interleave(FP8_BLOCK // FP4_BLOCK, dim=1)[:, : x.shape[1] // FP4_BLOCK]
        acc = _block_gemm(x, x_scale, values, w_scale, FP4_BLOCK)
        return acc.to(out_dtype).reshape(*xq.shape[:-1], values.shape[0])

    def linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None,
               quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """As the reference; a float vocabulary projection (at least `VOCAB_ROWS` outputs: the head, which no
        quantisation follows) multiplies a kept transposed copy, about twice as fast for a few rows on this
        CPU's BLAS, unless gradients are wanted or the copy does not fit the decoded-weight cache."""
        if (weight.shape[0] >= VOCAB_ROWS and weight.is_floating_point()
                and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
                and self.decoded.keeps(weight, "transposed", weight.numel() * weight.element_size())):
            (transposed,) = self.decoded.get(weight, None, "transposed")
            return torch.matmul(x.to(weight.dtype), transposed).to(x.dtype)
        return super().linear(x, weight, scale, quantized)

    def head_cross_entropy(self, x: Tensor, weight: Tensor, targets: Tensor,
                           ignore_index: int = IGNORE_INDEX) -> Tensor:
        """As the reference, a block of rows at a time (`cross_entropy.ChunkedHeadCrossEntropy` over `torch_rows`):
        the loss and its gradients to fp32 rounding without every row's fp32 logits and their gradient held at
        once (forward and backward over 1,024 rows of V4's vocabulary at dim 256: 1.74 s instead of 1.84 here)."""
        if (x.dtype != torch.float64 and weight.dtype != torch.float64 and weight.is_floating_point()
                and weight.dim() == 2):
            return chunked_head_cross_entropy(x, weight, targets, ignore_index, torch_rows)
        return super().head_cross_entropy(x, weight, targets, ignore_index)

    # ------------------------------------------------------------------------------------------ experts

    def routed_experts(self, x: Tensor, weights: Tensor, ids: Tensor, experts: Sequence[ExpertWeights | None],
                       which: Sequence[int], limit: float, quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """As the reference. The routed rows are sorted by expert once (a stable sort keeps each expert's rows in
        token order: the reference's row groups, so the same GEMM shapes and bits), and each token's outputs are
        added in increasing expert id, the reference's order of additions. Training (gradients wanted) runs each
        expert on its slice of the sorted rows (`_trained_experts`). `quantized` is not read: each expert's rows
        are quantised as they are gathered (the same values)."""
        if not which:
            return super().routed_experts(x, weights, ids, experts, which, limit)
        if torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad
                                        or any(experts[e].w1.requires_grad for e in which)):
            return self._trained_experts(x, weights, ids, experts, list(which), limit)
        rows = group_routed_rows(ids, len(experts), list(which))
        if not rows.which:  # no token chose an expert held here
            return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        rows_x = x.index_select(0, rows.tokens)  # [R, d]
        rows_w = weights.flatten().index_select(0, rows.keep).unsqueeze(-1)  # [R, 1] fp32
        which, sizes = rows.which, rows.sizes
        kind = self._stacked_kind(rows_x, experts[which[0]])
        if (kind is not None and 2 * len(which) >= len(experts)
                and max(sizes) * len(experts) <= PAD_WASTE * rows.keep.numel()):
            out = self._padded_swiglu(rows_x, rows_w, experts, which, sizes, limit, kind)
        else:
            outs, lo = [], 0
            for e, n in zip(which, sizes, strict=True):
                outs.append(self.swiglu(rows_x[lo : lo + n], experts[e], limit, rows_w[lo : lo + n]))
                lo += n
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return add_routed_rows(out, rows, ids)

    def _trained_experts(self, x: Tensor, weights: Tensor, ids: Tensor, experts: Sequence[ExpertWeights | None],
                         which: list[int], limit: float) -> Tensor:
        """The reference's sum with gradients: the routed rows gathered once in expert order (one index_select, one
        index_add backward) instead of an indexing per expert (each an index_put into zeros the size of x in
        backward). Every expert in `which` runs, on no rows if none chose it: it still joins the autograd graph
        (expert-parallel gradients stay whole, see the reference)."""
        rows = group_routed_rows(ids, len(experts), which)
        size = dict(zip(rows.which, rows.sizes, strict=True))
        sizes = [size.get(e, 0) for e in which]
        # split, not sliced: one backward (a concatenation) instead of a zero-filled copy of all rows per expert
        rows_x = x.index_select(0, rows.tokens).split(sizes)  # [n_e, d] each
        rows_w = weights.flatten().index_select(0, rows.keep).unsqueeze(-1).split(sizes)  # [n_e, 1] fp32 each
        outs = [self.swiglu(part, experts[e], limit, w) for e, part, w in zip(which, rows_x, rows_w, strict=True)]
        return add_routed_rows(torch.cat(outs), rows, ids)

    def swiglu(self, x: Tensor, expert: ExpertWeights, limit: float, weights: Tensor | None = None,
               add: Tensor | None = None, quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """As the reference, with one activation quantisation for w1 and w3 (they read the same x)."""
        if add is not None:
            return plus_rounded(add, self.swiglu(x, expert, limit, weights, None, quantized))
        if expert.w1.is_floating_point() or expert.w3.is_floating_point():
            return super().swiglu(x, expert, limit, weights)
        xq, xs = self.act_quant(x) if quantized is None else quantized
        gemm1 = self.fp8_gemm if expert.w1.dtype == torch.float8_e4m3fn else self.fp4_gemm
        gemm3 = self.fp8_gemm if expert.w3.dtype == torch.float8_e4m3fn else self.fp4_gemm
        gate = gemm1(xq, xs, expert.w1, expert.s1, x.dtype).to(torch.float32).clamp_(max=limit)
        up = gemm3(xq, xs, expert.w3, expert.s3, x.dtype).to(torch.float32).clamp_(-limit, limit)
        hidden = F.silu(gate) * up
        if weights is not None:
            hidden = weights * hidden
        return self.linear(hidden.to(x.dtype), expert.w2, expert.s2)

    @staticmethod
    def _stacked_kind(x: Tensor, expert: ExpertWeights) -> str | None:
        """How `_padded_swiglu` stacks these experts ("float": their weights as they are), or None where the
        reference's per-expert chain must run (quantised weights: their per-block GEMMs)."""
        return "float" if expert.w1.is_floating_point() else None

    def _gemm_operand(self, rows: Tensor, kind: str, dtype: torch.dtype) -> Tensor:
        """Activation rows [R, K] (the model dtype) as the left operand of a GEMM with `kind` stacked weights."""
        return rows.to(dtype)

    def _padded_swiglu(self, x: Tensor, w: Tensor, experts: Sequence[ExpertWeights | None], which: list[int],
                       sizes: list[int], limit: float, kind: str = "float") -> Tensor:
        """Experts as one batched GEMM per projection over all experts' stacked weights (`_stack`): each expert's
        rows padded to the largest group (zeros, computed and dropped). x [R, d] grouped by expert, w [R, 1].
        Each projection's output is rounded to x's dtype, as the reference's linear returns it."""
        width = max(sizes)
        device = x.device
        group = torch.repeat_interleave(torch.tensor(which, device=device), torch.tensor(sizes, device=device))
        first = torch.repeat_interleave(torch.tensor([0] + sizes[:-1], device=device).cumsum(0),
                                        torch.tensor(sizes, device=device))
        dest = group * width + torch.arange(x.shape[0], device=device) - first  # [R] row in the padded layout
        w1, w3, w2 = self._stack(experts, which, kind)  # [E, K, N] each: the right operands of rows @ w

        def padded(rows: Tensor, weight: Tensor) -> Tensor:  # [R, K] -> [E, width, K], zeros between the groups
            rows = self._gemm_operand(rows, kind, weight.dtype)
            return rows.new_zeros(len(experts) * width, rows.shape[1]).index_copy_(0, dest, rows).view(
                len(experts), width, -1)

        operand = padded(x, w1)
        gate = torch.bmm(operand, w1).to(x.dtype).to(torch.float32).clamp_(max=limit)
        up = torch.bmm(operand, w3).to(x.dtype).to(torch.float32).clamp_(-limit, limit)
        hidden = F.silu(gate).mul_(up).view(-1, gate.shape[-1]).index_select(0, dest).mul_(w)  # [R, inter]
        out = torch.bmm(padded(hidden.to(x.dtype), w2), w2)  # [E, width, d]
        return out.view(-1, out.shape[-1]).index_select(0, dest).to(x.dtype)

    def _stack(self, experts: Sequence[ExpertWeights | None], which: list[int],
               kind: str = "float") -> tuple[Tensor, Tensor, Tensor]:
        """Every expert's w1, w3, w2 as the right operands of rows @ w, each one [E, K, N] tensor (zeros for experts
        held elsewhere): "float" the float weights transposed, another kind the weights' decoded form of that name
        (`DecodedWeights.builders`, [K, N] each). Kept per expert table and kind (a second copy of the expert
        weights); the experts about to run are checked (identity and version of their weights and scales) and
        stacked again if they changed."""
        def form(expert: ExpertWeights) -> tuple[Tensor, Tensor, Tensor]:
            pairs = ((expert.w1, expert.s1), (expert.w3, expert.s3), (expert.w2, expert.s2))
            if kind == "float":  # transposed copies: a batched GEMM reads [K, N] blocks ~1.5x faster than views
                return tuple(t.detach().T for t, _ in pairs)
            return tuple(self.decoded.builders[kind](t, scale)[0] for t, scale in pairs)

        def stamp(expert: ExpertWeights) -> tuple:
            tensors = (expert.w1, expert.s1, expert.w3, expert.s3, expert.w2, expert.s2)
            return tuple((id(t), _version(t)) for t in tensors if t is not None)

        key = (id(experts), kind)
        entry = self._stacks.get(key)
        if entry is None or entry[0]() is not experts:
            forms = [form(e) if e is not None else None for e in experts]
            first = next(f for f in forms if f is not None)
            stacked = tuple(torch.stack([f[i] if f is not None else torch.zeros_like(first[i]) for f in forms])
                            for i in range(3))
            stamps = [stamp(e) if e is not None else None for e in experts]
            try:
                owner = weakref.ref(experts, lambda _, k=key: self._stacks.pop(k, None))
            except TypeError:  # a plain list: stacked for this call only
                owner = None
            entry = (owner, stacked, stamps)
            if owner is not None:
                self._stacks[key] = entry
        _, stacked, stamps = entry
        for e in which:
            now = stamp(experts[e])
            if stamps[e] != now:
                for i, t in enumerate(form(experts[e])):
                    stacked[i][e].copy_(t)
                stamps[e] = now
        return stacked

    # ------------------------------------------------------------------------------------------ attention

    def sparse_attn(self, q: Tensor, kv: Tensor | Sequence[KVRows], idx: Tensor, sink: Tensor,
                    scale: float, cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
        """As the reference: per 64-slot block the same fp32 logits, shifts and unnormalised kv-dtype-rounded
        probabilities, the blocks' value products, and the blocks folded into the running sum and accumulator in
        block order. The logits come from the rows idx names gathered once (`gather_kv`) or, over a short
        context's few rows, from one GEMM a block of queries where that gives the same bits (`_scored_blocks`);
        rows in the compute dtype (fp32 models) take the cheaper softmaxes (`_dense_attn`, `_gathered_softmax`)."""
        if cos is not None:
            return self.rope_back(self.sparse_attn(q, kv, idx, sink, scale), cos, sin)
        b, s, h, d = q.shape
        n_slots = idx.shape[-1]
        if n_slots == 0:
            return torch.zeros_like(q)
        runs = [kv] if isinstance(kv, Tensor) else list(kv)
        kv_dtype, acc = runs[0].dtype, compute_dtype(q, runs[0], sink)
        scored = scores_every_row(q, runs, n_slots)
        if kv_dtype == acc and scored:
            return self._dense_attn(q, concat_rows(runs), idx, sink, scale)
        if scored and self._scores_every_slot(d):  # a short context over rows rounded to kv_dtype
            return self._scored_blocks(q, concat_rows(runs).to(acc), idx, sink, scale, kv_dtype)
        per_query = b * n_slots * (d + h) * 4  # bytes of gathered fp32 rows and scores per query position
        if s > 1 and s * per_query > GATHER_BYTES:  # a long prefill chunk: queries in blocks, memory bounded
            step = max(1, GATHER_BYTES // per_query)
            return torch.cat([self.sparse_attn(q[:, lo : lo + step], kv, idx[:, lo : lo + step], sink, scale)
                              for lo in range(0, s, step)], dim=1)
        if kv_dtype == acc:
            return _gathered_softmax(q, runs, idx, sink, scale)
        rows = gather_kv(runs, idx, acc)  # [B, S, K, D], the first run's values in the compute dtype
        logits = torch.einsum("bshd,bskd->bshk", q.to(acc), rows)  # [B, S, H, K], scaled below
        if n_slots > ATTN_BLOCK and n_slots % ATTN_BLOCK:  # (fewer slots: this einsum is the reference's own)
            _last_block_logits(q.to(acc), rows[:, :, n_slots // ATTN_BLOCK * ATTN_BLOCK :], logits)
        return self._rounded_blocks(logits, lambda probs, tail: _block_products(probs, tail, rows), idx, sink,
                                    scale, kv_dtype).to(q.dtype)

    def _scores_every_slot(self, d: int) -> bool:
        """Whether this backend's `_slot_logits` computes a logit of D terms as the gathered rows' per-query einsum
        does, bit for bit (checked once per width on random bf16 values, blocks of queries naming every row and
        half of them: the order of a dot product's sums is the BLAS kernel's, which may split a long one, as MKL
        does past 128 terms for some shapes)."""
        if d not in self._scored_widths:
            gen = torch.Generator().manual_seed(d)
            b, s, h, n, k = 2, 48, 8, 200, 130
            q = torch.randn(b, s, h, d, generator=gen).bfloat16().float()
            rows = torch.randn(b, n, d, generator=gen).bfloat16().float()
            rows_t = rows.transpose(1, 2).contiguous()
            same = True
            for top in (n, n // 2):
                idx = torch.randint(0, top, (b, s, k), generator=gen)
                gathered = gather_rows(rows, idx.view(b, s * k)).view(b, s, k, d)
                want = torch.einsum("bshd,bskd->bshk", q, gathered)
                same = same and torch.equal(want, self._slot_logits(q, rows, rows_t, idx))
            self._scored_widths[d] = same
        return self._scored_widths[d]

    def _scored_blocks(self, q: Tensor, rows: Tensor, idx: Tensor, sink: Tensor, scale: float,
                       kv_dtype: torch.dtype) -> Tensor:
        """`sparse_attn`'s 64-slot blocks for a chunk of queries q [B, S, H, D] over rows [B, N, D] (in the compute
        dtype; few, see `scores_every_row`) rounded to kv_dtype, a block of queries at a time: one GEMM scores
        every row, each slot's logit picked from it (the gathered einsum's bits, `_scores_every_slot`), instead of
        a tiny GEMM per query over its gathered rows; the value products from the rows in place
        (`_block_values`)."""
        b, s, h, d = q.shape
        n, k = rows.shape[1], idx.shape[-1]
        step = max(1, GATHER_BYTES // self._scored_query_bytes(b, h, d, n, k))
        rows_t = rows.transpose(1, 2).contiguous()  # [B, D, N]: the GEMMs read it about 1.4x faster than a view
        outs = []
        for lo in range(0, s, step):
            block, slots = q[:, lo : lo + step].to(rows.dtype), idx[:, lo : lo + step]
            values = partial(self._block_values, rows, slots)
            logits = self._slot_logits(block, rows, rows_t, slots)
            if k % ATTN_BLOCK:
                _last_block_logits(block, gather_rows(rows, slots[..., k // ATTN_BLOCK * ATTN_BLOCK :].clamp(min=0)),
                                   logits)
            outs.append(self._rounded_blocks(logits, values, slots, sink, scale, kv_dtype))
        return torch.cat(outs, dim=1).to(q.dtype)

    def _slot_logits(self, q: Tensor, rows: Tensor, rows_t: Tensor, idx: Tensor) -> Tensor:
        """The unscaled logits [B, S, H, K] of queries q [B, S, H, D] over the slots idx [B, S, K] names (-1: any
        row, masked later) among rows [B, N, D] (also given transposed, rows_t [B, D, N] contiguous, which the
        GEMM reads about 1.4x faster than a view): one GEMM scores every row, each slot's logit picked from it."""
        b, s, h, d = q.shape
        scores = torch.bmm(q.reshape(b, s * h, d), rows_t).view(b, s, h, rows_t.shape[2])
        return scores.gather(-1, idx.clamp(min=0).unsqueeze(2).expand(b, s, h, idx.shape[-1]))

    def _scored_query_bytes(self, b: int, h: int, d: int, n: int, k: int) -> int:
        """The bytes `_scored_blocks` writes per query position: its gathered rows, scores, logits and exponents."""
        return b * (k * d + h * (n + 2 * k)) * 4

    def _block_values(self, rows: Tensor, idx: Tensor, probs: Tensor | None, tail_probs: Tensor | None
                      ) -> list[Tensor]:
        """Each 64-slot block's value product [B, S, H, D] (`_block_products`) of the rows [B, N, D] idx [B, S, K]
        names, gathered whole blocks straight into the layout their batched product reads."""
        b, n, d = rows.shape
        full = idx.shape[-1] // ATTN_BLOCK * ATTN_BLOCK
        at = idx.clamp(min=0) + (torch.arange(b, device=idx.device) * n).view(b, 1, 1)
        flat = rows.reshape(b * n, d)
        whole = flat.index_select(0, at[..., :full].flatten()).view(*idx.shape[:2], full, d)
        tail = flat.index_select(0, at[..., full:].flatten()).view(*idx.shape[:2], -1, d)
        return _block_products(probs, tail_probs, whole, tail)

    def _rounded_blocks(self, logits: Tensor, values: Callable[[Tensor | None, Tensor | None], list[Tensor]],
                        idx: Tensor, sink: Tensor, scale: float, kv_dtype: torch.dtype) -> Tensor:
        """The reference's online softmax over 64-slot blocks from the queries' unscaled logits [B, S, H, K]: the
        probabilities rounded to kv_dtype, `values` (the whole blocks' probabilities [B*S*full, H, 64] and the last
        partial block's [B, S, H, tail], None where there are none) their blocks' value products [B, S, H, D],
        folded in block order. Returns [B, S, H, D] in the compute dtype."""
        b, s, h, n_slots = logits.shape
        blocks = -(-n_slots // ATTN_BLOCK)
        acc = logits.dtype
        exponents, run_max, shift = self._block_exponents(logits, idx, scale)
        block_sum, probs, tail_probs = self._block_probs(torch.exp(exponents), kv_dtype, n_slots)
        outs = values(probs, tail_probs)
        # fold: denom = denom * exp(m_prev - m) + sum_i, out likewise (the first block starts from 0)
        denom, out = block_sum[..., 0], outs[0]
        for i in range(1, blocks):
            rescale = torch.exp(run_max[..., i - 1] - shift[..., i])
            denom = denom * rescale + block_sum[..., i]
            out = out * rescale.unsqueeze(-1) + outs[i]
        final = run_max[..., -1]
        sink_logit = sink.to(acc).view(1, 1, -1).expand(b, s, h)
        last_shift = torch.where(final.isfinite(), final, sink_logit.detach())
        denom = denom + torch.exp(sink_logit - last_shift)
        return out / denom.unsqueeze(-1)

    def _block_exponents(self, logits: Tensor, idx: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """The reference's 64-slot blocks of the queries' unscaled logits [B, S, H, K] (idx [B, S, K], -1 masked):
        the arguments of their exponentials [B, S, H, nb, 64] (scaled logit - shift; -inf for masked slots and the
        last block's missing ones), the running maximum after each block [B, S, H, nb], and each block's shift
        (that maximum, or 0 while it is -inf)."""
        b, s, h, k = logits.shape
        logits = logits.mul_(scale).masked_fill_((idx < 0).unsqueeze(2), float("-inf"))
        blocks = -(-k // ATTN_BLOCK)
        if k % ATTN_BLOCK:  # the last block's missing slots weigh nothing (-inf logits, so p = 0)
            logits = F.pad(logits, (0, blocks * ATTN_BLOCK - k), value=float("-inf"))
        logits = logits.view(b, s, h, blocks, ATTN_BLOCK)
        run_max = logits.amax(dim=-1).cummax(dim=-1).values.detach()  # [B, S, H, nb] running max after block i
        shift = torch.where(run_max.isfinite(), run_max, torch.zeros_like(run_max))
        return logits - shift.unsqueeze(-1), run_max, shift

    def _block_probs(self, p: Tensor, kv_dtype: torch.dtype, n_slots: int
                     ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The blocks' unnormalised probabilities p [B, S, H, nb, 64] of n_slots slots: each block's sum
        [B, S, H, nb], then the probabilities rounded to the rows' dtype (the official kernel multiplies them so by
        the rows) as the value products read them: the whole blocks [B*S*full, H, 64] and the last partial block's
        [B, S, H, tail] (None where there are none)."""
        b, s, h, _, _ = p.shape
        full, tail = divmod(n_slots, ATTN_BLOCK)
        block_sum = p.sum(dim=-1)
        if tail:  # the reference sums the last block's own slots: torch's order over tail terms, not 64 padded
            block_sum[..., full] = p[..., full, :tail].contiguous().sum(dim=-1)
        if kv_dtype != p.dtype:
            p = p.to(kv_dtype).to(p.dtype)
        probs = p[..., :full, :].permute(0, 1, 3, 2, 4).reshape(b * s * full, h, ATTN_BLOCK) if full else None
        return block_sum, probs, p[..., full, :tail] if tail else None

    def _dense_attn(self, q: Tensor, rows: Tensor, idx: Tensor, sink: Tensor, scale: float) -> Tensor:
        """Attention of a chunk's queries q [B, S, H, D] over rows [B, N, D] in the compute dtype, each block of
        DENSE_QUERY_BLOCK queries scoring the rows it names (`_dense_softmax`). Differentiable (training)."""
        # split, not sliced: in training one backward (a concatenation) instead of a zero-filled q per block
        blocks = zip(q.split(DENSE_QUERY_BLOCK, dim=1), idx.split(DENSE_QUERY_BLOCK, dim=1), strict=True)
        return torch.cat([_dense_softmax(block, rows, slots, sink, scale) for block, slots in blocks], dim=1)

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
        comb = torch.exp(comb - comb.amax(dim=-1, keepdim=True))  # [..., h, h]
        tokens = comb.numel() // (h * h)
        # many tokens (a prefill): the matrices token-minor [h, h, T], so each sum adds h rows of T contiguous
        # values in order instead of reducing T tiny rows (the same additions, vectorised over the tokens)
        minor = tokens >= SINKHORN_TOKEN_MINOR
        work = comb.reshape(tokens, h, h).permute(1, 2, 0).contiguous() if minor else comb
        row_dim, col_dim = (1, 0) if minor else (-1, -2)
        sums = work.sum(dim=row_dim, keepdim=True)
        work.div_(sums).add_(eps)
        col = torch.sum(work, dim=col_dim, keepdim=True)
        work.div_(col.add_(eps))
        for _ in range(iters - 1):
            torch.sum(work, dim=row_dim, keepdim=True, out=sums)
            work.div_(sums.add_(eps))
            torch.sum(work, dim=col_dim, keepdim=True, out=col)
            work.div_(col.add_(eps))
        if minor:
            comb = work.permute(2, 0, 1).reshape(comb.shape)
        return pre, post, comb


def _last_block_logits(q: Tensor, tail_rows: Tensor, logits: Tensor) -> None:
    """The last partial 64-slot block's logits, in logits [B, S, H, K] in place, as the reference computes them: one
    einsum of the queries q [B, S, H, D] over just those slots' rows tail_rows [B, S, K % 64, D]. BLAS sums a dot
    product in an order of its own in a GEMM of a few columns (MKL: 2 or 3 slots of 128-wide heads, about 40% of
    their logits a last bit apart from a wider product's), and the bf16-rounded probabilities downstream turn such
    bits into whole rounding steps now and then."""
    tail = tail_rows.shape[2]
    logits[..., logits.shape[-1] - tail :] = torch.einsum("bshd,bskd->bshk", q.contiguous(), tail_rows.contiguous())


def scores_every_row(q: Tensor, runs: list[KVRows], n_slots: int) -> bool:
    """Whether attention over rows in the compute dtype (fp32 models: rounding the probabilities to the rows'
    dtype changes nothing, and the 64-slot blocks only order fp32 sums) scores every row with one GEMM per block of
    queries (`_dense_softmax`) instead of gathering each query's rows (`_gathered_softmax`). Scoring costs H*N GEMM
    work per query against K gathered rows and tiny per-query GEMMs: measured here, it pays for a chunk whose
    slots outnumber the rows while the rows are at most DENSE_ROWS_PER_SLOT times the slots (a short context), in
    training too, and not over a long context's compressed entries."""
    b, s, h, _ = q.shape
    n_rows = sum(run.shape[1] if isinstance(run, Tensor) else run.count for run in runs)
    return (s * n_slots >= n_rows and n_rows <= DENSE_ROWS_PER_SLOT * n_slots
            and b * min(s, DENSE_QUERY_BLOCK) * h * n_rows * q.element_size() <= DENSE_SCORES_BYTES)


def _dense_softmax(q: Tensor, rows: Tensor, idx: Tensor, sink: Tensor, scale: float) -> Tensor:
    """One softmax over each query's slots, for a block of a chunk's queries q [B, S, H, D] over rows [B, N, D]:
    every row the block names (`_used_rows`) scored with one GEMM, each row weighted by the number of the query's
    slots that name it (0: masked; a row named twice counts twice, as the reference's slots do), and the weighted
    probabilities multiplied by the rows with another. Differentiable (training).

    Exponentials of arguments below -87 (masked rows at -inf, and rows far below the query's maximum, whose
    results are denormal) take the slow path of torch's vectorised exp, about 6 and 50 times slower. Such terms
    are below fp32's resolution of a sum that holds exp(0) = 1, so the arguments are clamped there and the masked
    rows multiplied by their zero count."""
    b, s, h, d = q.shape
    rows, slots = _used_rows(rows, idx.clamp(min=0))
    n = rows.shape[1]
    counts = torch.zeros(b, s, n, dtype=q.dtype, device=q.device).scatter_add_(2, slots, (idx >= 0).to(q.dtype))
    counts = counts.unsqueeze(2)  # [B, S, 1, N']
    if not (torch.is_grad_enabled() and (q.requires_grad or rows.requires_grad or sink.requires_grad)):
        return _dense_softmax_forward(q, rows, counts, sink, scale)[0]
    if q.dtype == rows.dtype and not torch.is_autocast_enabled(q.device.type):
        return _DenseSoftmax.apply(q, rows, counts, sink, scale)
    return _dense_softmax_forward(q, rows, counts, sink, scale, autograd=True)[0]  # mixed precision


def _dense_softmax_forward(q: Tensor, rows: Tensor, counts: Tensor, sink: Tensor, scale: float,
                           autograd: bool = False, floor: float = EXP_FLOOR) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`_dense_softmax` after the rows and counts [B, S, 1, N']: (out [B, S, H, D], the unnormalised weighted
    probabilities p [B, S, H, N'], the sink's [B, S, H] and the denominators [B, S, H]). In place where nothing
    records the graph; with `autograd`, in place only where autograd allows it (the GEMM's backward keeps its
    inputs, not its output; exp's backward keeps its result)."""
    b, s, h, d = q.shape
    n = rows.shape[1]
    every = torch.bmm(q.reshape(b, s * h, d), rows.transpose(1, 2)).view(b, s, h, n)  # [B, S, H, N']
    logits = every.mul_(scale).masked_fill_(counts == 0, float("-inf"))
    top = logits.amax(dim=-1).detach()  # [B, S, H]; the shift cancels, so it carries no gradient
    sink_logit = sink.to(q.dtype).view(1, 1, -1).expand(b, s, h)
    shift = torch.where(top.isfinite(), top, sink_logit.detach())
    if autograd:
        p = (logits - shift.unsqueeze(-1)).clamp_(min=floor).exp_() * counts
    else:
        p = logits.sub_(shift.unsqueeze(-1)).clamp_(min=floor).exp_().mul_(counts)
    sink_p = torch.exp(sink_logit - shift)
    denom = p.sum(dim=-1) + sink_p
    out = torch.bmm(p.view(b, s * h, n), rows).view(b, s, h, d)
    return out / denom.unsqueeze(-1) if autograd else out.div_(denom.unsqueeze(-1)), p, sink_p, denom


class _DenseSoftmax(torch.autograd.Function):
    """`_dense_softmax` in training: the same forward, and the softmax's gradient in closed form (four GEMMs and a
    few products) instead of autograd's chain through the masking, shift, floor and weighting. With
    out = sum_j p_j r_j / D, D = sum_j p_j + sigma (sigma the sink's term) and p_j = count_j exp(l_j - shift):
    dl_j = p_j (dout . r_j - dout . out) / D, d sink = -sigma (dout . out) / D, dr_j gains p_j dout / D.

    The forward floors exp's arguments at `TRAIN_EXP_FLOOR` (-60) instead of -87: a floored weight times a gradient
    would be denormal at -87, which this CPU multiplies about 30x slower (a peaked attention's backward took 16.2 ms
    instead of 1.1). A weight of exp(-60) is 2**-86 of the row's largest (which is at least 1), far under fp32's
    resolution of the sums it joins."""

    @staticmethod
    def forward(ctx, q: Tensor, rows: Tensor, counts: Tensor, sink: Tensor, scale: float) -> Tensor:
        out, p, sink_p, denom = _dense_softmax_forward(q, rows, counts, sink, scale, floor=TRAIN_EXP_FLOOR)
        ctx.save_for_backward(q, rows, out, p, sink_p, denom)
        ctx.scale, ctx.sink_dtype = scale, sink.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, Tensor, None]:
        q, rows, out, p, sink_p, denom = ctx.saved_tensors
        d_q, d_rows, d_sink = softmax_attention_grads(grad, q, rows, out, p, sink_p, denom, ctx.scale)
        return d_q, d_rows, None, d_sink.to(ctx.sink_dtype), None


def softmax_attention_grads(grad: Tensor, q: Tensor, rows: Tensor, out: Tensor, p: Tensor, sink_p: Tensor,
                            denom: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form gradient of `_dense_softmax` (see `_DenseSoftmax`) for a block of queries: from the output's
    gradient grad and the forward's q, out [B, S, H, D], rows [B, N, D], unnormalised weighted probabilities p
    (viewable as [B, S*H, N]), sink terms sink_p and denominators denom [B, S, H], the gradients of q [B, S, H, D], the
    rows [B, N, D] and the sink [H]."""
    b, s, h, d = q.shape
    n = rows.shape[1]
    p = p.reshape(b, s * h, n)
    d_out = grad / denom.unsqueeze(-1)  # [B, S, H, D]
    c = (d_out * out).sum(dim=-1)  # [B, S, H]
    d_logits = torch.bmm(d_out.view(b, s * h, d), rows.transpose(1, 2))  # [B, S*H, N]
    d_logits.sub_(c.view(b, s * h, 1)).mul_(p).mul_(scale)
    d_q = torch.bmm(d_logits, rows).view(b, s, h, d)
    d_rows = torch.bmm(d_logits.transpose(1, 2), q.reshape(b, s * h, d))
    d_rows.baddbmm_(p.transpose(1, 2), d_out.view(b, s * h, d))
    return d_q, d_rows, -(sink_p * c).sum(dim=(0, 1))


def _block_products(probs: Tensor | None, tail_probs: Tensor | None, rows: Tensor, tail: Tensor | None = None
                    ) -> list[Tensor]:
    """Each 64-slot block's value product [B, S, H, D], as the reference's einsum computes it: the whole blocks'
    probabilities [B*S*full, H, 64] times their rows (the first full*64 slots of rows [B, S, K', D]) in one batched
    GEMM, the last partial block's [B, S, H, tail] times its rows (`tail`, else the slots after them in rows)."""
    b, s, _, d = rows.shape
    full = probs.shape[0] // (b * s) if probs is not None else 0
    outs = []
    if full:  # [B*S*n, H, 64] @ [B*S*n, 64, D]
        block_out = torch.bmm(probs, rows[:, :, : full * ATTN_BLOCK].reshape(-1, ATTN_BLOCK, d))
        block_out = block_out.view(b, s, full, -1, d)
        outs = [block_out[:, :, i] for i in range(full)]
    if tail_probs is not None:
        tail = rows[:, :, full * ATTN_BLOCK :] if tail is None else tail
        outs.append(torch.einsum("bshk,bskd->bshd", tail_probs, tail))
    return outs


def _gathered_softmax(q: Tensor, runs: list[KVRows], idx: Tensor, sink: Tensor, scale: float) -> Tensor:
    """One softmax over each query's slots (rows in the compute dtype, see `scores_every_row`) from the rows it
    names, gathered (`gather_kv`; a decode reads paged entries row by row from their pool): tiny per-query GEMMs.
    Differentiable (training)."""
    b, s, h, d = q.shape
    k = idx.shape[-1]
    valid = (idx >= 0).unsqueeze(2)  # [B, S, 1, K]
    rows = gather_kv(runs, idx)  # [B, S, K, D]
    logits = torch.bmm(q.reshape(b * s, h, d), rows.view(b * s, k, d).transpose(1, 2)).view(b, s, h, k)
    logits = logits.mul_(scale).masked_fill_(~valid, float("-inf"))
    top = logits.amax(dim=-1).detach()  # [B, S, H]; the shift cancels, so it carries no gradient
    sink_logit = sink.to(q.dtype).view(1, 1, -1).expand(b, s, h)
    shift = torch.where(top.isfinite(), top, sink_logit.detach())
    p = torch.exp(logits - shift.unsqueeze(-1))
    denom = p.sum(dim=-1) + torch.exp(sink_logit - shift)
    out = torch.bmm(p.view(b * s, h, k), rows.view(b * s, k, d)).view(b, s, h, d)
    return out / denom.unsqueeze(-1)


def _used_rows(rows: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
    """Only the rows [B, N, D] that some slot [B, S, K] names (in row order) and the slots renumbered onto them,
    when that leaves out at least a quarter: a block of a prefill's queries attends to its own stretch of the
    window and the compressed entries, not to the window rows of the chunk's other queries."""
    n = rows.shape[1]
    named = torch.zeros(n, dtype=torch.bool, device=rows.device)
    named[slots.flatten()] = True
    used = named.nonzero().squeeze(1)  # [N'] ascending
    if 4 * used.numel() > 3 * n:
        return rows, slots
    renumber = torch.zeros(n, dtype=slots.dtype, device=rows.device)
    renumber[used] = torch.arange(used.numel(), device=rows.device)
    return rows.index_select(1, used), renumber[slots]


def gather_kv(kv: Tensor | Sequence[KVRows], idx: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The rows [B, S, K, D] that idx [B, S, K] names in the concatenation of the runs (-1: any row, masked
    later), with the first run's values (the reference casts the other runs to its dtype), in `dtype` (default:
    the first run's). When the slots outnumber the rows (a prefill chunk: its queries share
    their window) every row is decoded once and indexed; otherwise (decoding) only the named rows are read,
    paged ones row by row from their pool and decoded after the read."""
    runs = [kv] if isinstance(kv, Tensor) else list(kv)
    b = idx.shape[0]
    flat = idx.reshape(b, -1)  # [B, M]
    sizes = [run.shape[1] if isinstance(run, Tensor) else run.count for run in runs]
    if flat.shape[1] >= sum(sizes) or all(isinstance(run, Tensor) for run in runs):
        dense = concat_rows(runs).to(dtype or runs[0].dtype)  # [B, N, D], cast before the gather multiplies it
        n = dense.shape[1]
        base = (torch.arange(b, device=idx.device) * n).unsqueeze(1)
        rows = dense.reshape(b * n, -1).index_select(0, (flat.clamp(min=0) + base).flatten())
        return rows.view(*idx.shape, -1)
    out, lo = None, 0
    for run, n in zip(runs, sizes, strict=True):
        if n == 0:
            continue
        inside = (flat >= lo) & (flat < lo + n)
        local = torch.where(inside, flat - lo, 0)
        if isinstance(run, Tensor):
            base = (torch.arange(b, device=idx.device) * n).unsqueeze(1)
            got = run.reshape(b * n, -1).index_select(0, (local + base).flatten()).view(b, flat.shape[1], -1)
        else:
            got = _paged_rows(run, local)
        got = got.to(runs[0].dtype).to(dtype or runs[0].dtype)
        out = got if out is None else torch.where(inside.unsqueeze(-1), got, out)
        lo += n
    if out is None:  # no rows at all: every index is -1
        return torch.zeros(*idx.shape, runs[0].shape[-1], dtype=dtype or runs[0].dtype, device=idx.device)
    return out.view(*idx.shape, -1)


def _paged_rows(run: PagedRows, local: Tensor) -> Tensor:
    """Rows `local` [B, M] of each batch row of a paged run, decoded: [B, M, D]."""
    per_page = run.rows_per_page
    page = run.table.gather(1, torch.div(local, per_page, rounding_mode="floor").clamp_(max=run.table.shape[1] - 1))
    stored = run.pool.view(-1, run.pool.shape[-1]).index_select(0, (page * per_page + local % per_page).flatten())
    stored = stored.view(*local.shape, -1)
    return stored if run.codec is None else run.codec.decode(stored)
