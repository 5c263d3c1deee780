"""torch's own block-scaled FP8 GEMM for the FP8 linears of many rows (a prefill chunk's): ``F.scaled_mm`` with
1 x 128 activation scales and 128 x 128 weight scales (CUTLASS's blockwise kernel on Hopper), where the installed
torch has it and a probe on the device agrees with the Triton kernel (`gemm.fp8_gemm`). A decode's few rows, other
devices, FP4 weights and shapes it does not take run the Triton kernel, which is tuned to spread a few rows' weight
read over every SM and which a CUDA graph captures.

The arithmetic is the official two-level accumulation either way: per 128-wide K block the FP8 dot, times both
block scales, added into an fp32 accumulator (the kernel promotes its accumulator at each scale block). So the two
agree to fp32 rounding, not bit for bit: the order of additions inside a block's dot is each kernel's own.

What torch asks of these recipes (`F.ScalingType.BlockWise1x128` for the activations, `BlockWise128x128` for the
weight), which `fp8_gemm` lays out:

* the activations [M, K] e4m3, row-major, M a multiple of 4 (zero rows padded), K a multiple of 128;
* their scales [M, K/128] fp32 with the rows as the unit-stride dimension (``s.t().contiguous().t()``);
* the weight as [K, N] column-major (``w.t()`` of the stored [N, K]), N a multiple of 128;
* its scales fp32 as the transpose of [N/128, K/128] with K/128 padded to a multiple of 4.

`DSV4_SCALED_MM=0` turns the path off (for a side-by-side measurement: `benchmarks/bench_gpu.py ops`).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4.quant import FP8_BLOCK, e8m0_to_float

# the fewest rows that take torch's kernel: fewer are a decode's, which the Triton kernel serves (and graphs capture)
MIN_ROWS = 128
_OUT_DTYPES = (torch.bfloat16, torch.float32)
# the probe's bound on the largest difference from the Triton kernel, relative to the largest output: far above
# two orders of fp32 additions (and FP8 tensor cores' narrower accumulation inside a block), far below what a
# misread layout gives (errors of the outputs' own size)
PROBE_TOLERANCE = 1e-3
_verdicts: dict[torch.device, bool] = {}


def enabled() -> bool:
    """Whether the path may be taken: the installed torch has the recipes and `DSV4_SCALED_MM` is not "0"."""
    return (os.environ.get("DSV4_SCALED_MM", "1") != "0" and hasattr(F, "scaled_mm")
            and hasattr(F, "ScalingType") and hasattr(F.ScalingType, "BlockWise128x128"))


def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def takes(xq: Tensor, xs: Tensor, w: Tensor, ws: Tensor, out_dtype: torch.dtype) -> bool:
    """An FP8 linear this path serves: many rows, K and N multiples of 128, a bf16 / fp32 output, on a Hopper GPU
    whose probe passed (run at the first call that qualifies, never inside a CUDA graph's capture)."""
    rows = xq.numel() // max(1, xq.shape[-1])
    if not (w.dtype == torch.float8_e4m3fn and xq.dtype == torch.float8_e4m3fn and rows >= MIN_ROWS
            and out_dtype in _OUT_DTYPES and xq.shape[-1] % FP8_BLOCK == 0 and w.shape[0] % FP8_BLOCK == 0
            and w.shape[1] == xq.shape[-1] and xs.shape[-1] == xq.shape[-1] // FP8_BLOCK and enabled()):
        return False
    return usable(xq.device)


def usable(device: torch.device) -> bool:
    """The probe's verdict for this device (computed once; unknown during a capture: not taken then)."""
    verdict = _verdicts.get(device)
    if verdict is None:
        if not _hopper(device) or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return False
        verdict = _verdicts[device] = _probe(device)
    return verdict


def _probe(device: torch.device) -> bool:
    """torch's kernel against the Triton kernel on a random GEMM of the layout's awkward sizes (rows not a multiple
    of 4, K/128 not a multiple of 4); False, with a warning, if it fails or disagrees."""
    from dsv4.quant import quantize_fp8_weight

    from . import gemm, quant

    g = torch.Generator().manual_seed(0)
    x = torch.randn(MIN_ROWS + 3, 5 * FP8_BLOCK, generator=g).to(device=device, dtype=torch.bfloat16)
    w, ws = (t.to(device) for t in quantize_fp8_weight(torch.randn(2 * FP8_BLOCK, 5 * FP8_BLOCK, generator=g) * 0.05))
    xq, xs = quant.act_quant(x)
    try:
        got = fp8_gemm(xq, xs, w, ws, torch.float32)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:  # (TypeError: another signature)
        warnings.warn(f"torch's block-scaled FP8 GEMM is not usable here ({error}); the Triton kernel runs instead",
                      stacklevel=3)
        return False
    want = gemm.fp8_gemm(xq, xs, w, ws, torch.float32)
    error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    if not error <= PROBE_TOLERANCE:
        warnings.warn(f"torch's block-scaled FP8 GEMM differs from the Triton kernel by {error:.2e} of the largest "
                      f"output; the Triton kernel runs instead", stacklevel=3)
        return False
    return True


def fp8_gemm(xq: Tensor, xs: Tensor, w: Tensor, ws: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``ReferenceBackend.fp8_gemm`` through ``F.scaled_mm``: xq e4m3 [..., K], xs fp32 [..., K/128], w e4m3 [N, K],
    ws ue8m0 [N/128, K/128] -> [..., N] in out_dtype (the layout in the module docstring)."""
    k, n = xq.shape[-1], w.shape[0]
    x = xq.reshape(-1, k)
    s = xs.reshape(-1, xs.shape[-1]).to(torch.float32)
    m = x.shape[0]
    pad = -m % 4
    if pad:
        x = F.pad(x.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn)
        s = F.pad(s, (0, 0, 0, pad), value=1.0)
    x = x.contiguous()
    s = s.t().contiguous().t()  # [M, K/128], the rows the unit stride
    w_scale = e8m0_to_float(ws).to(torch.float32)  # [N/128, K/128]
    kb = w_scale.shape[1]
    if kb % 4:
        w_scale = F.pad(w_scale, (0, -kb % 4), value=1.0)
    y = F.scaled_mm(x, w.t(), s, F.ScalingType.BlockWise1x128, w_scale.t(), F.ScalingType.BlockWise128x128,
                    output_dtype=out_dtype)
    return y[:m].reshape(*xq.shape[:-1], n)
