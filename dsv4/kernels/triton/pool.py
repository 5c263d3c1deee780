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

from .numerics import TL_DTYPES, exp, libdevice_exp, round_to

_MAX_CANDIDATES = 1024  # a program holds an entry's candidates x a block of channels in registers
_TILE = 4096


@triton.jit
def _pool_entry(kv_ptr, score_ptr, cand_ptr, out_ptr, entry, col, col_ok, n, s_kv, s_score, s_out,
                NP: tl.constexpr, LIBDEVICE: tl.constexpr, DT: tl.constexpr):
    """One entry's pooled block of channels `col` into out (rounded to DT)."""
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
    tl.store(out_ptr + entry * s_out + col, round_to(tl.sum(v * p, axis=0), DT), mask=col_ok)


@triton.jit
def _gated_pool_kernel(kv_ptr, score_ptr, cand_ptr, out_ptr, n, C, s_kv, s_score, s_out,
                       NP: tl.constexpr, BC: tl.constexpr, LIBDEVICE: tl.constexpr):
    """kv, score [rows, C] fp32, candidates [E, n] (-1: none) -> out [E, C]."""
    entry = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BC + tl.arange(0, BC)
    _pool_entry(kv_ptr, score_ptr, cand_ptr, out_ptr, entry, col, col < C, n, s_kv, s_score, s_out, NP, LIBDEVICE,
                tl.float32)


@triton.jit
def _ring_pool_kernel(kv_ptr, score_ptr, ape_ptr, phase_ptr, ring_kv_ptr, ring_score_ptr, at_ptr, cand_ptr, out_ptr,
                      n, c, s_kv, s_score, s_out, COFF: tl.constexpr, POOL: tl.constexpr, NP: tl.constexpr,
                      BC: tl.constexpr, LIBDEVICE: tl.constexpr, DT: tl.constexpr):
    """Row b's token kv, score [B, COFF*c] (+ ape[phase[b]]) into ring row at[b] of the rings [rows*R, COFF*c], then
    (POOL) entry b pooled from the rings seen as rows of c: program (b, block of c's channels) writes that block of
    each of the COFF halves and pools the same channels of the row's own candidates (all in row b's ring)."""
    b = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BC + tl.arange(0, BC)
    col_ok = col < c
    at = tl.load(at_ptr + b).to(tl.int64)
    ape_row = tl.load(phase_ptr + b).to(tl.int64)
    for h in tl.static_range(COFF):
        ch = h * c + col
        tl.store(ring_kv_ptr + at * (COFF * c) + ch, tl.load(kv_ptr + b * s_kv + ch, mask=col_ok), mask=col_ok)
        score = tl.load(score_ptr + b * s_score + ch, mask=col_ok) + tl.load(ape_ptr + ape_row * (COFF * c) + ch,
                                                                              mask=col_ok)
        tl.store(ring_score_ptr + at * (COFF * c) + ch, score, mask=col_ok)
    if POOL:
        tl.debug_barrier()  # (the slot just written is a candidate: its stores before any thread's loads)
        _pool_entry(ring_kv_ptr, ring_score_ptr, cand_ptr, out_ptr, b, col, col_ok, n, c, c, s_out, NP, LIBDEVICE,
                    DT)


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




def covers_ring(kv: Tensor, score: Tensor, ape: Tensor, phase: Tensor, ring_kv: Tensor, ring_score: Tensor,
                ring_at: Tensor, candidates: Tensor | None, dtype: torch.dtype) -> bool:
    """kv, score fp32 [B, C] (unit last strides), ape fp32 [ratio, C] contiguous, phase and ring_at integer [B], the
    rings fp32 [rows, R, C] contiguous, candidates None or integer [B, coff * ratio] (<= 1,024) for C = coff * c, an
    fp32 / bf16 / fp16 dtype; no gradient wanted."""
    if dtype not in TL_DTYPES or any(t.dtype != torch.float32 for t in (kv, score, ape, ring_kv, ring_score)):
        return False
    if kv.dim() != 2 or score.shape != kv.shape or kv.stride(-1) != 1 or score.stride(-1) != 1:
        return False
    b, width = kv.shape
    if ape.dim() != 2 or ape.shape[1] != width or not ape.is_contiguous():
        return False
    if any(t.dim() != 3 or t.shape[-1] != width or not t.is_contiguous() for t in (ring_kv, ring_score)):
        return False
    if ring_kv.shape != ring_score.shape or phase.shape != (b,) or ring_at.shape != (b,):
        return False
    if phase.is_floating_point() or ring_at.is_floating_point():
        return False
    if candidates is not None:
        n = candidates.shape[-1] if candidates.dim() == 2 else 0
        if candidates.shape[0] != b or candidates.is_floating_point() or not 1 <= n <= _MAX_CANDIDATES:
            return False
        if n % ape.shape[0] or width % (n // ape.shape[0]):
            return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (kv, score, ape)))


def ring_pool(kv: Tensor, score: Tensor, ape: Tensor, phase: Tensor, ring_kv: Tensor, ring_score: Tensor,
              ring_at: Tensor, candidates: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``ReferenceBackend.ring_pool``: one launch for the slots' writes and the pooling."""
    b, width = kv.shape
    coff = 1 if candidates is None else candidates.shape[1] // ape.shape[0]
    c = width // coff
    n = 1 if candidates is None else candidates.shape[1]
    out = None if candidates is None else torch.empty((b, c), dtype=dtype, device=kv.device)
    if b:
        np_ = triton.next_power_of_2(n)
        bc = max(16, min(triton.next_power_of_2(c), _TILE // np_))
        _ring_pool_kernel[(b, triton.cdiv(c, bc))](
            kv, score, ape, phase.contiguous(), ring_kv, ring_score, ring_at.contiguous(),
            kv if candidates is None else candidates.contiguous(), kv if out is None else out, n, c, kv.stride(0),
            score.stride(0), c if out is None else out.stride(0), COFF=coff, POOL=candidates is not None, NP=np_,
            BC=bc, LIBDEVICE=libdevice_exp(), DT=TL_DTYPES[dtype], num_warps=4 if np_ * bc >= 2048 else 2)
    return out
