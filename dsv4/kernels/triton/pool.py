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
        _pool_ring_entry(ring_kv_ptr, ring_score_ptr, out_ptr, b, p, base, col, col_ok, c, s_out, RATIO, COFF, RING,
                         LIBDEVICE, DT)


@triton.jit
def _pool_ring_entry(ring_kv_ptr, ring_score_ptr, out_ptr, b, p, base, col, col_ok, c, s_out, RATIO: tl.constexpr,
                     COFF: tl.constexpr, RING: tl.constexpr, LIBDEVICE: tl.constexpr, DT: tl.constexpr):
    """Row b's entry j = p // RATIO (its token at position p) pooled from its ring (starting at ring row `base`) seen
    as rows of c, block of channels `col`: the candidates `reference.ring_candidates` names, derived here."""
    first = (p // RATIO) * RATIO  # the entry's first position
    t = tl.arange(0, RING)  # candidate t: CSA's previous block's first halves (t < RATIO), then this block's
    if COFF == 2:  # second halves; as rows of c, a slot's halves are rows 2 * slot and 2 * slot + 1
        i = t % RATIO
        prev = tl.where(first == 0, -1, 2 * (base + (first + i + RATIO) % RING))
        cand = tl.where(t < RATIO, prev, 2 * (base + (first + i) % RING) + 1)
    else:
        cand = base + (first + t) % RING
    _pool_entry(ring_kv_ptr, ring_score_ptr, cand, out_ptr, b, col, col_ok, c, c, s_out, LIBDEVICE, DT)


@triton.jit
def _project_ring_pool_kernel(x_ptr, wkv_ptr, wgate_ptr, ape_ptr, pos_ptr, ring_kv_ptr, ring_score_ptr, base_ptr,
                              out_ptr, B, K, c, s_x, s_out, RATIO: tl.constexpr, COFF: tl.constexpr,
                              RING: tl.constexpr, POOL: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                              BK: tl.constexpr, LIBDEVICE: tl.constexpr, DT: tl.constexpr):
    """`_ring_pool_kernel` with the projections made here: program (block of c's channels, block of BM batch rows)
    computes kv = x wkv^T and score = x wgate^T (x [B, K] in fp32, the weights fp32 [COFF * c, K]) for its channels
    of each of the COFF halves, reading each weight row once for the BM rows, and writes them into the rows' ring
    slots (score plus its ape row); then (POOL) pools each of its rows' entries over the same channels."""
    row0 = tl.program_id(1) * BM
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < B
    # the program's channels of both halves as one vector: half h = j // BC, channel col of it
    j = tl.arange(0, COFF * BC)
    colj = tl.program_id(0) * BC + j % BC
    ch = (j // BC) * c + colj  # [COFF*BC] rows of the weights, columns of a ring slot
    ch_ok = colj < c
    k = tl.arange(0, BK)
    acc_kv = tl.zeros((BM, COFF * BC), dtype=tl.float32)
    acc_score = tl.zeros((BM, COFF * BC), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        kk = kb * BK + k
        k_ok = kk < K
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_x + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)  # [BM, BK]
        w_at = ch[:, None].to(tl.int64) * K + kk[None, :]
        w_ok = ch_ok[:, None] & k_ok[None, :]
        wkv = tl.load(wkv_ptr + w_at, mask=w_ok, other=0.0)  # [COFF*BC, BK]
        wgate = tl.load(wgate_ptr + w_at, mask=w_ok, other=0.0)
        acc_kv += tl.sum(xt[:, None, :] * wkv[None, :, :], axis=2)
        acc_score += tl.sum(xt[:, None, :] * wgate[None, :, :], axis=2)
    p = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # [BM]
    at = tl.load(base_ptr + rows, mask=row_ok, other=0).to(tl.int64) + p % RING
    slot = at[:, None] * (COFF * c) + ch[None, :]
    ok = row_ok[:, None] & ch_ok[None, :]
    tl.store(ring_kv_ptr + slot, acc_kv, mask=ok)
    ape = tl.load(ape_ptr + (p % RATIO)[:, None] * (COFF * c) + ch[None, :], mask=ok, other=0.0)
    tl.store(ring_score_ptr + slot, acc_score + ape, mask=ok)
    if POOL:
        tl.debug_barrier()  # (the slots just written are candidates: their stores before any thread's loads)
        col = tl.program_id(0) * BC + tl.arange(0, BC)
        for i in tl.static_range(BM):
            b = (row0 + i).to(tl.int64)
            if b < B:
                _pool_ring_entry(ring_kv_ptr, ring_score_ptr, out_ptr, b, tl.load(pos_ptr + b).to(tl.int64),
                                 tl.load(base_ptr + b).to(tl.int64), col, col < c, c, s_out, RATIO, COFF, RING,
                                 LIBDEVICE, DT)


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
    """kv, score fp32 [B, C] (unit last strides), and what `_rings_fit` asks; no gradient wanted."""
    if kv.dtype != torch.float32 or score.dtype != torch.float32:
        return False
    if kv.dim() != 2 or score.shape != kv.shape or kv.stride(-1) != 1 or score.stride(-1) != 1:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (kv, score, ape)):
        return False
    return _rings_fit(kv.shape[0], kv.shape[1], ape, positions, ring_kv, ring_score, ring_base, dtype)


def _rings_fit(b: int, width: int, ape: Tensor, positions: Tensor, ring_kv: Tensor, ring_score: Tensor,
               ring_base: Tensor, dtype: torch.dtype) -> bool:
    """A decode step of B rows over rings of C = `width` channels: ape fp32 [ratio, C] contiguous, positions and
    ring_base integer [B], the rings fp32 [rows, R, C] contiguous with R = coff * ratio (coff 1 or 2, C a multiple of
    coff, R a power of two up to 1,024: the candidates), an fp32 / bf16 / fp16 dtype; no gradient wanted of ape."""
    if dtype not in TL_DTYPES or any(t.dtype != torch.float32 for t in (ape, ring_kv, ring_score)):
        return False
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
    return not (torch.is_grad_enabled() and ape.requires_grad)


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


# the projecting kernel's blocks: BC channels of each half a program (enough programs to stream the weights at a
# decode step's batch 1: a V4-Flash CSA compressor's 512 channels are 128 programs), BM batch rows sharing each
# weight tile read, and a product tile [BM, COFF*BC, BK] of at most _PRODUCT elements
_PROJECT_CHANNELS = 4
_PROJECT_ROWS = 8
_PRODUCT = 4096


def covers_projection(x: Tensor, wkv: Tensor, wgate: Tensor, ape: Tensor, positions: Tensor, ring_kv: Tensor,
                      ring_score: Tensor, ring_base: Tensor, dtype: torch.dtype) -> bool:
    """x [B, K] (fp32 / bf16 / fp16, unit last stride), the weights fp32 [C, K] contiguous, and what `_rings_fit`
    asks; no gradient wanted."""
    if x.dim() != 2 or x.dtype not in TL_DTYPES or x.stride(-1) != 1:
        return False
    if any(w.dtype != torch.float32 or w.dim() != 2 or not w.is_contiguous() for w in (wkv, wgate)):
        return False
    if wkv.shape != wgate.shape or wkv.shape[1] != x.shape[1]:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, wkv, wgate)):
        return False
    return _rings_fit(x.shape[0], wkv.shape[0], ape, positions, ring_kv, ring_score, ring_base, dtype)


