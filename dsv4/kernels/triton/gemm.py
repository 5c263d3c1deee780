"""Block-scaled FP8 / FP4 GEMMs in Triton: the official kernels' two-level accumulation on tensor cores.

Both compute ``y = x @ W^T`` for e4m3 activations with one power-of-two fp32 scale per token and 128 inputs
(`act_quant`), as the reference does (`ReferenceBackend._block_scaled_matmul`): per K block, an fp32 product of
the unscaled element values (an FP8 tensor-core dot, whose products are exact and which accumulates in fp32),
multiplied by the activation's and the weight's block scales, added into a separate fp32 accumulator, block by
block in increasing K. Only the order of the additions inside one block's dot differs from the reference, so
results agree to fp32 rounding before the cast to the output dtype.

* **FP8 weights** (e4m3 [N, K], one ue8m0 scale per 128 x 128 tile): K blocks of 128.
* **FP4 weights** (packed e2m1 [N, K/2], low nibble the even element, one ue8m0 scale per row and 32 inputs): K
  blocks of 32, each weight block's e2m1 codes decoded in the kernel to e4m3 (every e2m1 value is an e4m3
  value, the official FP4 -> FP8 route) and multiplied with the activation block's e4m3 values.

ue8m0 scale bytes are decoded in the kernel (``2**(byte - 127)`` by building the fp32 bit pattern), so a call
is one launch with no host-side conversion.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsv4.quant import FP4_BLOCK, FP8_BLOCK, is_packed_fp4_dtype

from .numerics import dot, round_to

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _e8m0(byte):
    """fp32 value 2**(byte - 127) of ue8m0 bytes (int32 in [0, 255]): 255 is NaN, 0 the subnormal 2**-127."""
    bits = byte << 23
    value = bits.to(tl.float32, bitcast=True)
    value = tl.where(byte == 0, 5.877471754111438e-39, value)  # 2**-127 has no exponent bits of its own
    return tl.where(byte == 255, float("nan"), value)


@triton.jit
def _e2m1_to_e4m3(code):
    """e4m3 value of 4-bit e2m1 codes (int32): sign bit 3, exponent bits 1-2 (bias 1), mantissa bit 0."""
    exponent = (code >> 1) & 3
    mantissa = (code & 1).to(tl.float32)
    magnitude = tl.where(exponent == 0, mantissa * 0.5, (1.0 + mantissa * 0.5) * (1 << exponent).to(tl.float32) * 0.5)
    return tl.where((code & 8) != 0, -magnitude, magnitude).to(tl.float8e4nv)


@triton.jit
def _k_block(x_ptr, w_ptr, rows64, row_ok, cols64, col_ok, kb, K, stride_xm, stride_wn, BLOCK_K: tl.constexpr):
    """Inputs kb * BLOCK_K .. + BLOCK_K - 1 of the rows [BLOCK_M, BLOCK_K] and of the weight's columns, transposed
    [BLOCK_K, BLOCK_N] (zeros past K)."""
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    a = tl.load(x_ptr + rows64[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    b = tl.load(w_ptr + cols64[None, :] * stride_wn + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
    return a, b


@triton.jit
def float_tile(x_ptr, w_ptr, rows64, row_ok, cols64, col_ok, K, stride_xm, stride_wn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WIDEN_DOTS: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] of rows x cols against a float weight [N, K] of the rows' dtype, K blocks in order."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a, b = _k_block(x_ptr, w_ptr, rows64, row_ok, cols64, col_ok, kb, K, stride_xm, stride_wn, BLOCK_K)
        acc += dot(a, b, WIDEN_DOTS)
    return acc


@triton.jit
def fp8_tile(x_ptr, xs_ptr, w_ptr, ws_ptr, rows64, row_ok, cols64, col_ok, scale_row, K,
             stride_xm, stride_xsm, stride_wn, stride_wsn,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] of rows x cols against an FP8 weight whose tile-scale row for these columns is
    `scale_row` (the N tile lies inside one 128-row tile): per K block, the dot times both scales, added in order."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a, b = _k_block(x_ptr, w_ptr, rows64, row_ok, cols64, col_ok, kb, K, stride_xm, stride_wn, BLOCK_K)
        partial = tl.dot(a, b, out_dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
        a_scale = tl.load(xs_ptr + rows64 * stride_xsm + kb, mask=row_ok, other=1.0)
        w_byte = tl.load(ws_ptr + scale_row * stride_wsn + kb).to(tl.int32) & 0xFF
        acc += partial * (a_scale[:, None] * _e8m0(w_byte))
    return acc


@triton.jit
def fp4_tile(x_ptr, xs_ptr, w_ptr, ws_ptr, rows64, row_ok, cols64, col_ok, K,
             stride_xm, stride_xsm, stride_wn, stride_wsn,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr, SUBS_PER_SCALE: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] of rows x cols against a packed FP4 weight: per 32-input block, the dot of the
    activation's e4m3 values with the weight's codes decoded to e4m3, times both scales, added in order."""
    half = tl.arange(0, SUB // 2)
    ks = tl.arange(0, SUB)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for sb in range(0, K // SUB):
        k = sb * SUB + ks
        a = tl.load(x_ptr + rows64[:, None] * stride_xm + k[None, :], mask=row_ok[:, None], other=0.0)
        packed = tl.load(w_ptr + cols64[:, None] * stride_wn + (sb * (SUB // 2) + half)[None, :],
                         mask=col_ok[:, None], other=0).to(tl.int32) & 0xFF  # [BLOCK_N, SUB/2]
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, SUB))  # even element in the low nibble
        b = tl.trans(_e2m1_to_e4m3(codes))  # [SUB, BLOCK_N]
        partial = tl.dot(a, b, out_dtype=tl.float32)
        a_scale = tl.load(xs_ptr + rows64 * stride_xsm + sb // SUBS_PER_SCALE, mask=row_ok, other=1.0)
        w_byte = tl.load(ws_ptr + cols64 * stride_wsn + sb, mask=col_ok, other=127).to(tl.int32) & 0xFF
        acc += partial * (a_scale[:, None] * _e8m0(w_byte)[None, :])
    return acc


@triton.jit
def span(pid, n, BLOCK: tl.constexpr):
    """A program's BLOCK indices pid*BLOCK .. pid*BLOCK + BLOCK - 1 (int64, for address arithmetic) and which of
    them lie below n."""
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    return idx.to(tl.int64), idx < n


@triton.jit
def store_tile(y_ptr, stride_ym, rows64, row_ok, cols64, col_ok, values):
    """Store an fp32 [rows, cols] tile into y (row stride stride_ym), rounded to y's dtype as torch rounds."""
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols64[None, :], round_to(values, y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _fp8_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K,
                     stride_xm, stride_xsm, stride_wn, stride_wsn, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows64, row_ok = span(tl.program_id(0), M, BLOCK_M)
    cols64, col_ok = span(tl.program_id(1), N, BLOCK_N)
    acc = fp8_tile(x_ptr, xs_ptr, w_ptr, ws_ptr, rows64, row_ok, cols64, col_ok, tl.program_id(1) * BLOCK_N // 128,
                   K, stride_xm, stride_xsm, stride_wn, stride_wsn, BLOCK_M, BLOCK_N, BLOCK_K)
    store_tile(y_ptr, stride_ym, rows64, row_ok, cols64, col_ok, acc)


@triton.jit
def _fp8_gemm_pair_kernel(x_ptr, xs_ptr, w1_ptr, ws1_ptr, y1_ptr, N1, w2_ptr, ws2_ptr, y2_ptr, N2, M, K,
                          stride_xm, stride_xsm, stride_w1n, stride_ws1n, stride_y1m, stride_w2n, stride_ws2n,
                          stride_y2m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`_fp8_gemm_kernel` for two weights over the same activations: the first cdiv(N1, BLOCK_N) column programs
    make y1 = x @ W1^T, the rest y2 = x @ W2^T, each tile as the one-weight kernel makes it."""
    rows64, row_ok = span(tl.program_id(0), M, BLOCK_M)
    first_tiles = tl.cdiv(N1, BLOCK_N)
    pid = tl.program_id(1)
    if pid < first_tiles:
        cols64, col_ok = span(pid, N1, BLOCK_N)
        acc = fp8_tile(x_ptr, xs_ptr, w1_ptr, ws1_ptr, rows64, row_ok, cols64, col_ok, pid * BLOCK_N // 128, K,
                       stride_xm, stride_xsm, stride_w1n, stride_ws1n, BLOCK_M, BLOCK_N, BLOCK_K)
        store_tile(y1_ptr, stride_y1m, rows64, row_ok, cols64, col_ok, acc)
    else:
        pid = pid - first_tiles
        cols64, col_ok = span(pid, N2, BLOCK_N)
        acc = fp8_tile(x_ptr, xs_ptr, w2_ptr, ws2_ptr, rows64, row_ok, cols64, col_ok, pid * BLOCK_N // 128, K,
                       stride_xm, stride_xsm, stride_w2n, stride_ws2n, BLOCK_M, BLOCK_N, BLOCK_K)
        store_tile(y2_ptr, stride_y2m, rows64, row_ok, cols64, col_ok, acc)


@triton.jit
def _fp4_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K,
                     stride_xm, stride_xsm, stride_wn, stride_wsn, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr, SUBS_PER_SCALE: tl.constexpr):
    rows64, row_ok = span(tl.program_id(0), M, BLOCK_M)
    cols64, col_ok = span(tl.program_id(1), N, BLOCK_N)
    acc = fp4_tile(x_ptr, xs_ptr, w_ptr, ws_ptr, rows64, row_ok, cols64, col_ok, K,
                   stride_xm, stride_xsm, stride_wn, stride_wsn, BLOCK_M, BLOCK_N, SUB, SUBS_PER_SCALE)
    store_tile(y_ptr, stride_ym, rows64, row_ok, cols64, col_ok, acc)


def block_m_for(m: int) -> int:
    """Rows per program: tensor-core dots need at least 16; decodes (a few rows) waste the rest of the tile."""
    return max(16, min(64, triton.next_power_of_2(m)))


def processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def block_n_for(row_blocks: int, n: int, widest: int, device: torch.device) -> int:
    """Output columns per program: the widest tile (fewest weight re-reads) that still gives every processor a
    program, else 32. A decode (one row block) reads each weight once and is bound by memory bandwidth, which
    takes every processor streaming: 4,096 columns in 128-wide tiles are 32 programs on a 132-SM H200."""
    available = processors(device)
    block_n = widest
    while block_n > 32 and row_blocks * triton.cdiv(n, block_n) < available:
        block_n //= 2
    return block_n


def _flat(xq: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
    x = xq.reshape(-1, xq.shape[-1])
    s = xs.reshape(-1, xs.shape[-1]).to(torch.float32)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if s.stride(-1) != 1:
        s = s.contiguous()
    return x, s


def covers(xq: Tensor, xs: Tensor, w: Tensor, ws: Tensor, out_dtype: torch.dtype) -> bool:
    """Inputs the kernels take: e4m3 activations, an e4m3 or packed-FP4 weight with its ue8m0 scales, a float
    output dtype, and (FP4) K a multiple of 32 with the packed width matching it."""
    if xq.dtype != torch.float8_e4m3fn or ws.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        return False
    if out_dtype not in _OUT_DTYPES or xq.device != w.device or xq.shape[-1] == 0:
        return False
    k = xq.shape[-1]
    if w.dtype == torch.float8_e4m3fn:
        return w.shape[1] == k and xs.shape[-1] == -(-k // FP8_BLOCK)
    if is_packed_fp4_dtype(w.dtype):
        return k % FP4_BLOCK == 0 and w.shape[1] * 2 == k and ws.shape[-1] == k // FP4_BLOCK
    return False


def fp8_gemm(xq: Tensor, xs: Tensor, w: Tensor, ws: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """xq e4m3 [..., K], xs fp32 [..., ceil(K/128)], w e4m3 [N, K], ws ue8m0 [ceil(N/128), ceil(K/128)] ->
    [..., N] in out_dtype (see the module docstring)."""
    x, s = _flat(xq, xs)
    m, k = x.shape
    n = w.shape[0]
    w = w if w.stride(-1) == 1 else w.contiguous()
    scales = ws.view(torch.uint8).contiguous()
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m:
        block_m = block_m_for(m)
        block_n = block_n_for(triton.cdiv(m, block_m), n, 128, x.device)  # divides 128: one weight-scale row
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _fp8_gemm_kernel[grid](x, s, w, scales, y, m, n, k,
                               x.stride(0), s.stride(0), w.stride(0), scales.stride(0), y.stride(0),
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=FP8_BLOCK)
    return y.reshape(*xq.shape[:-1], n)


def fp8_gemm_pair(xq: Tensor, xs: Tensor, w1: Tensor, ws1: Tensor, w2: Tensor, ws2: Tensor,
                  out_dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """(`fp8_gemm`(xq, xs, w1, ws1), `fp8_gemm`(xq, xs, w2, ws2)) in one launch (both weights e4m3 over the same K,
    `covers` for each): what a decode step's two projections of one input cost as a launch each. Every tile is the
    one-weight kernel's at the same tile width."""
    x, s = _flat(xq, xs)
    m, k = x.shape
    weights = [(w if w.stride(-1) == 1 else w.contiguous(), ws.view(torch.uint8).contiguous()) for w, ws in
               ((w1, ws1), (w2, ws2))]
    (w1, s1), (w2, s2) = weights
    n1, n2 = w1.shape[0], w2.shape[0]
    y1 = torch.empty(m, n1, dtype=out_dtype, device=x.device)
    y2 = torch.empty(m, n2, dtype=out_dtype, device=x.device)
    if m:
        block_m = block_m_for(m)
        block_n = block_n_for(triton.cdiv(m, block_m), n1 + n2, 128, x.device)  # divides 128, as fp8_gemm's
        grid = (triton.cdiv(m, block_m), triton.cdiv(n1, block_n) + triton.cdiv(n2, block_n))
        _fp8_gemm_pair_kernel[grid](x, s, w1, s1, y1, n1, w2, s2, y2, n2, m, k,
                                    x.stride(0), s.stride(0), w1.stride(0), s1.stride(0), y1.stride(0),
                                    w2.stride(0), s2.stride(0), y2.stride(0),
                                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=FP8_BLOCK)
    lead = xq.shape[:-1]
    return y1.reshape(*lead, n1), y2.reshape(*lead, n2)


def fp4_gemm(xq: Tensor, xs: Tensor, w: Tensor, ws: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """xq e4m3 [..., K], xs fp32 [..., ceil(K/128)], w packed e2m1 [N, K/2], ws ue8m0 [N, K/32] -> [..., N]
    in out_dtype (see the module docstring)."""
    x, s = _flat(xq, xs)
    m, k = x.shape
    n = w.shape[0]
    packed = w.view(torch.uint8)
    packed = packed if packed.stride(-1) == 1 else packed.contiguous()
    scales = ws.view(torch.uint8).contiguous()
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m:
        block_m = block_m_for(m)
        block_n = block_n_for(triton.cdiv(m, block_m), n, 64, x.device)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _fp4_gemm_kernel[grid](x, s, packed, scales, y, m, n, k,
                               x.stride(0), s.stride(0), packed.stride(0), scales.stride(0), y.stride(0),
                               BLOCK_M=block_m, BLOCK_N=block_n, SUB=FP4_BLOCK,
                               SUBS_PER_SCALE=FP8_BLOCK // FP4_BLOCK)
    return y.reshape(*xq.shape[:-1], n)
