"""Triton block quantisers: `act_quant` / `fp8_simulate` (e4m3) and `fp4_quant` / `fp4_simulate` (e2m1), bit-exact
to `dsv4.kernels.reference` (`_fp8_quantize_blocks`, `_fp4_quantize_blocks`).

One program takes a tile of ``BLOCK_M`` rows by one quantisation block of ``block_size`` columns (a partial last
block is masked, which is the reference's zero padding: a zero never raises a block's amax). Per row of the
tile:

* amax over the block, floored like the reference (``ACT_AMAX_FLOOR`` for FP8, ``FP4_AMAX_FLOOR`` for FP4);
* the scale ``2**ceil(log2(amax * fp32(1/elem_max)))`` read off the fp32 bit pattern of the ratio (a full mantissa
  added carries into the exponent unless the ratio is already a power of two, `dsv4.kernels.cpu._pow2_ceil`),
  and its inverse, also a power of two, built from the same bits: ``x * (1/scale)`` is then exactly the
  reference's ``x / scale``, with no division instruction;
* the element rounded to the format's grid in plain fp32 / int32 arithmetic: the grid's step at ``|v|`` is a power
  of two read off ``|v|``'s exponent bits, ``|v| / step`` is exact, and one round-half-to-even of it (truncate,
  compare the exact fraction with 1/2) lands on the code the reference's cast / `e2m1_encode` picks. The code byte
  follows from the step's exponent and the rounded integer; the sign is the sign bit of ``v`` (so -0.0 and values
  that round to zero keep it, as torch's casts do).

No float8 cast instruction is used: the e4m3 and e2m1 bytes are computed, which is bit-exact on the GPU and under
Triton's CPU interpreter alike (the interpreter's own fp32 -> fp8 conversion does not round to nearest even). For
the same reason bf16 inputs, and the simulated bf16 outputs, travel as their int16 bit patterns, widened and
narrowed by a 16-bit shift (exact: a simulated value is an e4m3 / e2m1 value times a power of two, which bf16
holds; the interpreter's bf16 conversions get subnormals wrong). On a GPU a shift is what the conversion costs.

Blocks wider than ``_MAX_TILE`` columns are read in chunks, twice (amax, then quantise). Inputs: fp32 / bf16 /
fp16 with a unit last stride (others are copied); the inputs' values are finite (an inf or NaN gets a scale and
codes, not the reference's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsv4.quant import (
    ACT_AMAX_FLOOR,
    FP4_AMAX_FLOOR,
    FP4_MAX,
    FP8_BLOCK,
    FP8_MAX,
    INDEXER_SIM_BLOCK,
    KV_SIM_BLOCK,
)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# elements of x one program holds in registers at once (rows x columns of one chunk)
_MAX_TILE = 4096

_EXPONENT = tl.constexpr(0x7F800000)  # fp32 exponent field
_MANTISSA = tl.constexpr(0x007FFFFF)  # fp32 mantissa field
# bits(2**e) + bits(2**-e) for a normal 2**e: the inverse of a power of two is this minus its bits
_TWO_ONE_BITS = tl.constexpr(0x7F000000)
_E4M3_SUB_STEP = tl.constexpr(118 << 23)  # bits of 2**-9, e4m3's subnormal step
_E2M1_MIN_STEP = tl.constexpr(126 << 23)  # bits of 0.5, e2m1's step below 2


@triton.jit
def pow2_scale_bits(amax, FLOOR: tl.constexpr, INV_MAX: tl.constexpr):
    """int32 bits of the power-of-two scale ``2**ceil(log2(max(amax, FLOOR) * INV_MAX))``.

    The floors keep the ratio a normal fp32 (>= 2**-126) and a finite amax keeps it below 2**126, so the clamp to
    [2**-126, 2**126] never bites on the inputs the reference takes; it keeps the inverse a normal number."""
    ratio = tl.maximum(amax, FLOOR) * INV_MAX
    bits = (ratio.to(tl.int32, bitcast=True) + _MANTISSA) & _EXPONENT
    return tl.minimum(tl.maximum(bits, 1 << 23), 253 << 23)


@triton.jit
def _pow2_inverse(bits):
    """fp32 ``1 / 2**e`` from the int32 bits of a normal power of two ``2**e`` (|e| <= 126), exactly."""
    return (-bits + _TWO_ONE_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _round_half_even(mag, step_bits):
    """Nearest integer (ties to even) to ``mag / step`` for a power-of-two step given by its bits, as int32.

    ``mag * (1/step)`` is exact (a power-of-two factor, no overflow or loss on the ranges used), the truncation
    and the fraction are exact, so the comparison with 1/2 decides the rounding exactly."""
    y = mag * _pow2_inverse(step_bits)
    n = y.to(tl.int32)  # y >= 0: truncation is floor
    frac = y - n.to(tl.float32)
    up = (frac > 0.5) | ((frac == 0.5) & ((n & 1) == 1))
    return n + up.to(tl.int32)


@triton.jit
def quantize_rows(x, scale_bits, FP4: tl.constexpr, SIMULATE: tl.constexpr):
    """Codes (uint8: e4m3 or e2m1 bytes) of fp32 x [BLOCK_M, CHUNK] under the per-row scale given by its bits
    [BLOCK_M], or with SIMULATE their fp32 values times the scale (the reference's round trip)."""
    inv_scale = _pow2_inverse(scale_bits)
    v = x * inv_scale[:, None]  # == x / scale, exactly
    neg = v.to(tl.int32, bitcast=True) < 0  # the sign bit: -0.0 and tiny negatives included
    if FP4:
        mag = tl.minimum(tl.abs(v), 6.0)
        # grid step 0.5 below 2, then half the leading power of two: 1 on [2, 4), 2 on [4, 6]
        step_bits = tl.maximum((mag.to(tl.int32, bitcast=True) & _EXPONENT) - (1 << 23), _E2M1_MIN_STEP)
    else:
        mag = tl.minimum(tl.abs(v), 448.0)
        # 3 mantissa bits: the step is the leading power of two / 8, at least 2**-9 (the subnormals' step)
        step_bits = tl.maximum((mag.to(tl.int32, bitcast=True) & _EXPONENT) - (3 << 23), _E4M3_SUB_STEP)
    n = _round_half_even(mag, step_bits)
    if SIMULATE:
        value = n.to(tl.float32) * step_bits.to(tl.float32, bitcast=True)
        value = value * tl.where(neg, -1.0, 1.0)  # 0 * -1 = -0.0, as the reference's decode of a negative zero
        out = value * scale_bits.to(tl.float32, bitcast=True)[:, None]
    elif FP4:
        # code index = 2v below 2, v + 2 on [2, 4), v/2 + 4 above: n + 2 * log2(2 * step)
        code = n + ((step_bits >> 23) - 126) * 2
        out = (code | tl.where(neg, 8, 0)).to(tl.uint8)
    else:
        # e4m3 byte of n * 2**k (k = log2 step): 8 * (k + 9) + n, subnormals (k = -9) and a carry (n = 16) included
        code = n + ((step_bits >> 23) - 118) * 8
        out = (code | tl.where(neg, 128, 0)).to(tl.uint8)
    return out


@triton.jit
def _load_f32(ptrs, mask, BF16: tl.constexpr):
    """fp32 values of x; bf16 arrives as int16 bits and is widened by a shift (exact, subnormals included)."""
    if BF16:
        x = (tl.load(ptrs, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _store(ptrs, y, mask, BF16: tl.constexpr, SIMULATE: tl.constexpr):
    """Store codes, or values in out's dtype; bf16 values (exact in bf16: an e4m3 / e2m1 value times a power of
    two in bf16's range) as the top half of their fp32 bits into an int16 view."""
    if BF16:
        if SIMULATE:
            y = (y.to(tl.int32, bitcast=True) >> 16).to(tl.int16)
    tl.store(ptrs, y.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _block_quant_kernel(x_ptr, out_ptr, s_ptr, M, K, NB, stride_xm, stride_om,
                        BLOCK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                        FLOOR: tl.constexpr, INV_MAX: tl.constexpr, FP4: tl.constexpr, SIMULATE: tl.constexpr,
                        BF16: tl.constexpr):
    """x [M, K] (unit column stride) -> out [M, K] (codes uint8, or values in out's dtype with SIMULATE) and
    s [M, NB] fp32 scales (not written with SIMULATE). Program (row tile, block) = divmod(pid, NB). With BF16, x
    (and out with SIMULATE) are bf16 tensors passed as their int16 bit patterns."""
    pid = tl.program_id(0)
    pid_m = pid // NB
    pid_b = pid % NB
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * stride_xm
    out_rows = out_ptr + rows64[:, None] * stride_om
    start = pid_b * BLOCK
    NUM_CHUNKS: tl.constexpr = BLOCK // CHUNK
    if NUM_CHUNKS == 1:
        cols = start + tl.arange(0, CHUNK)
        mask = row_ok[:, None] & (cols < K)[None, :]
        x = _load_f32(x_rows + cols[None, :], mask, BF16)
        scale_bits = pow2_scale_bits(tl.max(tl.abs(x), axis=1), FLOOR, INV_MAX)
        y = quantize_rows(x, scale_bits, FP4, SIMULATE)
        _store(out_rows + cols[None, :], y, mask, BF16, SIMULATE)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            cols = start + c * CHUNK + tl.arange(0, CHUNK)
            mask = row_ok[:, None] & (cols < K)[None, :]
            x = _load_f32(x_rows + cols[None, :], mask, BF16)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale_bits = pow2_scale_bits(amax, FLOOR, INV_MAX)
        for c in range(NUM_CHUNKS):
            cols = start + c * CHUNK + tl.arange(0, CHUNK)
            mask = row_ok[:, None] & (cols < K)[None, :]
            x = _load_f32(x_rows + cols[None, :], mask, BF16)
            y = quantize_rows(x, scale_bits, FP4, SIMULATE)
            _store(out_rows + cols[None, :], y, mask, BF16, SIMULATE)
    if not SIMULATE:
        tl.store(s_ptr + rows64 * NB + pid_b, scale_bits.to(tl.float32, bitcast=True), mask=row_ok)


def covers(x: Tensor, block_size: int) -> bool:
    """Whether the kernels take x: fp32 / bf16 / fp16, a last dim of at least 1, a power-of-two block_size, and no
    gradient wanted (the reference is differentiable, these kernels are not)."""
    return (isinstance(x, Tensor) and x.dtype in _DTYPES and x.dim() >= 1 and x.shape[-1] >= 1
            and isinstance(block_size, int) and block_size >= 1 and block_size & (block_size - 1) == 0
            and not (torch.is_grad_enabled() and x.requires_grad))


def _run(x: Tensor, block_size: int, fp4: bool, simulate: bool) -> tuple[Tensor, Tensor | None]:
    """Launch the kernel over x [..., K]: (out [..., K] uint8 codes or x.dtype values, scales [..., nb] or None)."""
    if not covers(x, block_size):
        raise ValueError(f"Triton quantisation does not take {x.dtype} {tuple(x.shape)} with block {block_size}")
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    nb = -(-k // block_size)
    out = torch.empty((m, k), dtype=x.dtype if simulate else torch.uint8, device=x.device)
    scales = None if simulate else torch.empty((m, nb), dtype=torch.float32, device=x.device)
    if m:
        chunk = min(block_size, _MAX_TILE)
        block_m = min(triton.next_power_of_2(m), max(1, _MAX_TILE // chunk))
        tile = block_m * chunk
        num_warps = 4 if tile >= 2048 else 2 if tile >= 512 else 1
        floor, elem_max = (FP4_AMAX_FLOOR, FP4_MAX) if fp4 else (ACT_AMAX_FLOOR, FP8_MAX)
        grid = (triton.cdiv(m, block_m) * nb,)
        bf16 = x.dtype == torch.bfloat16
        # bf16 travels as its bits: the kernel widens and narrows it by shifts, exact everywhere (Triton's CPU
        # interpreter converts bf16 subnormals wrongly)
        x_arg = x2.view(torch.int16) if bf16 else x2
        out_arg = out.view(torch.int16) if bf16 and simulate else out
        _block_quant_kernel[grid](
            x_arg, out_arg, out if scales is None else scales, m, k, nb, x2.stride(0), out.stride(0),
            BLOCK=block_size, CHUNK=chunk, BLOCK_M=block_m, FLOOR=floor, INV_MAX=1.0 / elem_max, FP4=fp4,
            SIMULATE=simulate, BF16=bf16, num_warps=num_warps, enable_fp_fusion=False)
    out = out.view(*lead, k)
    return out, None if scales is None else scales.view(*lead, nb)


def act_quant(x: Tensor, block_size: int = FP8_BLOCK) -> tuple[Tensor, Tensor]:
    """``ReferenceBackend.act_quant``: (q float8_e4m3fn [..., K], s fp32 [..., ceil(K/block_size)])."""
    codes, scales = _run(x, block_size, fp4=False, simulate=False)
    return codes.view(torch.float8_e4m3fn), scales


def fp8_simulate(x: Tensor, block_size: int = KV_SIM_BLOCK) -> Tensor:
    """``ReferenceBackend.fp8_simulate``: x through e4m3 with per-block power-of-two scales and back, in x.dtype."""
    return _run(x, block_size, fp4=False, simulate=True)[0]


def fp4_quant(x: Tensor, block_size: int = INDEXER_SIM_BLOCK) -> tuple[Tensor, Tensor]:
    """``ReferenceBackend.fp4_quant``: (codes uint8 e2m1 [..., K], s fp32 [..., ceil(K/block_size)])."""
    codes, scales = _run(x, block_size, fp4=True, simulate=False)
    return codes, scales


def fp4_simulate(x: Tensor, block_size: int = INDEXER_SIM_BLOCK) -> Tensor:
    """``ReferenceBackend.fp4_simulate``: x through e2m1 with per-block power-of-two scales and back, in x.dtype."""
    return _run(x, block_size, fp4=True, simulate=True)[0]
