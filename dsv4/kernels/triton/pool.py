"""Triton compressor pooling (`ReferenceBackend.gated_pool`): one program per (entry, block of channels) reads its
candidate rows of kv and score in place and combines them by the per-channel softmax of the scores; the
reference's gather, masks, softmax, product and sum are about ten kernels, in every compressed layer's every step.

The arithmetic is the reference's (missing candidates: score -inf, kv 0; ``exp(s - max)``, its sum, the division,
the products and their sum, in fp32) but the two sums over the candidates are reduction trees, where torch's CPU
sums add in order: the entries agree to fp32 rounding (`tests/test_triton_pool.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .numerics import exp, libdevice_exp

_MAX_CANDIDATES = 1024  # a program holds an entry's candidates x a block of channels in registers
_TILE = 4096


@triton.jit
def _gated_pool_kernel(kv_ptr, score_ptr, cand_ptr, out_ptr, n, C, s_kv, s_score, s_out,
                       NP: tl.constexpr, BC: tl.constexpr, LIBDEVICE: tl.constexpr):
    """kv, score [rows, C] fp32, candidates [E, n] (-1: none) -> out [E, C]."""
    entry = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BC + tl.arange(0, BC)
    col_ok = col < C
    j = tl.arange(0, NP)
    cand = tl.load(cand_ptr + entry * n + j, mask=j < n, other=-1)
    have = cand >= 0
    rows = tl.maximum(cand, 0).to(tl.int64)
    mask = have[:, None] & col_ok[None, :]
    s = tl.load(score_ptr + rows[:, None] * s_score + col[None, :], mask=mask, other=float("-inf"))
    v = tl.load(kv_ptr + rows[:, None] * s_kv + col[None, :], mask=mask, other=0.0)
    # (a column past C has no candidates: kept finite, no -inf - -inf or 0 / 0)
    top = tl.where(col_ok, tl.max(s, axis=0), 0.0)
    e = exp(s - top[None, :], LIBDEVICE)
    p = tl.math.div_rn(e, tl.where(col_ok, tl.sum(e, axis=0), 1.0)[None, :])
    tl.store(out_ptr + entry * s_out + col, tl.sum(v * p, axis=0), mask=col_ok)


def covers(kv: Tensor, score: Tensor, candidates: Tensor) -> bool:
    """kv and score fp32 [rows, c] with unit last strides, candidates integer [E, n] (1 <= n <= 1,024), no gradient
    wanted."""
    if kv.dtype != torch.float32 or score.dtype != torch.float32 or kv.dim() != 2 or score.shape != kv.shape:
        return False
    if candidates.dim() != 2 or candidates.dtype not in (torch.int64, torch.int32):
        return False
    if not 1 <= candidates.shape[1] <= _MAX_CANDIDATES:  # (no candidates: the reference's empty sum)
        return False
    if kv.stride(-1) != 1 or score.stride(-1) != 1:
        return False
    return not (torch.is_grad_enabled() and (kv.requires_grad or score.requires_grad))


def gated_pool(kv: Tensor, score: Tensor, candidates: Tensor) -> Tensor:
    """``ReferenceBackend.gated_pool``: [E, c] fp32."""
    e, n = candidates.shape
    c = kv.shape[-1]
    out = torch.empty((e, c), dtype=torch.float32, device=kv.device)
    if out.numel():
        np_ = triton.next_power_of_2(n)
        bc = max(16, min(triton.next_power_of_2(c), _TILE // np_))
        _gated_pool_kernel[(e, triton.cdiv(c, bc))](
            kv, score, candidates.contiguous(), out, n, c, kv.stride(0), score.stride(0), out.stride(0),
            NP=np_, BC=bc, LIBDEVICE=libdevice_exp(), num_warps=4 if np_ * bc >= 2048 else 2)
    return out
