"""Triton MoE routing after the gate's product (`ReferenceBackend.moe_gate`'s tail): one program per token picks the
top-k of scores + bias, gathers the picked scores, normalises them and applies the route scale; the reference's
add, top-k, gather, sum, division and product are six kernels in every MoE layer's every step. The product with the
gate weight stays torch's (`reference.router_logits`). V4's score function, sqrt(softplus), is computed in the
same program from the logits (two kernels fewer a layer), as torch computes it (the input above 20, else
``log1p(exp(z))``, then the correctly rounded square root): on a GPU with libdevice's ``expf`` and ``log1pf``,
the CUDA math library's functions that torch's CUDA softplus calls, so the scores should be torch's there bit for
bit and the experts picked the reference's (no GPU has checked it yet); under the interpreter (the CPU tests)
with its own exp and log1p (`numerics.log1p`), to fp32 rounding. The other score functions stay torch's
(`reference.router_scores`).

The top-k is k rounds of (the largest key, the earliest index holding it), keys in fp32 as torch adds them; a NaN
key ranks above every number, as torch's top-k ranks it. Picks come in descending key order, ties by index (where
torch leaves the order of equal values unspecified). The weights' sum adds the k picks in order, then divides
(round to nearest) and scales. torch's CPU sum adds a row of 2, 3 or 8 so too (bit for bit), one of 6 in another
order (V4's k): the weights agree to fp32 rounding there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .numerics import exp, libdevice_exp, log1p

_MAX_EXPERTS = 4096
_MAX_K = 64


@triton.jit
def _sqrt_softplus(z, LIBDEVICE: tl.constexpr):
    """torch's ``F.softplus(z).sqrt()`` in fp32 (beta 1, threshold 20)."""
    return tl.sqrt_rn(tl.where(z > 20.0, z, log1p(exp(z, LIBDEVICE), LIBDEVICE)))


@triton.jit
def _route_kernel(scores_ptr, logits_ptr, bias_ptr, ids_ptr, weights_ptr, E, route_scale, K: tl.constexpr,
                  KP: tl.constexpr, EP: tl.constexpr, GIVEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                  NORMALISE: tl.constexpr, SQRT_SOFTPLUS: tl.constexpr, LIBDEVICE: tl.constexpr):
    """scores [T, E] fp32 (+ bias [E]) -> ids [T, K] int64 (read instead where GIVEN), weights [T, K] fp32; with
    SQRT_SOFTPLUS the scores are written, from logits [T, E] fp32."""
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, EP)
    e_ok = e < E
    slot = tl.arange(0, KP)
    slot_ok = slot < K
    if SQRT_SOFTPLUS:
        s = _sqrt_softplus(tl.load(logits_ptr + t * E + e, mask=e_ok, other=0.0), LIBDEVICE)
        tl.store(scores_ptr + t * E + e, s, mask=e_ok)
    else:
        s = tl.load(scores_ptr + t * E + e, mask=e_ok, other=0.0)
    if GIVEN:
        ids = tl.load(ids_ptr + t * K + slot, mask=slot_ok, other=0)
    else:
        key = s
        if HAS_BIAS:
            key = key + tl.load(bias_ptr + e, mask=e_ok, other=0.0)
        key = tl.where(key != key, float("inf"), key)  # NaN first, as torch's top-k ranks it
        key = tl.where(e_ok, key, float("-inf"))
        taken = e < 0  # (all false)
        ids = tl.zeros((KP,), tl.int64)
        for q in tl.static_range(K):
            best = tl.max(tl.where(taken, float("-inf"), key), axis=0)
            pick = tl.min(tl.where((key == best) & ~taken & e_ok, e, EP), axis=0)
            ids = tl.where(slot == q, pick, ids)
            taken = taken | (e == pick)
        tl.store(ids_ptr + t * K + slot, ids, mask=slot_ok)
    picked = tl.sum(tl.where(e[None, :] == ids[:, None], s[None, :], 0.0), axis=1)  # [KP] scores[ids]
    if NORMALISE:  # the k picks added in order
        total = tl.sum(tl.where(slot == 0, picked, 0.0), axis=0)
        for q in tl.static_range(1, K):
            total = total + tl.sum(tl.where(slot == q, picked, 0.0), axis=0)
        picked = tl.math.div_rn(picked, tl.zeros((KP,), tl.float32) + total)
    tl.store(weights_ptr + t * K + slot, picked * route_scale, mask=slot_ok)


def covers(tokens: int, experts: int, bias: Tensor | None, ids: Tensor | None, topk: int) -> bool:
    """Scores [tokens, experts] (experts <= 4,096), 1 <= k <= min(experts, 64), an fp32 bias [experts] or given
    int64 ids [tokens, k]; no gradient wanted of them."""
    if not (1 <= experts <= _MAX_EXPERTS and 1 <= topk <= min(experts, _MAX_K)):
        return False
    if ids is None and (bias is None or bias.dtype != torch.float32 or tuple(bias.shape) != (experts,)):
        return False
    if ids is not None and (ids.dtype != torch.int64 or tuple(ids.shape) != (tokens, topk)):
        return False
    return not (torch.is_grad_enabled() and bias is not None and bias.requires_grad)


def route(scores: Tensor, bias: Tensor | None, ids: Tensor | None, topk: int, normalise: bool,
          route_scale: float) -> tuple[Tensor, Tensor]:
    """(weights [T, k] fp32, ids [T, k] int64) from the scores [T, E] fp32: the given ids, else the top-k of scores +
    bias."""
    return _route(scores.contiguous(), None, bias, ids, topk, normalise, route_scale)


def route_sqrt_softplus(logits: Tensor, bias: Tensor | None, ids: Tensor | None, topk: int,
                        route_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """`route` of the scores sqrt(softplus(logits)) (logits [T, E] fp32), computed in the same launch: (weights, ids,
    scores [T, E] fp32), the weights normalised."""
    scores = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    weights, ids = _route(scores, logits.contiguous(), bias, ids, topk, True, route_scale)
    return weights, ids, scores


def _route(scores: Tensor, logits: Tensor | None, bias: Tensor | None, ids: Tensor | None, topk: int,
           normalise: bool, route_scale: float) -> tuple[Tensor, Tensor]:
    t, e = scores.shape
    out_ids = ids.contiguous() if ids is not None else torch.empty((t, topk), dtype=torch.int64, device=scores.device)
    weights = torch.empty((t, topk), dtype=torch.float32, device=scores.device)
    if t:
        ep = triton.next_power_of_2(e)
        _route_kernel[(t,)](scores, scores if logits is None else logits, scores if bias is None else bias.contiguous(),
                            out_ids, weights, e, float(route_scale), K=topk, KP=triton.next_power_of_2(topk), EP=ep,
                            GIVEN=ids is not None, HAS_BIAS=bias is not None, NORMALISE=normalise,
                            SQRT_SOFTPLUS=logits is not None, LIBDEVICE=libdevice_exp(),
                            num_warps=4 if ep >= 1024 else 1, enable_fp_fusion=False)
    return weights, out_ids
