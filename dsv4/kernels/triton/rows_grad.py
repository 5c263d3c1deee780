"""`rms_norm` differentiable for training: an autograd Function over the forward kernel (`rows.rms_norm`) with one
backward launch.

The reference's autograd runs the norm as some seven ops over the rows forward (cast, square, mean, add, rsqrt, two
products) and about twice as many backward, each a pass over [rows, D] in fp32. Here a backward program walks a
block of rows, each read once with its output's gradient: with ``r = rsqrt(mean(x^2) + eps)`` and ``gw = g * w``,

    dx = r * gw - x * r^3 * mean(gw * x)          (written per row, in x's dtype)
    dw = sum over the rows of g * x * r            (accumulated in fp32 registers, one partial row a program)

and torch adds the programs' partial rows. All in fp32 from the stored dtypes, rounded once: the reference's
gradients to fp32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import rows
from .numerics import TL_DTYPES, interpreting, round_to

_ROWS_PER_PROGRAM = 64  # rows a backward program walks (its partial dw is one row of the partials)


@triton.jit
def _rms_norm_backward_kernel(g_ptr, x_ptr, w_ptr, dx_ptr, dw_ptr, N, D, eps, ROWS: tl.constexpr,
                              BD: tl.constexpr, X_DT: tl.constexpr):
    """g, x [N, D] contiguous, w [D] fp32 -> dx [N, D] (X_DT) and the program's partial dw, row `pid` of
    dw [programs, D] fp32."""
    pid = tl.program_id(0)
    col = tl.arange(0, BD)
    col_ok = col < D
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0)
    dw = tl.zeros((BD,), tl.float32)
    for i in range(ROWS):
        row = (pid * ROWS + i).to(tl.int64)
        ok = col_ok & (row + col * 0 < N)  # (a vector: the interpreter takes no scalar in a mask)
        x = tl.load(x_ptr + row * D + col, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * D + col, mask=ok, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        gw = g * w
        dx = r * gw - x * (r * r * r * (tl.sum(gw * x, axis=0) / D))
        tl.store(dx_ptr + row * D + col, round_to(dx, X_DT), mask=ok)
        dw += g * x * r
    tl.store(dw_ptr + pid.to(tl.int64) * D + col, dw, mask=col_ok)


def covers_rms_norm(x: Tensor, weight: Tensor) -> bool:
    """What the forward kernel takes (`rows.covers_rms_norm`), gradients aside."""
    with torch.no_grad():
        return rows.covers_rms_norm(x, weight)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return rows.rms_norm(x, weight, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        d = x.shape[-1]
        xv = x.reshape(-1, d).contiguous()
        n = xv.shape[0]
        d_x = torch.empty((n, d), dtype=x.dtype, device=x.device)
        if not n:  # (no rows: no gradient)
            return d_x.view(x.shape), torch.zeros_like(weight), None
        per_program = n if interpreting() else _ROWS_PER_PROGRAM  # (the interpreter: one program)
        programs = triton.cdiv(n, per_program)
        partial = torch.empty((programs, d), dtype=torch.float32, device=x.device)  # (every row written)
        bd = triton.next_power_of_2(d)
        _rms_norm_backward_kernel[(programs,)](
            g.reshape(n, d).contiguous(), xv, weight.to(torch.float32).contiguous(), d_x, partial, n, d,
            float(ctx.eps), ROWS=per_program, BD=bd, X_DT=TL_DTYPES[x.dtype], num_warps=4 if bd <= 2048 else 8)
        return d_x.view(x.shape), partial.sum(dim=0).to(weight.dtype), None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``ReferenceBackend.rms_norm`` differentiable in x and weight (`covers_rms_norm` must hold)."""
    return _RMSNorm.apply(x, weight, eps)


__all__ = ["covers_rms_norm", "rms_norm"]
