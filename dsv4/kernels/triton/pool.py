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
def _pool_entry(kv_ptr, score_ptr, cand, out_ptr, entry, col, col_ok, s_kv, s_score, s_out,
                LIBDEVICE: tl.constexpr, DT: tl.constexpr):
    """One entry's pooled block of channels `col` into out (rounded to DT), from its candidate rows `cand` [NP]
    (-1: none)."""
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
    j = tl.arange(0, NP)
    cand = tl.load(cand_ptr + entry * n + j, mask=j < n, other=-1)
    _pool_entry(kv_ptr, score_ptr, cand, out_ptr, entry, col, col < C, s_kv, s_score, s_out, LIBDEVICE, tl.float32)


@triton.jit
def _ring_pool_kernel(kv_ptr, score_ptr, ape_ptr, pos_ptr, ring_kv_ptr, ring_score_ptr, base_ptr, out_ptr,
                      c, s_kv, s_score, s_out, RATIO: tl.constexpr, COFF: tl.constexpr, RING: tl.constexpr,
                      POOL: tl.constexpr, BC: tl.constexpr, LIBDEVICE: tl.constexpr, DT: tl.constexpr):
    """Row b's token at position p = pos[b]: kv, score [B, COFF*c] (+ ape[p % RATIO]) into slot p % R of its ring,
    which starts at row base[b] of the rings [rows*R, COFF*c] (R = RING = COFF * RATIO); then (POOL) its entry
    j = p // RATIO pooled from the rings seen as rows of c: program (b, block of c's channels) writes that block of
    each of the COFF halves and pools the same channels of the entry's candidates (`reference.ring_candidates`,
    derived here: all in row b's ring)."""
    b = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BC + tl.arange(0, BC)
    col_ok = col < c
    p = tl.load(pos_ptr + b).to(tl.int64)
    base = tl.load(base_ptr + b).to(tl.int64)
    at = base + p % RING
    ape_row = p % RATIO
    for h in tl.static_range(COFF):
        ch = h * c + col
        tl.store(ring_kv_ptr + at * (COFF * c) + ch, tl.load(kv_ptr + b * s_kv + ch, mask=col_ok), mask=col_ok)
        score = tl.load(score_ptr + b * s_score + ch, mask=col_ok) + tl.load(ape_ptr + ape_row * (COFF * c) + ch,
                                                                              mask=col_ok)
        tl.store(ring_score_ptr + at * (COFF * c) + ch, score, mask=col_ok)
    if POOL:
        tl.debug_barrier()  # (the slot just written is a candidate: its stores before any thread's loads)
        first = (p // RATIO) * RATIO  # the entry's first position
        t = tl.arange(0, RING)  # candidate t: CSA's previous block's first halves (t < RATIO), then this block's
        if COFF == 2:  # second halves; as rows of c, a slot's halves are rows 2 * slot and 2 * slot + 1
            i = t % RATIO
            prev = tl.where(first == 0, -1, 2 * (base + (first + i + RATIO) % RING))
            cand = tl.where(t < RATIO, prev, 2 * (base + (first + i) % RING) + 1)
        else:
            cand = base + (first + t) % RING
        _pool_entry(ring_kv_ptr, ring_score_ptr, cand, out_ptr, b, col, col_ok, c, c, s_out, LIBDEVICE, DT)


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




def covers_ring(kv: Tensor, score: Tensor, ape: Tensor, positions: Tensor, ring_kv: Tensor, ring_score: Tensor,
                ring_base: Tensor, dtype: torch.dtype) -> bool:
    """kv, score fp32 [B, C] (unit last strides), ape fp32 [ratio, C] contiguous, positions and ring_base integer
    [B], the rings fp32 [rows, R, C] contiguous with R = coff * ratio (coff 1 or 2, C a multiple of coff, R a power
    of two up to 1,024: the candidates), an fp32 / bf16 / fp16 dtype; no gradient wanted."""
    if dtype not in TL_DTYPES or any(t.dtype != torch.float32 for t in (kv, score, ape, ring_kv, ring_score)):
        return False
    if kv.dim() != 2 or score.shape != kv.shape or kv.stride(-1) != 1 or score.stride(-1) != 1:
        return False
    b, width = kv.shape
    if ape.dim() != 2 or ape.shape[1] != width or not ape.is_contiguous():
        return False
    if any(t.dim() != 3 or t.shape[-1] != width or not t.is_contiguous() for t in (ring_kv, ring_score)):
        return False
    if ring_kv.shape != ring_score.shape or positions.shape != (b,) or ring_base.shape != (b,):
        return False
    if positions.is_floating_point() or ring_base.is_floating_point():
        return False
    ratio, ring = ape.shape[0], ring_kv.shape[1]
    if ring not in (ratio, 2 * ratio) or width % (ring // ratio) or ring > _MAX_CANDIDATES or ring & (ring - 1):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (kv, score, ape)))


def ring_pool(kv: Tensor, score: Tensor, ape: Tensor, positions: Tensor, ring_kv: Tensor, ring_score: Tensor,
              ring_base: Tensor, pool: bool, dtype: torch.dtype) -> Tensor | None:
    """``ReferenceBackend.ring_pool``: one launch for the slots' writes and the pooling, the slots and candidates
    derived from the positions in the kernel."""
    b, width = kv.shape
    ratio, ring = ape.shape[0], ring_kv.shape[1]
    coff = ring // ratio
    c = width // coff
    out = torch.empty((b, c), dtype=dtype, device=kv.device) if pool else None
    if b:
        bc = max(16, min(triton.next_power_of_2(c), _TILE // ring))
        _ring_pool_kernel[(b, triton.cdiv(c, bc))](
            kv, score, ape, positions.contiguous(), ring_kv, ring_score, ring_base.contiguous(),
            kv if out is None else out, c, kv.stride(0), score.stride(0), c if out is None else out.stride(0),
            RATIO=ratio, COFF=coff, RING=ring, POOL=pool, BC=bc, LIBDEVICE=libdevice_exp(), DT=TL_DTYPES[dtype],
            num_warps=4 if ring * bc >= 2048 else 2)
    return out
