"""The Triton kernel backend: the reference's arithmetic as GPU kernels ("triton" in `dsv4.kernels`, the "auto"
choice for CUDA tensors when the `triton` package is installed).

Ops with a kernel:

* **quantisation** (`act_quant`, `fp8_simulate`, `fp4_quant`, `fp4_simulate`, `quant.py`): one program per block
  of rows, the power-of-two scale read off the fp32 bit pattern; bit-exact to the reference.
* **block-scaled GEMMs** (`fp8_gemm`, `fp4_gemm`, `gemm.py`): FP8 tensor-core dots per K block with the
  official two-level fp32 accumulation (an FP8 weight's GEMM over many rows through torch's own blockwise kernel
  on Hopper where a probe agrees, `scaled_mm.py`); `linear` and the experts reach them through the reference's
  `act_quant` + GEMM composition, or over the quantisation `rms_norm_quant` handed over; `linears` runs two FP8
  weights over one input's few rows (a decode step's wq_a and wkv, wq_b and the indexer's) as one launch.
* **routed experts** (`experts.py`): the routed rows sorted by expert once and run as two grouped GEMM launches
  (gate + up with the SwiGLU fused, reading each token's row quantised once, then down, writing each output at
  its (token, slot) place) over tiles that find their expert's weights through a pointer table, FP8, FP4 or
  float weights, and one launch adding each token's outputs; for a table whose every expert the kernels take, the
  sort and the tiles are laid out on the device (`routes_on_device`: no read of the device in an MoE layer; one
  kernel for a decode's few rows).
* **sparse attention** (`attention.py`): each query's window and selected compressed rows read in place (a cache
  view's window rings from the cache, paged entries from their pool, the production FP8 row layout decoded in the
  kernel, fp8 window rings too: `attends_in_place`), the official 64-slot online softmax with the sink; the
  output's rope dims rotated back as it is written; in a training step also its backward (`attention_grad.py`:
  the forward keeping each head's log-sum-exp, one backward launch adding the rows' gradients atomically).
* **lightning indexer scores** (`indexer.py`): one program per (entries, queries, batch row) tile, the heads'
  dots against one keys tile added up in head order; the engine's paged keys read in place, the fp8 format's
  FP4 keys decoded in the kernel.
* **the indexer's top-k** (`topk.py`): after torch's k-th value, one program per query picks every entry above it
  and the earliest at it and sorts the picks in registers (the reference's order, in two passes over the scores
  instead of the read-free `stable_topk`'s seven).
* **mHC** (`sinkhorn.py`, `mhc.py`): the Sinkhorn projection with every token's matrix in registers for all
  iterations (and, in a training step, its backward as one more launch); `hc_pre` as partial products with the
  mixing map, then one launch adding them up, splitting and projecting, and collapsing the streams (two
  launches; `hc_pre_norm`: the collapse's programs take whole rows and norm them, with their FP8 quantisation, as
  `rms_norm_quant`'s kernel does), and the hc head's pre and collapse the same way; `hc_post` and `hc_collapse`
  in one each (and in a training step their backward in one more each, `mhc_grad.py`).
* **row ops** (`rows.py`): `rms_norm` (with `rms_norm_quant`, its output's FP8 codes and scales written by the
  same program; in a training step differentiable, `rows_grad.py`), the queries' `head_norm` with their
  rotation, `rope`, `hadamard` (its butterfly passes in registers), and `norm_rope_qat` (the keys', entries' and
  indexer queries' norm, rotation and QAT rounding in one pass; `norm_rope_store`: the rows then encoded and stored
  into a cache's pages as `kv_rows` stores them), one launch each.
* **the cache's stored rows** (`kv_rows.py`): a row set written (its pages looked up, encoded in the production
  "fp8" layouts or stored as it is) and a run of rows read and decoded, one launch each.
* **the compressors' pooling** (`pool.py`): each entry's candidates read in place, the per-channel softmax and
  sum in one launch; a decode step's `ring_pool` writes the tokens into their ring slots first, in the same launch,
  and `project_ring_pool` also computes the tokens' two projections there (the step's compressor in one launch).
* **the router's tail** (`route.py`): the top-k of scores + bias and the normalised weights, one launch after
  torch's product with the gate weight (V4's sqrt(softplus) scores made in the same launch; other score functions'
  scores torch's).
* **the shared expert** (`swiglu`): the routed experts' grouped kernels over a table of one expert.
* **the head's cross-entropy** (`head_loss.py`): the head's GEMM, the loss and its gradients a block of rows at a
  time, each block's logits turned into their gradient in place by one launch (never all the logits at once).
* **a training step's routed experts** (`grouped.py`): the kernels have no backward, so a forward that wants
  gradients sorts the routed rows by expert on the device and runs each projection as one ``torch._grouped_mm``
  over all experts (differentiable by torch; no read of the device, where the reference reads it per expert).

At a batch-1 decode step a kernel's cost is its launch, not its bytes: `benchmarks/decode_launches.py` counts a
static decode step's kernels (small preset, exact numerics: 1,635 before these fusions, 252 after).

A training step (gradients wanted) runs the ops with a backward here (`grouped.py`, `sinkhorn.py`, `mhc_grad.py`,
`rows_grad.py`, `attention_grad.py`, `head_loss.py`: the routed experts, mHC's mixes, Sinkhorn, collapse and
write-back, `rms_norm`, the sparse attention, the head's cross-entropy;
`benchmarks/train_launches.py` counts its kernels). Every other op, and every op on inputs a kernel does not take
(other gradients wanted, fp64, shapes outside a kernel's `covers`), is the reference's, so training and odd shapes
stay correct. Kernels run on CUDA tensors, or
on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, how the tests check them on machines without
a GPU); on CPU tensors without the interpreter every op is the reference's.

The kernels agree with the reference to fp32 rounding (the order of additions inside a tensor-core dot is the
hardware's), not bit for bit; `tests/test_triton_*.py` state each op's tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dsv4.quant import FP8_BLOCK, INDEXER_SIM_BLOCK, KV_SIM_BLOCK

from ..cross_entropy import IGNORE_INDEX
from ..experts import ExpertWeights, chosen_experts
from ..paged import KVRows, PagedRows
from ..reference import ReferenceBackend, router_logits, router_scores
from . import (
    attention,
    attention_grad,
    experts,
    gemm,
    grouped,
    head_loss,
    indexer,
    kv_rows,
    mhc,
    mhc_grad,
    pool,
    quant,
    route,
    rows,
    rows_grad,
    scaled_mm,
    sinkhorn,
    topk,
)
from .numerics import interpreting
from .pool import covers_projection, covers_ring
from .pool import project_ring_pool as _project_ring_pool
from .pool import ring_pool as _ring_pool  # (`pool` is also ring_pool's argument)

_GROUPED = "grouped"  # a table's plan: torch's differentiable grouped GEMM (`grouped.py`), for training


def _runs_here(tensor: Tensor) -> bool:
    """Triton can run a kernel on this tensor: a CUDA tensor, or any tensor under the interpreter."""
    return tensor.is_cuda or (interpreting() and tensor.device.type == "cpu")


class TritonBackend(ReferenceBackend):
    """Triton kernels where they apply, the reference elsewhere; see the module docstring."""

    name = "triton"

    def __init__(self) -> None:
        self.expert_pointers = experts.ExpertPointers()
        self._planned: tuple = (None, None, None)  # the last `routes_on_device` answer: (table, device, plan)

    # ------------------------------------------------------------------------------------------ quantisation

    def act_quant(self, x: Tensor, block_size: int = FP8_BLOCK) -> tuple[Tensor, Tensor]:
        if _runs_here(x) and quant.covers(x, block_size):
            return quant.act_quant(x, block_size)
        return super().act_quant(x, block_size)

    def fp8_simulate(self, x: Tensor, block_size: int = KV_SIM_BLOCK) -> Tensor:
        if _runs_here(x) and quant.covers(x, block_size):
            return quant.fp8_simulate(x, block_size)
        return super().fp8_simulate(x, block_size)

    def fp4_quant(self, x: Tensor, block_size: int = INDEXER_SIM_BLOCK) -> tuple[Tensor, Tensor]:
        if _runs_here(x) and quant.covers(x, block_size):
            return quant.fp4_quant(x, block_size)
        return super().fp4_quant(x, block_size)

    def fp4_simulate(self, x: Tensor, block_size: int = INDEXER_SIM_BLOCK) -> Tensor:
        if _runs_here(x) and quant.covers(x, block_size):
            return quant.fp4_simulate(x, block_size)
        return super().fp4_simulate(x, block_size)

    # ------------------------------------------------------------------------------------------ GEMMs

    def fp8_gemm(self, xq: Tensor, xs: Tensor, w: Tensor, ws: Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
        if _runs_here(xq) and w.dtype == torch.float8_e4m3fn and gemm.covers(xq, xs, w, ws, out_dtype):
            if xq.is_cuda and scaled_mm.takes(xq, xs, w, ws, out_dtype):  # many rows: torch's CUTLASS kernel
                return scaled_mm.fp8_gemm(xq, xs, w, ws, out_dtype)
            return gemm.fp8_gemm(xq, xs, w, ws, out_dtype)
        return super().fp8_gemm(xq, xs, w, ws, out_dtype)

    def linears(self, x: Tensor, weights: Sequence[tuple[Tensor, Tensor | None]],
                quantized: tuple[Tensor, Tensor] | None = None) -> list[Tensor]:
        if (len(weights) == 2 and quantized is not None and _runs_here(x)
                and all(w.dtype == torch.float8_e4m3fn and s is not None for w, s in weights)):
            xq, xs = quantized
            if all(gemm.covers(xq, xs, w, s, x.dtype) for w, s in weights) and not (
                    xq.is_cuda and any(scaled_mm.takes(xq, xs, w, s, x.dtype) for w, s in weights)):
                (w1, s1), (w2, s2) = weights  # a decode's few rows: both GEMMs in one launch
                return list(gemm.fp8_gemm_pair(xq, xs, w1, s1, w2, s2, x.dtype))
        return super().linears(x, weights, quantized)

    def fp4_gemm(self, xq: Tensor, xs: Tensor, w: Tensor, ws: Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
        if _runs_here(xq) and w.dtype != torch.float8_e4m3fn and gemm.covers(xq, xs, w, ws, out_dtype):
            return gemm.fp4_gemm(xq, xs, w, ws, out_dtype)
        return super().fp4_gemm(xq, xs, w, ws, out_dtype)

    def head_cross_entropy(self, x: Tensor, weight: Tensor, targets: Tensor,
                           ignore_index: int = IGNORE_INDEX) -> Tensor:
        if _runs_here(x) and head_loss.covers(x, weight, targets):
            return head_loss.head_cross_entropy(x, weight, targets, ignore_index)
        return super().head_cross_entropy(x, weight, targets, ignore_index)

    # ------------------------------------------------------------------------------------------ experts

    def moe_gate(self, x: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor | None, score_func: str,
                 topk: int, route_scale: float) -> tuple[Tensor, Tensor, Tensor]:
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        # (under autocast torch's scores come in its dtype, not the fp32 the kernel ranks: the reference's tail)
        if (_runs_here(x) and x.dim() == 2 and not grad and not torch.is_autocast_enabled(x.device.type)
                and route.covers(x.shape[0], weight.shape[0], bias, ids, topk)):
            if score_func == "sqrtsoftplus":  # (V4's: the scores made in the routing launch)
                return route.route_sqrt_softplus(router_logits(x, weight), bias, ids, topk, route_scale)
            scores = router_scores(x, weight, score_func)  # [T, E] fp32, the reference's
            weights, ids = route.route(scores, bias, ids, topk, score_func != "softmax", route_scale)
            return weights, ids, scores
        return super().moe_gate(x, weight, bias, ids, score_func, topk, route_scale)

    def routes_on_device(self, x: Tensor, table: Sequence[ExpertWeights | None]) -> bool:
        # the MoE layer asks, then runs the experts at once: the plan is not checked twice (a few us an MoE layer)
        self._planned = (table, x.device, self._plan(x, table))
        return self._planned[2] is not None

    def _plan(self, x: Tensor, table: Sequence[ExpertWeights | None]) -> experts.TablePlan | str | None:
        """How every expert of the table runs over x without a read of the device: the kernels' plan, or for a
        forward that wants gradients (which the kernels have none for) torch's grouped GEMM (`_GROUPED`), or None."""
        if grouped.wants_grad(x, table):
            return _GROUPED if grouped.covers(x, table) else None
        return self.expert_pointers.plan(x, table) if _runs_here(x) else None

    def routed_experts(self, x: Tensor, weights: Tensor, ids: Tensor, table: Sequence[ExpertWeights | None],
                       which: Sequence[int] | None, limit: float,
                       quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if which is None:
            table_, device, plan = self._planned
            if table_ is not table or device != x.device:
                plan = self._plan(x, table)
            if plan is _GROUPED:
                return grouped.routed_experts(x, weights, ids, table, limit)
            if plan is not None:
                return experts.routed_experts_on_device(x, weights, ids, plan, limit, quantized)
            which = chosen_experts(ids)
        if _runs_here(x) and not grouped.wants_grad(x, table) and experts.covers(x, table, which):
            return experts.routed_experts(x, weights, ids, table, which, limit, self.expert_pointers, quantized)
        return super().routed_experts(x, weights, ids, table, which, limit, quantized)

    def swiglu(self, x: Tensor, expert: ExpertWeights, limit: float, weights: Tensor | None = None,
               add: Tensor | None = None, quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        wanted = (x, expert.w1, expert.w3, expert.w2, *(t for t in (weights, add) if t is not None))
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in wanted)
        if (_runs_here(x) and x.dim() == 2 and not grad and experts.covers(x, [expert], [0])
                and (add is None or experts.covers_add(x, add))):
            return experts.swiglu(x, expert, limit, weights, self.expert_pointers, add, quantized)
        return super().swiglu(x, expert, limit, weights, add, quantized)

    # ------------------------------------------------------------------------------------------ attention

    def sparse_attn(self, q: Tensor, kv: Tensor | Sequence[KVRows], idx: Tensor, sink: Tensor,
                    scale: float, cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
        runs = [kv] if isinstance(kv, Tensor) else list(kv)
        here = _runs_here(q)
        covered = here and attention.covers(q, runs, idx, sink)
        if not covered and here and isinstance(runs[0], PagedRows) and runs[0].codec is not None:
            runs[0] = self.load_rows(runs[0])  # rings the kernel does not decode beside these runs: decoded first
            covered = attention.covers(q, runs, idx, sink)
        if covered:
            if attention.covers_rotation(q, cos, sin):
                return attention.sparse_attn(q, runs, idx, sink, scale, cos, sin)
            return self.rope_back(attention.sparse_attn(q, runs, idx, sink, scale), cos, sin)
        if here and attention_grad.covers(q, runs, idx, sink, cos, sin):  # (training: kernels both ways)
            return attention_grad.sparse_attn(q, runs, idx, sink, scale, cos, sin)
        return super().sparse_attn(q, kv, idx, sink, scale, cos, sin)

    def gated_pool(self, kv: Tensor, score: Tensor, candidates: Tensor) -> Tensor:
        if _runs_here(kv) and pool.covers(kv, score, candidates):
            return pool.gated_pool(kv, score, candidates)
        return super().gated_pool(kv, score, candidates)

    def ring_pool(self, kv: Tensor, score: Tensor, ape: Tensor, positions: Tensor, ring_kv: Tensor,
                  ring_score: Tensor, ring_base: Tensor, pool: bool, dtype: torch.dtype) -> Tensor | None:
        if _runs_here(kv) and covers_ring(kv, score, ape, positions, ring_kv, ring_score, ring_base, dtype):
            return _ring_pool(kv, score, ape, positions, ring_kv, ring_score, ring_base, pool, dtype)
        return super().ring_pool(kv, score, ape, positions, ring_kv, ring_score, ring_base, pool, dtype)

    def project_ring_pool(self, x: Tensor, wkv: Tensor, wgate: Tensor, ape: Tensor, positions: Tensor,
                          ring_kv: Tensor, ring_score: Tensor, ring_base: Tensor, pool: bool,
                          dtype: torch.dtype) -> Tensor | None:
        if _runs_here(x) and covers_projection(x, wkv, wgate, ape, positions, ring_kv, ring_score, ring_base, dtype):
            return _project_ring_pool(x, wkv, wgate, ape, positions, ring_kv, ring_score, ring_base, pool, dtype)
        return super().project_ring_pool(x, wkv, wgate, ape, positions, ring_kv, ring_score, ring_base, pool, dtype)

    def store_rows(self, values: Tensor, dest: PagedRows, rows: Tensor | None, index: Tensor) -> None:
        if _runs_here(values) and kv_rows.covers_store(values, dest, rows, index):
            return kv_rows.store_rows(values, dest, rows, index)
        return super().store_rows(values, dest, rows, index)

    def load_rows(self, src: PagedRows) -> Tensor:
        if _runs_here(src.pool) and kv_rows.covers_load(src):
            return kv_rows.load_rows(src)
        return super().load_rows(src)

    def attends_in_place(self, rows: PagedRows) -> bool:
        if rows.codec is None:
            return True
        return _runs_here(rows.pool) and attention.fp8_first_run(rows, getattr(rows.codec, "dim", -1))

    # ------------------------------------------------------------------------------------------ indexer

    def index_scores(self, q: Tensor, keys: KVRows, weights: Tensor, visible: Tensor | None = None,
                     weight_scale: float = 1.0) -> Tensor:
        if _runs_here(q) and indexer.covers(q, keys, weights, visible):
            return indexer.index_scores(q, keys, weights, visible, weight_scale)
        return super().index_scores(q, keys, weights, visible, weight_scale)

    def index_topk(self, scores: Tensor, visible: Tensor, k: int, offset: int = 0,
                   prefix: Tensor | None = None) -> tuple[Tensor, Tensor]:
        k = min(k, scores.shape[-1])
        if (_runs_here(scores) and topk.covers(scores, k)
                and not (torch.is_grad_enabled() and scores.requires_grad)
                and (prefix is None or tuple(prefix.shape[:-1]) == tuple(scores.shape[:-1]))):
            # the reference's picks in its order (plus the offset, after the prefix), and their scores
            return topk.index_picks(scores, visible, k, offset, prefix)
        return super().index_topk(scores, visible, k, offset, prefix)

    # ------------------------------------------------------------------------------------------ rows

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        if _runs_here(x) and rows.covers_rms_norm(x, weight):
            return rows.rms_norm(x, weight, eps)
        if _runs_here(x) and rows_grad.covers_rms_norm(x, weight):  # (training: the kernel both ways)
            return rows_grad.rms_norm(x, weight, eps)
        return super().rms_norm(x, weight, eps)

    def rms_norm_quant(self, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        if _runs_here(x) and rows.covers_rms_norm(x, weight):
            return rows.rms_norm_quant(x, weight, eps)
        return super().rms_norm_quant(x, weight, eps)

    def head_norm(self, x: Tensor, eps: float, cos: Tensor | None = None, sin: Tensor | None = None,
                  inplace: bool = False) -> Tensor:
        if _runs_here(x) and rows.covers_head_norm(x, cos, sin):
            return rows.head_norm(x, eps, cos, sin, inplace)
        return super().head_norm(x, eps, cos, sin, inplace)

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False, inplace: bool = False) -> Tensor:
        if _runs_here(x) and rows.covers_head_norm(x, cos, sin):
            return rows.rope(x, cos, sin, inverse, inplace)
        return super().rope(x, cos, sin, inverse, inplace)

    def norm_rope_qat(self, x: Tensor, weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor,
                      qat: str = "none") -> Tensor:
        if _runs_here(x) and rows.covers_norm_rope_qat(x, weight, cos, sin, qat):
            return rows.norm_rope_qat(x, weight, eps, cos, sin, qat)
        return super().norm_rope_qat(x, weight, eps, cos, sin, qat)

    def norm_rope_store(self, x: Tensor, weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor, qat: str,
                        dest: PagedRows, batch_rows: Tensor | None, index: Tensor) -> None:
        if _runs_here(x) and rows.covers_norm_rope_store(x, weight, cos, sin, qat, dest, batch_rows, index):
            rows.norm_rope_store(x, weight, eps, cos, sin, qat, dest, batch_rows, index)
        else:
            super().norm_rope_store(x, weight, eps, cos, sin, qat, dest, batch_rows, index)

    def hadamard(self, x: Tensor) -> Tensor:
        if _runs_here(x) and rows.covers_hadamard(x):
            return rows.hadamard(x)
        return super().hadamard(x)

    # ------------------------------------------------------------------------------------------ mHC

    def hc_pre(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int, eps: float,
               norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        if _runs_here(x) and mhc.covers_pre(x, fn, scale, base, hc_mult, iters):
            return mhc.hc_pre(x, fn, scale, base, hc_mult, iters, eps, norm_eps)
        if _runs_here(x) and mhc_grad.covers_mixes(x, fn):  # (training: the collapse's gradient added by the mixes')
            link = mhc_grad.PreLink()
            mixes = mhc_grad.hc_mixes(x, fn, norm_eps, link)
            pre, post, comb = self.hc_split_sinkhorn(mixes, scale, base, hc_mult, iters, eps)
            if mhc_grad.covers_collapse(x, pre):
                return mhc_grad.hc_collapse(x, pre, link), post, comb
            return self.hc_collapse(x, pre), post, comb
        return super().hc_pre(x, fn, scale, base, hc_mult, iters, eps, norm_eps)

    def hc_pre_norm(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int, eps: float,
                    norm_eps: float, weight: Tensor, rms_eps: float, quantize: bool
                    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None, Tensor, Tensor]:
        if _runs_here(x) and mhc.covers_pre_norm(x, fn, scale, base, hc_mult, iters, weight):
            return mhc.hc_pre_norm(x, fn, scale, base, hc_mult, iters, eps, norm_eps, weight, rms_eps, quantize)
        return super().hc_pre_norm(x, fn, scale, base, hc_mult, iters, eps, norm_eps, weight, rms_eps, quantize)

    def hc_mixes(self, x: Tensor, fn: Tensor, norm_eps: float) -> Tensor:
        if _runs_here(x) and mhc_grad.covers_mixes(x, fn):  # (training: one pass over the streams each way)
            return mhc_grad.hc_mixes(x, fn, norm_eps)
        return super().hc_mixes(x, fn, norm_eps)

    def hc_collapse(self, x: Tensor, pre: Tensor) -> Tensor:
        if _runs_here(x) and mhc.covers_collapse(x, pre):
            return mhc.hc_collapse(x, pre)
        if _runs_here(x) and mhc_grad.covers_collapse(x, pre):  # (training: the kernel both ways)
            return mhc_grad.hc_collapse(x, pre)
        return super().hc_collapse(x, pre)

    def hc_head(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, eps: float, norm_eps: float) -> Tensor:
        if _runs_here(x) and mhc.covers_head(x, fn, scale, base):
            return mhc.hc_head(x, fn, scale, base, eps, norm_eps)
        return super().hc_head(x, fn, scale, base, eps, norm_eps)

    def hc_post(self, out: Tensor, x: Tensor, post: Tensor, comb: Tensor, inplace: bool = False) -> Tensor:
        if _runs_here(x) and mhc.covers_post(out, x, post, comb):
            return mhc.hc_post(out, x, post, comb)
        if _runs_here(x) and mhc_grad.covers_post(out, x, post, comb):  # (training: the kernel both ways)
            return mhc_grad.hc_post(out, x, post, comb)
        return super().hc_post(out, x, post, comb, inplace)

    def hc_split_sinkhorn(self, mixes: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int,
                          eps: float) -> tuple[Tensor, Tensor, Tensor]:
        if _runs_here(mixes) and sinkhorn.covers(mixes, hc_mult, iters, scale, base):
            return sinkhorn.hc_split_sinkhorn(mixes, scale, base, hc_mult, iters, eps)
        if _runs_here(mixes) and sinkhorn.covers_backward(mixes, hc_mult, iters, scale, base):  # (training)
            return sinkhorn.split_sinkhorn_trainable(mixes, scale, base, hc_mult, iters, eps)
        return super().hc_split_sinkhorn(mixes, scale, base, hc_mult, iters, eps)
