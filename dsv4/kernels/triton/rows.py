"""Triton row-wise ops: `rms_norm` (and `rms_norm_quant`), `head_norm` (with the query's RoPE fused in), `rope`,
`hadamard` and `norm_rope_qat` (with `norm_rope_store`, its rows stored into a cache's pages by `kv_rows`'
encoders); each is one launch and one pass over the rows, where the reference takes five to twenty kernels (casts,
square, mean, rsqrt, products, the complex rotation, a concatenation; three a butterfly pass). At a batch-1 decode
step that launch count, not the bytes, is their cost (`benchmarks/decode_launches.py`).

The arithmetic is the reference's op for op (products and sums unfused: launched with ``enable_fp_fusion=False``):

* `rms_norm`: fp32 ``weight * (x * rsqrt(mean(x^2) + eps))`` cast to x's dtype; `rms_norm_quant` also quantises
  the rows it stores (read back exactly, zeros past the row) in blocks of 128, `quant.quantize_rows`' arithmetic:
  bit for bit `act_quant` of the normed rows;
* `head_norm`: the same without a weight and in x's own dtype, each op's result rounded to it as torch's bf16 ops
  round theirs (square, mean, + eps, rsqrt, product), then the rotation;
* `rope`: the last 2*half dims as interleaved pairs (a, b) times (c, s): ``(a c - b s, a s + b c)`` in fp32, each
  product rounded before the sum, as torch's complex multiply does; ``inverse`` negates s;
* `hadamard`: the reference's log2(n) butterfly passes ``(a + b, a - b)`` over pairs at distances 1, 2, 4, ... in
  fp32, in registers (each pass a reshape that splits the pairs apart and joins the sums back), then times
  ``1/sqrt(n)``: bit for bit.

The norm and the quantisation of `rms_norm_quant` are `@triton.jit` helpers (`normed_rows`, `store_act_quant`)
that `mhc.hc_pre_norm`'s collapse calls too, over the same row tiles, so its normed rows are this kernel's.

``rsqrt`` is ``1 / sqrt`` with both correctly rounded (what torch's CPU rsqrt computes). The mean's sum is a
reduction tree, where torch's CPU sum keeps several running sums: the two agree to fp32 rounding, not bit for bit,
so a bf16 output can sit one bf16 step from the reference's (`tests/test_triton_rows.py` states the tolerances).

Rows are the tensor's last dim (unit stride) in a [A, H] grid of leading dims: x [..., H, D] viewed as [A, H, D],
with cos / sin broadcast to [A, H, half] (a stride of 0 where they broadcast, as the queries' shared rotation
does). Tensors that do not view so, fp64, and inputs that want a gradient are the reference's.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsv4.quant import ACT_AMAX_FLOOR, FP4_AMAX_FLOOR, FP4_MAX, FP8_BLOCK, FP8_MAX, INDEXER_SIM_BLOCK, KV_SIM_BLOCK

from ..paged import PagedRows
from . import kv_rows
from .kv_rows import store_encoded, store_entries
from .numerics import TL_DTYPES, interpreting, round_to
from .quant import pow2_scale_bits, quantize_rows

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_D = 16384  # the widest row a program holds in registers
_TILE = 4096  # elements a program takes (rows x padded width)



@triton.jit
def _as(x, DT: tl.constexpr):
    """x rounded to DT (as torch rounds an op's result in that dtype), carried on in fp32."""
    return round_to(x, DT).to(tl.float32)


@triton.jit
def widen(y, DT: tl.constexpr):
    """fp32 values of y (in DT): bf16 by its bits shifted into place (exact; the interpreter's conversion is not for
    subnormals)."""
    if DT == tl.bfloat16:
        return (y.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return y.to(tl.float32)


@triton.jit
def _rsqrt(v):
    return tl.math.div_rn(tl.full(v.shape, 1.0, tl.float32), tl.math.sqrt_rn(v))


@triton.jit
def _tile(pid, A, H, BLOCK_H: tl.constexpr):
    """The program's BLOCK_H rows of the [A, H] grid, in row-major order: each one's a and h, and the mask."""
    row = pid.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    return row // H, row % H, row < A * H


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, q_ptr, s_ptr, A, H, D, NB, sxa, sxh, soa, soh, eps,
                     DP: tl.constexpr, BLOCK_H: tl.constexpr, DT: tl.constexpr, QUANT: tl.constexpr,
                     QB: tl.constexpr, FLOOR: tl.constexpr, INV_MAX: tl.constexpr):
    """x rows [A, H, D] -> out rows; with QUANT also `act_quant` of out: e4m3 codes q [A*H, D] (uint8) and the
    scales s [A*H, NB] of its blocks of QB columns (a partial last block padded with zeros, as the reference's)."""
    a, h, h_ok = _tile(tl.program_id(0), A, H, BLOCK_H)
    col = tl.arange(0, DP)
    mask = h_ok[:, None] & (col < D)[None, :]
    x = tl.load(x_ptr + (a * sxa + h * sxh)[:, None] + col[None, :], mask=mask, other=0.0).to(tl.float32)
    y = normed_rows(x, w_ptr, col, D, eps, DT)
    tl.store(out_ptr + (a * soa + h * soh)[:, None] + col[None, :], y, mask=mask)
    if QUANT:
        store_act_quant(y, (a * H + h).to(tl.int64), h_ok, col, mask, q_ptr, s_ptr, D, NB, DP, BLOCK_H, QB, FLOOR,
                        INV_MAX, DT)


@triton.jit
def normed_rows(x, w_ptr, col, D, eps, DT: tl.constexpr):
    """`rms_norm` of rows x [R, DP] fp32 (zeros past D) with the weight at w_ptr: ``w * (x * rsqrt(mean(x^2) +
    eps))`` in fp32, rounded to DT."""
    w = tl.load(w_ptr + col, mask=col < D, other=0.0).to(tl.float32)
    r = _rsqrt(tl.sum(x * x, axis=1) / D + eps)
    return round_to(w[None, :] * (x * r[:, None]), DT)


@triton.jit
def store_act_quant(y, row, row_ok, col, mask, q_ptr, s_ptr, D, NB, DP: tl.constexpr, R: tl.constexpr,
                    QB: tl.constexpr, FLOOR: tl.constexpr, INV_MAX: tl.constexpr, DT: tl.constexpr):
    """`act_quant` of rows y [R, DP] in DT (masked past D: zeros) stored as e4m3 codes q [rows, D] (uint8) and fp32
    scales s [rows, NB] of blocks of QB columns, at rows `row` [R] (int64) where `row_ok`."""
    blocks = tl.reshape(tl.where(mask, widen(y, DT), 0.0), (R * (DP // QB), QB))  # a block a row of `blocks`
    scale_bits = pow2_scale_bits(tl.max(tl.abs(blocks), axis=1), FLOOR, INV_MAX)
    codes = tl.reshape(quantize_rows(blocks, scale_bits, False, False), (R, DP))
    tl.store(q_ptr + row[:, None] * D + col[None, :], codes, mask=mask)
    nb = tl.arange(0, DP // QB)
    scales = tl.reshape(scale_bits.to(tl.float32, bitcast=True), (R, DP // QB))
    tl.store(s_ptr + row[:, None] * NB + nb[None, :], scales, mask=row_ok[:, None] & (nb < NB)[None, :])


@triton.jit
def _rows_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, A, H, D, HALF, sxa, sxh, sca, sch, soa, soh, eps,
                 NORM: tl.constexpr, ROPE: tl.constexpr, INVERSE: tl.constexpr, WRITE_NOPE: tl.constexpr,
                 DP: tl.constexpr, HALFP: tl.constexpr, BLOCK_H: tl.constexpr, DT: tl.constexpr):
    """x rows -> out rows: the weightless head norm in x's dtype (NORM), then the rotation of the last 2*HALF dims
    (ROPE); WRITE_NOPE: also write the dims before them (else out is x, whose other dims stand)."""
    a, h, h_ok = _tile(tl.program_id(0), A, H, BLOCK_H)
    x_rows = x_ptr + (a * sxa + h * sxh)[:, None]
    out_rows = out_ptr + (a * soa + h * soh)[:, None]
    r = tl.full((BLOCK_H,), 1.0, tl.float32)
    if NORM:
        col = tl.arange(0, DP)
        mask = h_ok[:, None] & (col < D)[None, :]
        x = tl.load(x_rows + col[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = _as(tl.sum(_as(x * x, DT), axis=1) / D, DT)
        r = _as(_rsqrt(_as(mean + eps, DT)), DT)
        if WRITE_NOPE:
            keep = mask & (col < D - 2 * HALF)[None, :] if ROPE else mask
            tl.store(out_rows + col[None, :], round_to(x * r[:, None], DT), mask=keep)
    elif WRITE_NOPE:
        col = tl.arange(0, DP)
        keep = h_ok[:, None] & (col < D - 2 * HALF)[None, :]
        tl.store(out_rows + col[None, :], tl.load(x_rows + col[None, :], mask=keep), mask=keep)
    if ROPE:
        i = tl.arange(0, HALFP)
        mask = h_ok[:, None] & (i < HALF)[None, :]
        # the (even, odd) pairs read and written as one contiguous [BLOCK_H, HALFP, 2] tile, so the loads are vectors
        # (two stride-2 loads were one element a load)
        pairs = (D - 2 * HALF + 2 * i)[None, :, None] + tl.arange(0, 2)[None, None, :]
        mask2 = tl.broadcast_to(mask[:, :, None], (BLOCK_H, HALFP, 2))
        av, bv = tl.split(tl.load(x_rows[:, :, None] + pairs, mask=mask2, other=0.0).to(tl.float32))
        if NORM:
            av = _as(av * r[:, None], DT)
            bv = _as(bv * r[:, None], DT)
        trig = (a * sca + h * sch)[:, None] + i[None, :]
        c = tl.load(cos_ptr + trig, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + trig, mask=mask, other=0.0).to(tl.float32)
        if INVERSE:
            s = -s
        tl.store(out_rows[:, :, None] + pairs, tl.join(round_to(av * c - bv * s, DT), round_to(av * s + bv * c, DT)),
                 mask=mask2)


@triton.jit
def _butterfly(y, BLOCK_R: tl.constexpr, N: tl.constexpr, H: tl.constexpr):
    """One pass over y [BLOCK_R, N]: (a + b, a - b) for the pairs at distance H."""
    pairs = tl.permute(tl.reshape(y, (BLOCK_R, N // (2 * H), 2, H)), (0, 1, 3, 2))  # [R, groups, H, (a|b)]
    a, b = tl.split(pairs)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (BLOCK_R, N))


@triton.jit
def _hadamard_kernel(x_ptr, out_ptr, R, sxr, sor, scale, N: tl.constexpr, LOG_N: tl.constexpr,
                     BLOCK_R: tl.constexpr, DT: tl.constexpr):
    """x [R, N] -> out [R, N]: each row's Walsh-Hadamard transform times `scale`, rounded to DT."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.arange(0, N)
    mask = (rows < R)[:, None]
    rows64 = rows.to(tl.int64)
    y = tl.load(x_ptr + rows64[:, None] * sxr + col[None, :], mask=mask, other=0.0).to(tl.float32)
    for i in tl.static_range(LOG_N):
        y = _butterfly(y, BLOCK_R, N, 1 << i)
    tl.store(out_ptr + rows64[:, None] * sor + col[None, :], round_to(y * scale, DT), mask=mask)


@triton.jit
def _simulate_blocks(y, cols, width, BLOCK_H: tl.constexpr, DP: tl.constexpr, QB: tl.constexpr,
                     FLOOR: tl.constexpr, INV_MAX: tl.constexpr, FP4: tl.constexpr):
    """y [BLOCK_H, DP] fp32 with the columns below `width` through FP8 / FP4 blocks of QB columns and back (a
    block's amax over those columns alone: the reference quantises the slice, a partial block padded with zeros);
    the other columns as they are."""
    inside = cols < width  # [DP]
    blocks = tl.reshape(tl.where(inside[None, :], y, 0.0), (BLOCK_H * (DP // QB), QB))
    scale_bits = pow2_scale_bits(tl.max(tl.abs(blocks), axis=1), FLOOR, INV_MAX)
    rounded = tl.reshape(quantize_rows(blocks, scale_bits, FP4, True), (BLOCK_H, DP))
    return tl.where(inside[None, :], rounded, y)


@triton.jit
def _norm_rope_qat_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, A, H, HALF, sxa, sxh, sca, sch, soa, soh, eps,
                          scale,
                          rows_ptr, idx_ptr, S, pool_ptr, pool16_ptr, sp_0, sp_1, tab_ptr, st_b, st_p,  # STORE
                          NORM: tl.constexpr, QAT: tl.constexpr, DP: tl.constexpr, LOG_D: tl.constexpr,
                          BLOCK_H: tl.constexpr, DT: tl.constexpr, FP8_QB: tl.constexpr, FP4_QB: tl.constexpr,
                          FP8_FLOOR: tl.constexpr, FP8_INV: tl.constexpr, FP4_FLOOR: tl.constexpr,
                          FP4_INV: tl.constexpr,
                          STORE: tl.constexpr, KIND: tl.constexpr, HAS_ROWS: tl.constexpr,
                          ROWS_PER_PAGE: tl.constexpr, NOPE: tl.constexpr, NSCALE: tl.constexpr,
                          SCALE_BYTES: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """x rows [A, H, DP] -> out rows: RMSNorm with w (NORM), the rotation of the last 2*HALF dims, then QAT (0 none,
    1 FP8 on the dims before them, 2 Hadamard, 3 Hadamard then FP4), each stage rounded to DT as its op rounds.
    With STORE the rows go into a cache's pool instead, as `kv_rows.store_rows` stores them (row a * H + h of the
    grid is `store_rows`' row i; KIND and the rest are its kernel's)."""
    a, h, h_ok = _tile(tl.program_id(0), A, H, BLOCK_H)
    col = tl.arange(0, DP)
    mask = h_ok[:, None] & (col < DP)[None, :]
    y = tl.load(x_ptr + (a * sxa + h * sxh)[:, None] + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        w = tl.load(w_ptr + col).to(tl.float32)
        r = _rsqrt(tl.sum(y * y, axis=1) / DP + eps)
        y = _as(w[None, :] * (y * r[:, None]), DT)
    # the rotation over interleaved pairs (a, b): pair p is rotated when p >= DP/2 - HALF, by cos/sin column
    # p - (DP/2 - HALF)
    ev, od = tl.split(tl.reshape(y, (BLOCK_H, DP // 2, 2)))
    pair = tl.arange(0, DP // 2)
    first = DP // 2 - HALF
    turn = h_ok[:, None] & (pair >= first)[None, :]
    trig = (a * sca + h * sch)[:, None] + (pair - first)[None, :]
    c = tl.load(cos_ptr + trig, mask=turn, other=1.0)
    s = tl.load(sin_ptr + trig, mask=turn, other=0.0)
    ev2 = tl.where(turn, _as(ev * c - od * s, DT), ev)
    od2 = tl.where(turn, _as(ev * s + od * c, DT), od)
    y = tl.reshape(tl.join(ev2, od2), (BLOCK_H, DP))
    if QAT == 1:
        y = _simulate_blocks(y, col, DP - 2 * HALF, BLOCK_H, DP, FP8_QB, FP8_FLOOR, FP8_INV, False)
    elif QAT >= 2:
        for i in tl.static_range(LOG_D):
            y = _butterfly(y, BLOCK_H, DP, 1 << i)
        y = _as(y * scale, DT)
        if QAT == 3:
            y = _simulate_blocks(y, col, DP, BLOCK_H, DP, FP4_QB, FP4_FLOOR, FP4_INV, True)
    if STORE:
        i = a * H + h
        entry = store_entries(i, h_ok, rows_ptr, idx_ptr, S, tab_ptr, st_b, st_p, sp_0, sp_1, HAS_ROWS,
                              ROWS_PER_PAGE)
        out = round_to(y, DT)
        if DT == tl.float32:  # (the pool as its elements' bits: `kv_rows.store_args`)
            bits = out.to(tl.int32, bitcast=True)
        else:
            bits = out.to(tl.int16, bitcast=True)
        store_encoded(bits, widen(out, DT), entry, h_ok, col, pool_ptr, pool16_ptr, DP, KIND, NOPE, NSCALE,
                      SCALE_BYTES, SCALE_BLOCK, BLOCK_H, DP)
    else:
        tl.store(out_ptr + (a * soa + h * soh)[:, None] + col[None, :], round_to(y, DT), mask=mask)


def _grid_view(t: Tensor, lead: tuple[int, int]) -> Tensor | None:
    """t as [A, H, last] without a copy (last dim unit-strided), or None where it does not view so."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return None
    try:
        return t.view(*lead, t.shape[-1])
    except RuntimeError:
        return None


def _lead(x: Tensor) -> tuple[int, int]:
    h = x.shape[-2] if x.dim() >= 2 else 1
    return (math.prod(x.shape[:-2]), h)


def _no_grad(*tensors: Tensor | None) -> bool:
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def covers_rms_norm(x: Tensor, weight: Tensor) -> bool:
    """x fp32/bf16/fp16 [..., D] (D <= 16384, viewing as [A, H, D]), weight [D] not fp64, no gradient wanted."""
    return (x.dtype in _DTYPES and x.dim() >= 1 and 0 < x.shape[-1] <= _MAX_D and weight.dim() == 1
            and weight.shape[0] == x.shape[-1] and weight.dtype != torch.float64 and _no_grad(x, weight)
            and _grid_view(x, _lead(x)) is not None)


def _covers_rope(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    half = cos.shape[-1]
    if not (cos.shape == sin.shape and 0 < 2 * half <= x.shape[-1] and cos.dtype == torch.float32
            and sin.dtype == torch.float32 and _no_grad(cos, sin)):
        return False
    try:
        target = (*x.shape[:-1], half)
        return all(_grid_view(t.expand(target), _lead(x)) is not None for t in (cos, sin))
    except RuntimeError:  # (does not broadcast)
        return False


def covers_head_norm(x: Tensor, cos: Tensor | None, sin: Tensor | None) -> bool:
    """x fp32/bf16/fp16 [..., D] viewing as [A, H, D] (D <= 16384); cos / sin fp32 broadcasting against
    x[..., :half] (or both None); no gradient wanted."""
    if not (x.dtype in _DTYPES and x.dim() >= 1 and 0 < x.shape[-1] <= _MAX_D and _no_grad(x)
            and _grid_view(x, _lead(x)) is not None):
        return False
    return (cos is None and sin is None) or (cos is not None and sin is not None and _covers_rope(x, cos, sin))


def _block_h(rows: int, width: int) -> int:
    """Rows a program takes: up to _TILE elements on a GPU; under the interpreter, which pays per program and runs
    them one by one, 16x as many (no row's arithmetic depends on it)."""
    tile = _TILE * 16 if interpreting() else _TILE
    return max(1, min(triton.next_power_of_2(rows), tile // width))


def row_warps(elements: int) -> int:
    """Warps for a program of a row kernel's tile of `elements`."""
    return 8 if elements >= 8192 else 4 if elements >= 2048 else 1 if elements <= 256 else 2


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``ReferenceBackend.rms_norm``: a new tensor in x's dtype and shape."""
    return _rms_norm(x, weight, eps, quant=False)[0]


def rms_norm_quant(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``ReferenceBackend.rms_norm_quant`` in one launch: the normed rows in x's dtype, and their e4m3 codes
    [..., D] and fp32 scales [..., ceil(D/128)] as `act_quant` gives them (bit for bit: the same arithmetic on
    the rounded rows, `quantize_rows`)."""
    out, q, s = _rms_norm(x, weight, eps, quant=True)
    return out, (q.view(torch.float8_e4m3fn), s)


def _rms_norm(x: Tensor, weight: Tensor, eps: float, quant: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    lead = _lead(x)
    xv = _grid_view(x, lead)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ov = out.view(*lead, x.shape[-1])
    d = x.shape[-1]
    dp = triton.next_power_of_2(d)
    q = s = None
    nb = -(-d // FP8_BLOCK)
    if quant:
        dp = max(dp, FP8_BLOCK)  # whole quantisation blocks (zeros past d)
        q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        s = torch.empty((*x.shape[:-1], nb), dtype=torch.float32, device=x.device)
    block_h = _block_h(lead[0] * lead[1], dp)
    if out.numel():
        _rms_norm_kernel[(triton.cdiv(lead[0] * lead[1], block_h),)](
            xv, weight.contiguous(), ov, out if q is None else q, out if s is None else s, lead[0], lead[1], d, nb,
            xv.stride(0), xv.stride(1), ov.stride(0), ov.stride(1), float(eps), DP=dp, BLOCK_H=block_h,
            DT=TL_DTYPES[x.dtype], QUANT=quant, QB=FP8_BLOCK, FLOOR=ACT_AMAX_FLOOR, INV_MAX=1.0 / FP8_MAX,
            num_warps=row_warps(block_h * dp), enable_fp_fusion=False)
    return out, q, s


def _rows(x: Tensor, cos: Tensor | None, sin: Tensor | None, eps: float, norm: bool, inverse: bool,
          inplace: bool) -> Tensor:
    lead = _lead(x)
    xv = _grid_view(x, lead)
    d = x.shape[-1]
    half = 0 if cos is None else cos.shape[-1]
    out = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ov = xv if inplace else out.view(*lead, d)
    if half:
        target = (*x.shape[:-1], half)
        cv, sv = (_grid_view(t.expand(target), lead) for t in (cos, sin))
    else:
        cv = sv = xv  # (not read)
    # only the rope dims are read and written when nothing else changes, else whole rows
    width = triton.next_power_of_2(d) if norm or not inplace else triton.next_power_of_2(max(half, 1))
    block_h = _block_h(lead[0] * lead[1], width)
    if x.numel():
        _rows_kernel[(triton.cdiv(lead[0] * lead[1], block_h),)](
            xv, cv, sv, ov, lead[0], lead[1], d, half, xv.stride(0), xv.stride(1), cv.stride(0), cv.stride(1),
            ov.stride(0), ov.stride(1), float(eps), NORM=norm, ROPE=half > 0, INVERSE=inverse,
            WRITE_NOPE=not (inplace and not norm), DP=triton.next_power_of_2(d),
            HALFP=triton.next_power_of_2(max(half, 1)), BLOCK_H=block_h, DT=TL_DTYPES[x.dtype],
            num_warps=row_warps(block_h * width), enable_fp_fusion=False)
    return out


def head_norm(x: Tensor, eps: float, cos: Tensor | None = None, sin: Tensor | None = None,
              inplace: bool = False) -> Tensor:
    """``ReferenceBackend.head_norm``: with `inplace` written over x (each program reads its rows whole first)."""
    return _rows(x, cos, sin, eps, norm=True, inverse=False, inplace=inplace)


def rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False, inplace: bool = False) -> Tensor:
    """``ReferenceBackend.rope``: `inplace` rewrites only x's rotated dims, else a new tensor."""
    return _rows(x, cos, sin, 0.0, norm=False, inverse=inverse, inplace=inplace)


def covers_hadamard(x: Tensor) -> bool:
    """x fp32/bf16/fp16 [..., n], n a power of two from 2 to 4,096; no gradient wanted."""
    n = x.shape[-1] if x.dim() else 0
    return x.dtype in _DTYPES and 2 <= n <= _TILE and not n & (n - 1) and _no_grad(x)


def hadamard(x: Tensor) -> Tensor:
    """``ReferenceBackend.hadamard``: a new tensor in x's dtype and shape."""
    n = x.shape[-1]
    rows2 = x.reshape(-1, n)
    if rows2.stride(-1) != 1:
        rows2 = rows2.contiguous()
    out = torch.empty(rows2.shape, dtype=x.dtype, device=x.device)
    r = rows2.shape[0]
    block_r = _block_h(r, n)
    if r:
        _hadamard_kernel[(triton.cdiv(r, block_r),)](
            rows2, out, r, rows2.stride(0), out.stride(0), 1.0 / math.sqrt(n), N=n, LOG_N=n.bit_length() - 1,
            BLOCK_R=block_r, DT=TL_DTYPES[x.dtype], num_warps=row_warps(block_r * n))
    return out.view(x.shape)


_QAT_CODES = {"none": 0, "fp8_nope": 1, "hadamard": 2, "hadamard_fp4": 3}


def covers_norm_rope_qat(x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, qat: str) -> bool:
    """x fp32/bf16/fp16 [..., D] viewing as [A, H, D], D a power of two from 2 to 4,096; weight None or [D] not fp64;
    cos / sin fp32 broadcasting against x[..., :half]; a known `qat`; no gradient wanted."""
    d = x.shape[-1] if x.dim() else 0
    if qat not in _QAT_CODES or not (2 <= d <= _TILE and not d & (d - 1)) or not covers_head_norm(x, cos, sin):
        return False
    return weight is None or (weight.dim() == 1 and weight.shape[0] == d and weight.dtype != torch.float64
                              and _no_grad(weight))


def norm_rope_qat(x: Tensor, weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor, qat: str) -> Tensor:
    """``ReferenceBackend.norm_rope_qat``: one launch, a new tensor in x's dtype and shape."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _norm_rope_qat(x, weight, eps, cos, sin, qat, out, None)
    return out


def covers_norm_rope_store(x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor, qat: str, dest: PagedRows,
                           rows: Tensor | None, index: Tensor) -> bool:
    """`covers_norm_rope_qat`, and `kv_rows.covers_store` for x's rows as the values (x [M, D] with rows, [B, S, D]
    without; its rows in order of the [A, H] grid), into a pool whose rows fill a program's row width."""
    if not (covers_norm_rope_qat(x, weight, cos, sin, qat) and kv_rows.covers_store(x, dest, rows, index)):
        return False
    kind = kv_rows.store_kind(dest, x.shape[-1])
    return kind == kv_rows.COPY or x.shape[-1] >= (64 if kind == kv_rows.FP8_KV else 32)


def norm_rope_store(x: Tensor, weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor, qat: str,
                    dest: PagedRows, rows: Tensor | None, index: Tensor) -> None:
    """``ReferenceBackend.norm_rope_store`` in one launch (see `covers_norm_rope_store`): `norm_rope_qat`'s kernel
    encoding and storing its rows as `store_rows`' kernel does, bit for bit."""
    _norm_rope_qat(x, weight, eps, cos, sin, qat, None, (dest, rows, index))


def _norm_rope_qat(x: Tensor, weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor, qat: str,
                   out: Tensor | None, store: tuple[PagedRows, Tensor | None, Tensor] | None) -> None:
    lead = _lead(x)
    xv = _grid_view(x, lead)
    d, half = x.shape[-1], cos.shape[-1]
    ov = xv if out is None else out.view(*lead, d)
    target = (*x.shape[:-1], half)
    cv, sv = (_grid_view(t.expand(target), lead) for t in (cos, sin))
    block_h = _block_h(lead[0] * lead[1], d)
    at = kv_rows.store_args(store, d) if store is not None else kv_rows.NO_STORE
    if x.numel():
        _norm_rope_qat_kernel[(triton.cdiv(lead[0] * lead[1], block_h),)](
            xv, xv if weight is None else weight.contiguous(), cv, sv, ov, lead[0], lead[1], half, xv.stride(0),
            xv.stride(1), cv.stride(0), cv.stride(1), ov.stride(0), ov.stride(1), float(eps), 1.0 / math.sqrt(d),
            *(xv if a is None else a for a in at.tensors),
            NORM=weight is not None, QAT=_QAT_CODES[qat], DP=d, LOG_D=d.bit_length() - 1, BLOCK_H=block_h,
            DT=TL_DTYPES[x.dtype], FP8_QB=min(KV_SIM_BLOCK, d), FP4_QB=min(INDEXER_SIM_BLOCK, d),
            FP8_FLOOR=ACT_AMAX_FLOOR, FP8_INV=1.0 / FP8_MAX, FP4_FLOOR=FP4_AMAX_FLOOR, FP4_INV=1.0 / FP4_MAX,
            STORE=store is not None, **at.constants, num_warps=row_warps(block_h * d), enable_fp_fusion=False)
