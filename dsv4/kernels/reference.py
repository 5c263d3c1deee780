"""The reference kernel backend: pure torch, the numerical oracle every faster backend is checked against.

Each op reproduces the arithmetic of the official DeepSeek-V4 kernels (spec §3.0, §3.2, §4.2) where the order
of operations matters (power-of-two scales, two-level fp32 accumulation per K block, the attention sink in the
softmax denominator only, the exact Sinkhorn sequence), and is otherwise written for clarity, not speed. All
ops run on CPU and the float ones are differentiable, so training uses them directly.

`ReferenceBackend` is the backend registered as "reference" in `dsv4.kernels`; callers reach it through the
dispatcher there (`dsv4.kernels.linear(...)`), never by importing this module. Ops that build on others call
them through `self` (`linear` -> `self.act_quant`, `self.fp8_gemm`), so a backend that derives from this class
and overrides one op changes every op that uses it.

Internal math is fp32; fp64 inputs are kept in fp64 (``compute_dtype``) so gradcheck can be run on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dsv4.kernels.topk import stable_topk
from dsv4.quant import (
    ACT_AMAX_FLOOR,
    FP4_AMAX_FLOOR,
    FP4_BLOCK,
    FP4_MAX,
    FP8_BLOCK,
    FP8_MAX,
    INDEXER_SIM_BLOCK,
    KV_SIM_BLOCK,
    dequantize_fp4_weight,
    dequantize_fp8_weight,
    e2m1_decode,
    e2m1_encode,
    e8m0_to_float,
    fp4_to_fp8_weight,
    is_packed_fp4_dtype,
    merge_blocks,
    pow2_scale,
    quantize_fp4_weight,
    quantize_fp8_weight,
    split_blocks,
    unpack_fp4,
)

from .cross_entropy import IGNORE_INDEX, summed_cross_entropy
from .experts import ExpertWeights, chosen_experts
from .paged import KVRows, PagedRows, concat_rows

ATTN_BLOCK = 64  # candidate slots per online-softmax step of the official sparse-attention kernel
# hc_post sums the streams term by term from this many tokens on (fewer ops below it, less memory above)
HC_TERMWISE_TOKENS = 64


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 if any input is fp64 (keeps gradcheck meaningful without changing fp32/bf16 numerics)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _fp8_quantize_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes and fp32 pow-2 scales of fp32 blocks [..., nb, block] with the activation rule."""
    amax = blocks.abs().amax(dim=-1).clamp(min=ACT_AMAX_FLOOR)  # [..., nb]
    scale = pow2_scale(amax, FP8_MAX)
    q = (blocks / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _fp4_quantize_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e2m1 codes and fp32 pow-2 scales of fp32 blocks [..., nb, block] (``fp4sim32``'s rule)."""
    amax = blocks.abs().amax(dim=-1).clamp(min=FP4_AMAX_FLOOR)  # [..., nb]
    scale = pow2_scale(amax, FP4_MAX)
    return e2m1_encode(blocks / scale.unsqueeze(-1)), scale


def _block_scaled_matmul(
    x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, block: int
) -> torch.Tensor:
    """Two-level fp32 accumulation: ``sum_b (x_b @ w_b^T) * x_scale[:, b] * w_scale[:, b]``, b = 0, 1, ...

    x [M, K] and w [N, K] hold unscaled fp32 element values, x_scale [M, nb], w_scale [N, nb] the per-block
    power-of-two scales. Each block product is an fp32 matmul; applying the scales after it and summing into
    a separate fp32 accumulator is what the fused kernels do, so the rounding pattern matches theirs.
    """
    m, k = x.shape
    n = w.shape[0]
    acc = x.new_zeros(m, n)
    for b in range(-(-k // block)):
        cols = slice(b * block, (b + 1) * block)
        partial = x[:, cols] @ w[:, cols].T  # [M, N]
        acc += partial * (x_scale[:, b : b + 1] * w_scale[:, b].unsqueeze(0))
    return acc


def flatten_tokens(xq: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] activations and [..., nb] scales as fp32 [M, K] and [M, nb]."""
    return xq.reshape(-1, xq.shape[-1]).float(), xs.reshape(-1, xs.shape[-1]).float()


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The router's logits [T, E]: x W^T for tokens x [T, d] and the gate weight [E, d], both taken in fp32 (the
    product in autocast's dtype where autocast is on). Differentiable."""
    return F.linear(x.to(torch.float32), weight.to(torch.float32))


def router_scores(x: torch.Tensor, weight: torch.Tensor, score_func: str) -> torch.Tensor:
    """The router's scores [T, E] fp32: f(`router_logits`) (f: softmax, sigmoid or sqrt(softplus), torch's softplus:
    the input itself above 20, else log1p(exp(z))). Differentiable."""
    logits = router_logits(x, weight)
    if score_func == "softmax":
        return logits.softmax(dim=-1)
    if score_func == "sigmoid":
        return logits.sigmoid()
    return F.softplus(logits).sqrt()


# what `norm_rope_qat` rounds its rows through after the rotation
QAT_ROUNDINGS = ("none", "fp8_nope", "hadamard", "hadamard_fp4")


def ring_candidates(positions: torch.Tensor, ring_base: torch.Tensor, ratio: int, ring: int) -> torch.Tensor:
    """The candidates [B, coff * ratio] that `ring_pool` pools for each row's entry j = p // ratio (positions [B]),
    as rows of the rings viewed as rows of c ([rows * R * coff, c]), row b's ring starting at ring row ring_base[b]:
    the token at position q sits in slot q % R (R = ring = coff * ratio).

    * CSA (R = 2 * ratio, overlapping): the previous block's tokens (positions (j - 1) * ratio + i, slot (q + ratio)
      % R) give their first halves, this block's their second halves; entry 0 has no previous block (-1).
    * otherwise (R = ratio): the block's tokens, one slot each."""
    j = torch.div(positions, ratio, rounding_mode="floor")
    cur = (j * ratio).unsqueeze(1) + torch.arange(ratio, device=positions.device)  # [B, r] the block's positions
    base = ring_base.unsqueeze(1)
    if ring == ratio:
        return base + cur % ring
    prev = (2 * (base + (cur + ratio) % ring)).masked_fill((j == 0).unsqueeze(1), -1)
    return torch.cat((prev, 2 * (base + cur % ring) + 1), dim=1)


def plus_rounded(add: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """add (fp32) + out in fp32, rounded to out's dtype: `swiglu`'s `add`."""
    return (add + out.to(torch.float32)).to(out.dtype)


class ReferenceBackend:
    """The pure-torch oracle; one method per op of `dsv4.kernels.OPS`."""

    name = "reference"

    # ------------------------------------------------------------------------------------------ quantisation

    def act_quant(self, x: torch.Tensor, block_size: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token, per-``block_size`` FP8 quantisation of activations before every FP8/FP4 linear.

        Returns ``(q float8_e4m3fn [..., K], s fp32 [..., ceil(K/block_size)])`` with ``x ~= q * s`` blockwise;
        s is a power of two so the division is exact and only the e4m3 rounding loses information. The same
        rule quantises the nope dims of cached KV rows (64-blocks, `dsv4.kv_formats`).
        """
        k = x.shape[-1]
        q, scale = _fp8_quantize_blocks(split_blocks(x, block_size))
        return merge_blocks(q, k), scale

    def fp8_simulate(self, x: torch.Tensor, block_size: int = KV_SIM_BLOCK) -> torch.Tensor:
        """QAT round trip through FP8 (``fp8sim64``): quantise like ``act_quant`` and multiply straight back.

        Used on the KV nope dims so the cache holds exactly the values an e4m3 cache would reproduce, and with
        128-blocks for FP8 activations in QAT. Returns x.dtype; an e4m3 value times a power of two fits bf16
        exactly.
        """
        q, scale = _fp8_quantize_blocks(split_blocks(x, block_size))  # the rule act_quant applies, kept in blocks
        return merge_blocks(q.float() * scale.unsqueeze(-1), x.shape[-1]).to(x.dtype)

    def fp4_quant(self, x: torch.Tensor, block_size: int = INDEXER_SIM_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-``block_size`` FP4 quantisation (``fp4sim32``'s rule) of indexer queries and keys.

        Per block: amax floored at 6 * 2**-126, scale 2**ceil(log2(amax/6)), e2m1 round-to-nearest-even with
        saturation at ±6. Returns ``(codes uint8 e2m1 [..., K], s fp32 [..., ceil(K/block_size)])``.
        """
        codes, scale = _fp4_quantize_blocks(split_blocks(x, block_size))
        return merge_blocks(codes, x.shape[-1]), scale

    def fp4_simulate(self, x: torch.Tensor, block_size: int = INDEXER_SIM_BLOCK) -> torch.Tensor:
        """QAT round trip through FP4 (``fp4sim32``): ``fp4_quant``'s rule multiplied straight back. Returns x.dtype."""
        codes, scale = _fp4_quantize_blocks(split_blocks(x, block_size))
        return merge_blocks(e2m1_decode(codes) * scale.unsqueeze(-1), x.shape[-1]).to(x.dtype)

    def fp8_weight_simulate(self, w: torch.Tensor) -> torch.Tensor:
        """A [out, in] weight through the checkpoint's FP8 format (e4m3, 128x128 ue8m0 tiles, canonical) and
        back, in w.dtype: the weight QAT's FP8 recipe computes with."""
        return dequantize_fp8_weight(*quantize_fp8_weight(w.float())).to(w.dtype)

    def fp4_weight_simulate(self, w: torch.Tensor, fp8_step: bool = True) -> torch.Tensor:
        """A routed-expert [out, in] weight through MXFP4 (1x32 along the input dim, e2m1 + ue8m0, canonical)
        and, with ``fp8_step``, on through the FP4 -> FP8 128x128 re-encoding the V4 training framework
        multiplies with; back in w.dtype (`dsv4.train.precision` explains when that step rounds)."""
        packed, scale = quantize_fp4_weight(w.float())
        if fp8_step:
            return dequantize_fp8_weight(*fp4_to_fp8_weight(packed, scale)).to(w.dtype)
        return dequantize_fp4_weight(packed, scale).to(w.dtype)

    # ------------------------------------------------------------------------------------------ GEMMs

    def fp8_gemm(self, xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """``y = x @ W^T`` for FP8 activations and an FP8 weight with 128x128 tile scales.

        xq e4m3 [..., K], xs fp32 [..., ceil(K/128)], w e4m3 [N, K], ws e8m0 [ceil(N/128), ceil(K/128)].
        Returns [..., N] in ``out_dtype``.
        """
        x, x_scale = flatten_tokens(xq, xs)
        n = w.shape[0]
        w_scale = e8m0_to_float(ws).repeat_interleave(FP8_BLOCK, dim=0)[:n]  # [N, ceil(K/128)]
        acc = _block_scaled_matmul(x, w.float(), x_scale, w_scale, FP8_BLOCK)
        return acc.to(out_dtype).reshape(*xq.shape[:-1], n)

    def fp4_gemm(self, xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """``y = x @ W^T`` for FP8 activations and a packed FP4 weight with one scale per 32 inputs.

        xq e4m3 [..., K], xs fp32 [..., ceil(K/128)], w packed e2m1 [N, K/2] (int8 / uint8 / float4_e2m1fn_x2),
        ws e8m0 [N, K/32]. Accumulation is per 32-wide K sub-block with factor xs[k//128] * ws[n, k//32].
        Returns [..., N] in ``out_dtype``.
        """
        x, x_scale = flatten_tokens(xq, xs)
        w_values = e2m1_decode(unpack_fp4(w))  # [N, K]; e2m1 -> fp32 is exact, like the e2m1 -> e4m3 cast
        if w_values.shape[1] != x.shape[1]:
            raise ValueError(f"fp4_gemm: activation K={x.shape[1]} but packed weight holds K={w_values.shape[1]}")
        sub_blocks = x.shape[1] // FP4_BLOCK
        x_scale = x_scale.repeat_interleave(FP8_BLOCK // FP4_BLOCK, dim=1)[:, :sub_blocks]  # [M, K/32]
        acc = _block_scaled_matmul(x, w_values, x_scale, e8m0_to_float(ws), FP4_BLOCK)
        return acc.to(out_dtype).reshape(*xq.shape[:-1], w_values.shape[0])

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
               quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x @ weight^T`` dispatched on the weight's storage format.

        * e4m3 weight (+ 128x128 e8m0 ``scale``): FP8 activation quantisation, then ``fp8_gemm``.
        * packed FP4 weight (int8 / float4_e2m1fn_x2, + per-32 e8m0 ``scale``): activation quantisation,
          then ``fp4_gemm``.
        * floating weight: a plain differentiable matmul in the weight's dtype (bf16/fp32 layers, training).

        `quantized`: ``act_quant(x)`` where the caller has it already (`rms_norm_quant` made it, or another linear
        of the same input); the quantised weights' GEMMs read it instead of quantising x again. A float weight
        ignores it. The output has x's dtype.
        """
        if weight.dtype == torch.float8_e4m3fn or is_packed_fp4_dtype(weight.dtype):
            if scale is None:
                raise ValueError(f"linear: a {weight.dtype} weight needs its e8m0 scale")
            xq, xs = self.act_quant(x) if quantized is None else quantized
            gemm = self.fp8_gemm if weight.dtype == torch.float8_e4m3fn else self.fp4_gemm
            return gemm(xq, xs, weight, scale, x.dtype)
        if weight.is_floating_point():
            return F.linear(x.to(weight.dtype), weight).to(x.dtype)
        raise TypeError(f"linear: unsupported weight dtype {weight.dtype}")

    def linears(self, x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
                quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """`linear` of x for each (weight, scale), in order."""
        return [self.linear(x, w, s, quantized) for w, s in weights]

    def greedy_head(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The greedy token of each row of x [..., K] against a float vocabulary projection weight [V, K]: the
        first maximum (lowest id among ties, a NaN counting as the maximum) of ``linear(x, weight)`` [..., V],
        as int64 [...]. Decoding greedily needs only this, so a backend may find it without every logit (the
        native one screens the vocabulary, `dsv4.kernels.native`); it must answer what this answers."""
        return self.linear(x, weight).max(dim=-1).indices

    def head_cross_entropy(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """The summed cross-entropy of a float vocabulary projection's logits: sum over the rows of x [..., K]
        whose target [...] is not `ignore_index` of F.cross_entropy(``linear(x, weight)`` in fp32, target), a
        0-dim fp32 tensor, differentiable in x and weight (the GEMM in autocast's dtype where it is on, as
        `linear` runs it). Training needs the loss and its gradients, never the logits themselves, so a backend
        may compute it without holding them all (`cross_entropy.ChunkedHeadCrossEntropy`)."""
        return summed_cross_entropy(self.linear(x, weight), targets, ignore_index)

    # ------------------------------------------------------------------------------------------ experts

    def gated_pool(self, kv: torch.Tensor, score: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The compressor's pooling: each entry's candidate rows of kv and score [N, c] (fp32), candidates [E, n]
        int64 (-1: a candidate that does not exist, weight 0), combined per channel by the softmax of their scores
        over the candidates: [E, c] = sum_i softmax_i(score[cand_i]) * kv[cand_i]. Differentiable."""
        e, n = candidates.shape
        c = kv.shape[-1]
        rows = candidates.clamp_min(0).flatten()
        missing = (candidates < 0).view(e, n, 1)
        kv = kv.index_select(0, rows).view(e, n, c).masked_fill(missing, 0.0)
        score = score.index_select(0, rows).view(e, n, c).masked_fill(missing, float("-inf"))
        return (kv * score.softmax(dim=1)).sum(dim=1)

    def ring_pool(self, kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor,
                  ring_kv: torch.Tensor, ring_score: torch.Tensor, ring_base: torch.Tensor, pool: bool,
                  dtype: torch.dtype) -> torch.Tensor | None:
        """A decode step's compressor, one token a row at positions [B]: the token's projections kv and score [B, C]
        (C = coff * c, fp32; score before its position's `ape` row) take their ring slots, slot p % R of the row's
        ring, which starts at row ring_base[b] of the rings [rows, R, C] (fp32, contiguous) viewed as [rows * R, C];
        the score plus ape[p % ratio] (ape [ratio, C]). Then, with `pool`, each row's entry j = p // ratio (finished
        at p or not) is pooled from the rings in place: `gated_pool` over the rings viewed as rows of c with the
        candidates `ring_candidates` names, returned [B, c] in `dtype`. Without `pool` only the slots are written
        (a step that finishes no entry) and None is returned. R = coff * ratio gives coff. Not differentiable (a
        cache write)."""
        ratio, ring, width = ape.shape[0], ring_kv.shape[1], kv.shape[-1]
        flat_kv, flat_score = ring_kv.view(-1, width), ring_score.view(-1, width)
        at = ring_base + positions % ring
        flat_kv[at] = kv
        flat_score[at] = score + ape.index_select(0, positions % ratio)
        if not pool:
            return None
        c = width // (ring // ratio)  # an entry's coff * ratio candidates: rows of c
        candidates = ring_candidates(positions, ring_base, ratio, ring)
        return self.gated_pool(ring_kv.view(-1, c), ring_score.view(-1, c), candidates).to(dtype)

    def project_ring_pool(self, x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor,
                          positions: torch.Tensor, ring_kv: torch.Tensor, ring_score: torch.Tensor,
                          ring_base: torch.Tensor, pool: bool, dtype: torch.dtype) -> torch.Tensor | None:
        """`ring_pool` of the tokens' projections: kv = ``linear(x in fp32, wkv)`` and score = ``linear(x in fp32,
        wgate)`` [B, C] for the tokens x [B, K] and float weights [C, K] (the compressor's, fp32 in the official
        code); what the compressor's decode step computed module by module. A backend may fuse the projections
        into the ring's writes (the Triton one: one launch for the step's compressor). Not differentiable."""
        xf = x.to(torch.float32)
        return self.ring_pool(self.linear(xf, wkv), self.linear(xf, wgate), ape, positions, ring_kv, ring_score,
                              ring_base, pool, dtype)

    def store_rows(self, values: torch.Tensor, dest: PagedRows, rows: torch.Tensor | None,
                   index: torch.Tensor) -> None:
        """Compute rows written into a cache's stored rows in place: values [M, D] as row index[i] of batch row
        rows[i] of `dest` (pool[table[rows[i], index[i] // rows_per_page], index[i] % rows_per_page]), or with rows
        None values [B, S, D] as row index[b, s] of batch row b, each encoded by `dest.codec` (None: cast to the
        pool's dtype). Not differentiable (a cache write)."""
        stored = (values.detach() if dest.codec is None else dest.codec.encode(values.detach())).to(dest.pool.dtype)
        if rows is None and dest.table.shape[1] == 1:  # a ring a batch row (a cache's window slots): one index_put
            dest.pool[dest.table, index] = stored
            return
        if rows is None:  # batch row b for every index of row b
            rows = torch.arange(index.shape[0], device=index.device).unsqueeze(1).expand_as(index)
        per_page = dest.rows_per_page
        pages = dest.table[rows, torch.div(index, per_page, rounding_mode="floor")]
        dest.pool[pages, index % per_page] = stored

    def norm_rope_store(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                        sin: torch.Tensor, qat: str, dest: PagedRows, rows: torch.Tensor | None,
                        index: torch.Tensor) -> None:
        """`norm_rope_qat` then `store_rows` of its result (a cache write: not differentiable)."""
        with torch.no_grad():
            self.store_rows(self.norm_rope_qat(x, weight, eps, cos, sin, qat), dest, rows, index)

    def load_rows(self, src: PagedRows) -> torch.Tensor:
        """Every addressable row of `src` [B, count, D] in `src.dtype`: its pages gathered, then decoded."""
        return src.dense()

    def attends_in_place(self, rows: PagedRows) -> bool:
        """Rows in the compute form (no codec) only: this backend's attention decodes every paged run whole, which
        one `load_rows` before it does as well."""
        return rows.codec is None

    def moe_gate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor | None,
                 score_func: str, topk: int, route_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MoE router over tokens x [T, d] with the gate weight [E, d]: scores [T, E] = f(x W^T) in fp32 (f:
        softmax, sigmoid or sqrt(softplus)); the experts ids [T, k] as given (a hash layer's token-id table) or
        the top-k of scores + bias [E] (the balancing term: it decides which, not how much); their weights [T, k],
        the unbiased scores renormalised (unless softmax) times route_scale. Returns (weights, ids, scores);
        differentiable through the scores."""
        scores = router_scores(x, weight, score_func)
        if ids is None:
            ids = (scores + bias).topk(topk, dim=-1).indices
        weights = scores.gather(1, ids)
        if score_func != "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * route_scale, ids, scores

    def routes_on_device(self, x: torch.Tensor, experts: Sequence[ExpertWeights | None]) -> bool:
        """Whether `routed_experts` runs over x with `which` None (every expert the ids name) without reading the
        device: the table's experts all held here and taken by device-scheduled kernels. The reference reads the
        ids to run expert by expert."""
        return False

    def routed_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                       experts: Sequence[ExpertWeights | None], which: Sequence[int] | None,
                       limit: float, quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The routed experts' weighted sum [T, d] fp32 over x [T, d], for routing weights [T, k] fp32 and expert
        ids [T, k]: each expert in `which` (increasing ids; `experts[e]` holds its weights, None for experts held
        by other ranks) runs once on the tokens routed to it, in token order, its hidden activation multiplied
        by the routing weight before w2, and the outputs are added into each token expert by expert. An expert
        in `which` that no token chose runs on no rows (it still joins the autograd graph, which expert-parallel
        training relies on). `which` None: the experts the ids name, all held here (a caller passes None only where
        `routes_on_device` said so). `quantized`: ``act_quant(x)`` if the caller has it (see `linear`)."""
        if which is None:
            which = chosen_experts(ids)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in which:
            rows, slot = torch.where(ids == e)
            rows_quantized = None if quantized is None else (quantized[0][rows], quantized[1][rows])
            out = self.swiglu(x[rows], experts[e], limit, weights[rows, slot, None], None, rows_quantized)
            y = y.index_add(0, rows, out.to(torch.float32))
        return y

    def swiglu(self, x: torch.Tensor, expert: ExpertWeights, limit: float, weights: torch.Tensor | None = None,
               add: torch.Tensor | None = None,
               quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One expert (or the shared expert, without routing weights) on rows x [n, d] -> [n, d] in x.dtype:
        w2(silu(min(w1 x, L)) * clamp(w3 x, -L, L)), the hidden activation in fp32 times `weights` [n, 1]. With
        `add` [n, d] fp32 (the routed experts' sum, for the shared expert): add + that output in fp32, rounded to
        x.dtype (the MoE layer's output, one op where a backend fuses it). `quantized`: ``act_quant(x)`` if the
        caller has it (see `linear`)."""
        gate = self.linear(x, expert.w1, expert.s1, quantized).to(torch.float32).clamp(max=limit)
        up = self.linear(x, expert.w3, expert.s3, quantized).to(torch.float32).clamp(-limit, limit)
        hidden = F.silu(gate) * up
        if weights is not None:
            hidden = weights * hidden
        out = self.linear(hidden.to(x.dtype), expert.w2, expert.s2)
        return out if add is None else plus_rounded(add, out)

    # ------------------------------------------------------------------------------------------ Hadamard

    def hadamard(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised Walsh-Hadamard transform over the last dim: ``x @ H_n / sqrt(n)``, Sylvester natural order.

        H_2n = [[H_n, H_n], [H_n, -H_n]] factorises into one butterfly per bit of the index, so log2(n) passes
        of (a + b, a - b) over pairs at distance h = 1, 2, 4, ... give the product in O(n log n). No random
        signs (the reference calls fast_hadamard_transform without them). Returns x.dtype; differentiable.
        """
        n = x.shape[-1]
        if n < 1 or n & (n - 1):
            raise ValueError(f"hadamard needs a power-of-two last dimension, got shape {tuple(x.shape)}")
        y = x.to(compute_dtype(x)).reshape(-1, n)
        h = 1
        while h < n:
            pairs = y.view(-1, n // (2 * h), 2, h)  # [rows, groups, (a|b), h]
            a, b = pairs[:, :, 0], pairs[:, :, 1]
            y = torch.stack((a + b, a - b), dim=2).view(-1, n)
            h *= 2
        return (y * (1.0 / math.sqrt(n))).reshape(x.shape).to(x.dtype)

    # ------------------------------------------------------------------------------------------ RMSNorm

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dim in fp32, ``weight * (x * rsqrt(mean(x^2) + eps))``, returned in x.dtype
        (weight [D] fp32, as the official code keeps it). Differentiable."""
        xf = x.to(torch.float32)
        return (weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps))).to(x.dtype)

    def rms_norm_quant(self, x: torch.Tensor, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """`rms_norm`, and the FP8 quantisation ``act_quant`` of its output for the quantised linears that read it
        (`linear`'s `quantized`), in one op so that a backend can write both in one pass (the Triton one does). A
        backend whose linears quantise their input better themselves returns None for the second (the native
        one: its few-row linears quantise inside their one C call). Not differentiable: for inference."""
        y = self.rms_norm(x, weight, eps)
        return y, self.act_quant(y)

    def head_norm(self, x: torch.Tensor, eps: float, cos: torch.Tensor | None = None,
                  sin: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
        """The official per-head query normalisation, ``x * rsqrt(mean(x^2) + eps)`` over the last dim, weightless and
        in x's own dtype (unlike `rms_norm`); with cos / sin, then the query's rotation `rope(., cos, sin)` (one op,
        so that a backend can do both in one pass over the queries). Differentiable. Always a new tensor (`inplace`
        permits, and does not require, writing over x)."""
        y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        return y if cos is None else self.rope(y, cos, sin)

    # ------------------------------------------------------------------------------------------ RoPE

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False,
             inplace: bool = False) -> torch.Tensor:
        """Rotate the last 2*cos.shape[-1] dims of x by interleaved pairs (x[2i], x[2i+1]); the rest pass through.

        cos/sin (fp32) must broadcast against x[..., :rope_dim // 2]. `inverse` rotates by the negative angle,
        which the attention uses to take the keys' rotation back out of its output (keys are values). The
        rotation is a complex fp32 product, as in the official code (torch's complex multiply rounds each product
        and then adds: (a c - b s, a s + b c)), cast back to x.dtype. `inplace`: the rotated dims are written
        into x, which is returned (for a caller that owns x and wants no gradient: the rest of x is not copied).
        Differentiable (not in place).
        """
        rope_dim = cos.shape[-1] * 2
        nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]
        pairs = torch.view_as_complex(rope.to(torch.float32).unflatten(-1, (-1, 2)).contiguous())
        rotation = torch.complex(cos, -sin if inverse else sin)
        rotated = torch.view_as_real(pairs * rotation).flatten(-2)
        if inplace:
            rope.copy_(rotated)
            return x
        return torch.cat((nope, rotated.to(x.dtype)), dim=-1)

    def norm_rope_qat(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                      sin: torch.Tensor, qat: str = "none") -> torch.Tensor:
        """The row pipeline of what a cache or the indexer stores, one op so that a backend can make it one pass:
        `rms_norm(x, weight, eps)` (none when weight is None), the rotation `rope(., cos, sin)` of the last dims,
        then the official inference's QAT rounding `qat`:

        * "none": nothing more;
        * "fp8_nope": the dims before the rotated ones through FP8 blocks of KV_SIM_BLOCK (`fp8_simulate`; the
          attention's KV rows and compressed entries);
        * "hadamard": the whole row Hadamard-rotated (`hadamard`; the indexer's queries and keys, plain numerics);
        * "hadamard_fp4": then through FP4 blocks of INDEXER_SIM_BLOCK (`fp4_simulate`; the same, exact numerics).

        Each step rounds to x's dtype as its own op does. Returns a new tensor in x's dtype; differentiable."""
        if qat not in QAT_ROUNDINGS:
            raise ValueError(f"qat must be one of {', '.join(QAT_ROUNDINGS)}, got {qat!r}")
        y = x if weight is None else self.rms_norm(x, weight, eps)
        y = self.rope(y, cos, sin)
        if qat == "fp8_nope":
            nope = y.shape[-1] - 2 * cos.shape[-1]
            return torch.cat((self.fp8_simulate(y[..., :nope]), y[..., nope:]), dim=-1)
        if qat.startswith("hadamard"):
            y = self.hadamard(y)
            return self.fp4_simulate(y) if qat == "hadamard_fp4" else y
        return y

    # ------------------------------------------------------------------------------------------ attention

    def sparse_attn(self, q: torch.Tensor, kv: torch.Tensor | Sequence[KVRows], idx: torch.Tensor,
                    sink: torch.Tensor, scale: float, cos: torch.Tensor | None = None,
                    sin: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of each query over its own list of KV rows, with a per-head attention sink; with cos / sin
        [B, S, rope/2] the output's rotation taken back (`rope_back`: the values are the keys, rotated), in the op
        so that a backend can do it as the output is written.

        q [B, S, H, D]; kv the rows (keys double as values): a [B, N, D] tensor, or runs of rows concatenated
        in order (dense [B, n, D] tensors and `PagedRows` left in their pages, see `dsv4.kernels.paged`);
        idx [B, S, K] int64 rows of that concatenation (-1 = unused slot); sink [H]. The sink is an extra logit
        that only enlarges the softmax denominator (it has no value), so a query whose slots are all unused
        returns 0. Returns [B, S, H, D] in q.dtype; differentiable in q, dense kv and sink. This reference
        decodes every paged row (`concat_rows`); a fast backend reads only the rows idx names.

        The arithmetic is the official kernel's: the slots are walked in idx order, ``ATTN_BLOCK`` at a time,
        with an online softmax in fp32 (running max m over the logits seen so far, p = exp(logit - m), running
        sum of p), the *unnormalised* p cast to kv.dtype before the value product into an fp32 accumulator
        (sum and accumulator rescaled by exp(m_old - m_new)), and at the end exp(sink - m) added to the
        denominator and the accumulator divided by it. Where the bf16 roundings happen matters: normalising
        before the cast rounds different numbers, and on FP8 activations such last-bit differences grow to
        whole quantisation steps downstream.
        """
        kv = concat_rows(kv)
        acc = compute_dtype(q, kv, sink)
        b, s, h, d = q.shape
        qf = q.to(acc)
        # rows of kv as one flat table: index_select gathers whole rows, about twice as fast as kv[batch, idx]
        flat_kv = kv.reshape(-1, kv.shape[-1])  # [B*N, D]
        row_base = (torch.arange(kv.shape[0], device=kv.device) * kv.shape[1]).view(-1, 1, 1)
        run_max = torch.full((b, s, h), float("-inf"), dtype=acc, device=q.device)
        denom = torch.zeros(b, s, h, dtype=acc, device=q.device)
        out = torch.zeros(b, s, h, d, dtype=acc, device=q.device)
        for lo in range(0, idx.shape[-1], ATTN_BLOCK):
            block = idx[..., lo : lo + ATTN_BLOCK]
            valid = block >= 0  # [B, S, k]
            rows = flat_kv.index_select(0, (block.clamp(min=0) + row_base).flatten()).view(*block.shape, d).to(acc)
            logits = torch.einsum("bshd,bskd->bshk", qf, rows) * scale
            logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
            # The result does not depend on the shifts (they cancel), so they carry no gradient. A query that
            # has seen no used slot yet keeps a finite shift: its exp() terms are exactly 0.
            new_max = torch.maximum(run_max, logits.amax(dim=-1)).detach()
            shift = torch.where(new_max.isfinite(), new_max, torch.zeros_like(new_max))
            rescale = torch.exp(run_max - shift)
            p = torch.exp(logits - shift.unsqueeze(-1))
            denom = denom * rescale + p.sum(dim=-1)
            out = out * rescale.unsqueeze(-1) + torch.einsum("bshk,bskd->bshd", p.to(kv.dtype).to(acc), rows)
            run_max = new_max
        sink_logit = sink.to(acc).view(1, 1, -1).expand(b, s, h)
        shift = torch.where(run_max.isfinite(), run_max, sink_logit.detach())
        denom = denom + torch.exp(sink_logit - shift)
        out = (out / denom.unsqueeze(-1)).to(q.dtype)
        return out if cos is None else self.rope_back(out, cos, sin)

    def rope_back(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The attention output o [B, S, H, D] with its last dims rotated back, ``rope(o, cos, sin, inverse=True)``
        for cos / sin [B, S, rope/2] shared by the heads; in place where no gradient is wanted (o is the op's
        own)."""
        inplace = not (torch.is_grad_enabled() and o.requires_grad)
        return self.rope(o, cos.unsqueeze(2), sin.unsqueeze(2), True, inplace)

    # ------------------------------------------------------------------------------------------ indexer

    def index_scores(self, q: torch.Tensor, keys: KVRows, weights: torch.Tensor,
                     visible: torch.Tensor | None = None, weight_scale: float = 1.0) -> torch.Tensor:
        """The lightning indexer's scores of queries q [B, S, Hi, D] against entries keys [B, N, D] (dense, or paged
        rows `load_rows` decodes; computed in q's dtype) with the per-head weights [B, S, Hi] (`visible` [B, S], the
        entries each query sees, lets a backend skip the later ones; the reference scores them all):

            ``I[b, s, n] = sum_h weights[b, s, h] * ReLU(q[b, s, h] . keys[b, n])``

        computed as torch computes it: one einsum for every head's dots (in q's dtype), ReLU, times the weights
        (the result type of the two), summed over the heads (torch's reduction; over one head a copy). Returns
        [B, S, N] in that result type (fp32 for fp32 inputs); differentiable. `weight_scale`: the weights are
        ``weights * weight_scale`` (in their dtype), scaled in the op so that a backend can do it as it reads them.
        """
        if weight_scale != 1.0:
            weights = weights * weight_scale
        keys = (self.load_rows(keys) if isinstance(keys, PagedRows) else keys).to(q.dtype)
        scores = torch.einsum("bshd,bnd->bshn", q, keys).relu_()  # [B,S,Hi,N]
        weighted = scores * weights.unsqueeze(-1)
        # over one head the sum is a copy (and torch's reduction over a size-1 dim is slow)
        return weighted[:, :, 0] if q.shape[2] == 1 else weighted.sum(dim=2)

    def index_topk(self, scores: torch.Tensor, visible: torch.Tensor, k: int, offset: int = 0,
                   prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The lightning indexer's selection. scores [B, S, N]: each query's index score of every entry (the
        `index_scores` op's result), set to -inf in place where the query does not see the entry (here; a backend may
        leave them); visible [B, S]
        int64: how many entries (0 .. visible-1) each query sees. Returns the ids [B, S, k'] (k' = min(k, N)) of
        the best entries by descending score, ties to the earlier entry (the official top-k's order, which the
        attention's blocks of candidates follow), plus `offset` (where the attention finds entry 0 among its rows),
        -1 where a query sees fewer than k', and their scores [B, S, k'] (-inf at those -1; differentiable in the
        scores). With `prefix` [B, S, W] int64 the ids come after it, [B, S, W + k'] (the attention's window slots
        first: one tensor written, where a backend can, instead of a concatenation after the op)."""
        seen = visible.unsqueeze(-1)  # [B,S,1]
        scores.masked_fill_(torch.arange(scores.shape[-1], device=scores.device) >= seen, float("-inf"))
        top = stable_topk(scores.detach(), k)  # [B,S,k']
        ids = torch.where(top < seen, top + offset if offset else top, -1)
        return ids if prefix is None else torch.cat((prefix, ids), dim=-1), scores.gather(-1, top)

    # ------------------------------------------------------------------------------------------ mHC

    def hc_head(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float,
                norm_eps: float) -> torch.Tensor:
        """The hc head (after the last block, before the output norm): x [B,S,h,d], fn [h, h*d], scale [1], base
        [h] -> `hc_collapse` with pre = sigmoid(`hc_mixes` * scale + base) + eps, [B,S,d] in x.dtype.
        Differentiable."""
        mixes = self.hc_mixes(x, fn, norm_eps)
        return self.hc_collapse(x, torch.sigmoid(mixes * scale.to(torch.float32) + base.to(torch.float32)) + eps)

    def hc_collapse(self, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """mHC's read of the streams into one sublayer input: x [B,S,h,d], pre [B,S,h] fp32 -> sum_k pre_k * x_k
        [B,S,d] in x.dtype, products rounded to fp32 and summed over k (torch's reduction). Differentiable."""
        return (pre.unsqueeze(-1) * x.to(torch.float32)).sum(dim=2).to(x.dtype)

    def hc_mixes(self, x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
        """mHC's dynamic coefficients before their split: x [B,S,h,d] -> fp32 [B,S,m], a weightless RMS norm over
        all h*d values folded into the linear map fn [m, h*d] (the product first, then times 1/rms). Differentiable."""
        flat = x.flatten(2).to(torch.float32)
        rms = torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
        return (flat @ fn.to(torch.float32).t()) * rms

    def hc_post(self, out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                inplace: bool = False) -> torch.Tensor:
        """mHC's write-back after a sublayer: new streams ``X'_k = post_k * out + sum_j comb[j,k] * X_j`` in fp32,
        returned in x.dtype. out [B,S,d], x [B,S,h,d], post [B,S,h] fp32, comb [B,S,h,h] fp32 (stream j -> k).

        The official expression: products rounded to fp32, then summed over j in order (an einsum fuses them
        differently); for many tokens term by term, the same additions without the [B,S,h,h,d] product tensor.
        Differentiable. Always a new tensor (`inplace` permits, and does not require, writing over x)."""
        xf = x.to(torch.float32)
        if comb.shape[0] * comb.shape[1] < HC_TERMWISE_TOKENS:
            mixed = torch.sum(comb.unsqueeze(-1) * xf.unsqueeze(-2), dim=2)
        else:
            mixed = comb[:, :, 0].unsqueeze(-1) * xf[:, :, 0].unsqueeze(-2)  # [B,S,k,d]: stream 0's share of each k
            for j in range(1, comb.shape[2]):
                mixed = mixed + comb[:, :, j].unsqueeze(-1) * xf[:, :, j].unsqueeze(-2)
        return (post.unsqueeze(-1) * out.to(torch.float32).unsqueeze(2) + mixed).to(x.dtype)

    def hc_pre(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_mult: int,
               iters: int, eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mHC's read of the streams before a sublayer, x [B,S,h,d] -> (u [B,S,d] in x.dtype, post [B,S,h], comb
        [B,S,h,h] fp32): `hc_mixes`, `hc_split_sinkhorn`, then `hc_collapse` with the pre weights, one op so that a
        backend can run the three in one pass over the streams. Differentiable."""
        mixes = self.hc_mixes(x, fn, norm_eps)
        pre, post, comb = self.hc_split_sinkhorn(mixes, scale, base, hc_mult, iters, eps)
        return self.hc_collapse(x, pre), post, comb

    def hc_pre_norm(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_mult: int,
                    iters: int, eps: float, norm_eps: float, weight: torch.Tensor, rms_eps: float, quantize: bool
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor, torch.Tensor]:
        """`hc_pre`, then `rms_norm` of u (with `quantize`, `rms_norm_quant`: inference): (normed, its FP8
        quantisation or None, post, comb). Differentiable without `quantize`."""
        u, post, comb = self.hc_pre(x, fn, scale, base, hc_mult, iters, eps, norm_eps)
        if quantize:
            normed, quantized = self.rms_norm_quant(u, weight, rms_eps)
            return normed, quantized, post, comb
        return self.rms_norm(u, weight, rms_eps), None, post, comb

    def hc_split_sinkhorn(self, mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_mult: int,
                          iters: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split the mHC mixes into (pre, post, comb) and project comb towards a doubly stochastic matrix.

        mixes [..., (2+h)*h], scale [3], base [(2+h)*h], h = hc_mult. Returns pre [..., h] = sigmoid + eps,
        post [..., h] = 2*sigmoid, comb [..., h, h]: row softmax + eps, column normalisation, then (iters - 1)
        rounds of row then column normalisation, each dividing by (sum + eps). Like the reference it ends on
        a column step, so columns sum to 1 up to eps while rows are only approximately normalised.
        """
        h = hc_mult
        if mixes.shape[-1] != (2 + h) * h:
            raise ValueError(f"hc_split_sinkhorn: need last dim (2+h)*h = {(2 + h) * h}, got {tuple(mixes.shape)}")
        if iters < 1:
            raise ValueError(f"hc_split_sinkhorn: iters must be >= 1, got {iters}")
        acc = compute_dtype(mixes, scale, base)
        m, scale, base = mixes.to(acc), scale.to(acc), base.to(acc)
        pre = torch.sigmoid(m[..., :h] * scale[0] + base[:h]) + eps
        post = 2.0 * torch.sigmoid(m[..., h : 2 * h] * scale[1] + base[h : 2 * h])
        logits = (m[..., 2 * h :] * scale[2] + base[2 * h :]).unflatten(-1, (h, h))  # [..., h, h] row-major
        # the row softmax as the official kernel computes it (exp, row sum, divide); torch.softmax rounds differently
        comb = torch.exp(logits - logits.amax(dim=-1, keepdim=True).detach())
        comb = comb / comb.sum(dim=-1, keepdim=True) + eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        for _ in range(iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        return pre, post, comb