def project_ring_pool(x: Tensor, wkv: Tensor, wgate: Tensor, ape: Tensor, positions: Tensor, ring_kv: Tensor,
                      ring_score: Tensor, ring_base: Tensor, pool: bool, dtype: torch.dtype) -> Tensor | None:
    """``ReferenceBackend.project_ring_pool``: one launch for the two projections, the slots' writes and the
    pooling. The projections' sums over K are the kernel's own order (fp32 products, a reduction tree per block of
    K, the blocks in order), so kv and the scores agree with the reference's GEMMs to fp32 rounding."""
    b, k = x.shape
    ratio, ring = ape.shape[0], ring_kv.shape[1]
    coff = ring // ratio
    c = wkv.shape[0] // coff
    out = torch.empty((b, c), dtype=dtype, device=x.device) if pool else None
    if b:
        bm = min(_PROJECT_ROWS, triton.next_power_of_2(b))
        bc = min(_PROJECT_CHANNELS, triton.next_power_of_2(c))
        bk = max(16, min(triton.next_power_of_2(k), _PRODUCT // (bm * coff * bc)))
        _project_ring_pool_kernel[(triton.cdiv(c, bc), triton.cdiv(b, bm))](
            x, wkv, wgate, ape, positions.contiguous(), ring_kv, ring_score, ring_base.contiguous(),
            x if out is None else out, b, k, c, x.stride(0), c if out is None else out.stride(0),
            RATIO=ratio, COFF=coff, RING=ring, POOL=pool, BM=bm, BC=bc, BK=bk, LIBDEVICE=libdevice_exp(),
            DT=TL_DTYPES[dtype], num_warps=4)
    return out
