"""`sparse_attn` differentiable for training: the forward kernel (`attention.py`) keeping each head's log-sum-exp,
and one backward launch.

The reference's autograd gathers every query's rows per 64-slot block ([B, S, 64, D] in fp32, kept for backward),
and backward scatters as much again into the rows' gradient. Here the forward kernel also writes
``lse = m + log(sum of exp(logit - m) + exp(sink - m))`` per (batch row, query, head), and a backward program per
(batch row, query, block of heads) walks the query's slots again, reading each named row once:

    p      = exp(q . k_j * scale - lse)                    (the softmax, the sink's share left out)
    dp     = dO . v_j,   ds = p * (dp - delta),   delta = dO . O
    dq    += scale * ds @ k
    dk_j  += scale * ds^T @ q + p^T @ dO                   (keys and values are the same rows: MQA)
    dsink  = -sum over queries of exp(sink - lse) * delta

The rows' gradients are atomic fp32 adds (a row is named by many queries and heads), so their order of additions
is the hardware's. dO is the gradient of the pre-rotation output: where the op rotated its output back
(`rope_back`), the kernel rotates the incoming gradient forward as it reads it, and delta is taken over the
rotated pair (a rotation keeps dot products), from the output as stored. The probabilities are recomputed from lse
in fp32, not rounded to the rows' dtype as the forward's value product rounds them: the gradients are the exact
softmax's, as close to fp64 as the reference's autograd (with 16-bit rows the stored output's rounding puts the
sink's gradient about twice as far).

Covered (`covers`): dense runs (one or two [B, n, D] tensors of one float dtype: a training forward's own KV rows
and its compressed entries), D <= 512, the rotation as the forward kernel takes it; anything else is the
reference's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..paged import KVRows
from . import attention
from .numerics import dot, exp, interpreting, libdevice_exp

MAX_HEAD_DIM = 512  # V4's; the backward's [slots, D] row gradient and [heads, D] operands in registers


@triton.jit
def _sparse_attn_backward_kernel(
    q_ptr, do_ptr, out_ptr, lse_ptr, idx_ptr, sink_ptr,
    r0_ptr, n0, r1_ptr, n1,
    dq_ptr, dr0_ptr, dr1_ptr, dsink_ptr,
    cos_ptr, sin_ptr, HALF,
    S, H, K, scale,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    ROTATE: tl.constexpr, WIDEN_DOTS: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    """Contiguous q, dO, out [B, S, H, D] (any float dtype), lse [B, S, H] fp32, idx [B, S, K], runs [B, n0, D] and
    [B, n1, D] -> dq [B, S, H, D] fp32 (stored), dr0 / dr1 fp32 (atomically added), dsink [B, S, H] fp32 (each
    query's term, stored)."""
    b, s, heads, cols, head_ok, col_ok = attention.query_tile(S, H, D, BLOCK_H, BLOCK_D)
    hd = head_ok[:, None] & col_ok[None, :]
    at = ((b * S + s) * H + heads[:, None]) * D + cols[None, :]  # [BLOCK_H, BLOCK_D] offsets into q / dO / out
    q = tl.load(q_ptr + at, mask=hd, other=0.0).to(tl.float32)
    g = tl.load(do_ptr + at, mask=hd, other=0.0).to(tl.float32)
    o = tl.load(out_ptr + at, mask=hd, other=0.0).to(tl.float32)
    delta = tl.sum(g * o, axis=1)  # [BLOCK_H] (rotated or not: a rotation keeps the dot product)
    if ROTATE:  # the output was rotated back by -theta: its gradient, rotated by +theta, is the softmax output's
        ev, od = tl.split(tl.reshape(g, (BLOCK_H, BLOCK_D // 2, 2)))
        pair = tl.arange(0, BLOCK_D // 2)
        first = D // 2 - HALF
        turn = (pair >= first) & (pair < D // 2)
        trig = (b * S + s) * HALF + (pair - first)
        c = tl.load(cos_ptr + trig, mask=turn, other=1.0)[None, :]
        sn = tl.load(sin_ptr + trig, mask=turn, other=0.0)[None, :]
        g = tl.reshape(tl.join(ev * c - od * sn, ev * sn + od * c), (BLOCK_H, BLOCK_D))
    lse = tl.load(lse_ptr + (b * S + s) * H + heads, mask=head_ok, other=0.0)
    sink = tl.load(sink_ptr + heads, mask=head_ok, other=0.0)
    tl.store(dsink_ptr + (b * S + s) * H + heads, -exp(sink - lse, LIBDEVICE) * delta, mask=head_ok)

    dq = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    idx_base = idx_ptr + (b * S + s) * K
    for lo in range(0, K, BLOCK_K):
        slots = lo + tl.arange(0, BLOCK_K)
        j = tl.load(idx_base + slots, mask=slots < K, other=-1).to(tl.int64)
        if tl.max(j, axis=0) >= 0:
            valid = (j >= 0) & (j < n0 + n1)
            in0 = valid & (j < n0)
            in1 = valid & (j >= n0)
            j1 = tl.maximum(j - n0, 0)
            m0 = in0[:, None] & col_ok[None, :]
            m1 = in1[:, None] & col_ok[None, :]
            at0 = (b * n0 + j[:, None]) * D + cols[None, :]
            at1 = (b * n1 + j1[:, None]) * D + cols[None, :]
            rows = tl.load(r0_ptr + at0, mask=m0, other=0.0).to(tl.float32)
            rows += tl.load(r1_ptr + at1, mask=m1, other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_D]
            logits = dot(q, tl.trans(rows), WIDEN_DOTS) * scale  # [BLOCK_H, BLOCK_K]
            keep = head_ok[:, None] & valid[None, :]
            p = tl.where(keep, exp(logits - lse[:, None], LIBDEVICE), 0.0)
            ds = p * (dot(g, tl.trans(rows), WIDEN_DOTS) - delta[:, None])
            dq += dot(ds, rows, WIDEN_DOTS)
            d_rows = dot(tl.trans(ds), q, WIDEN_DOTS) * scale + dot(tl.trans(p), g, WIDEN_DOTS)
            tl.atomic_add(dr0_ptr + at0, d_rows, mask=m0)
            tl.atomic_add(dr1_ptr + at1, d_rows, mask=m1)
    tl.store(dq_ptr + at, dq * scale, mask=hd)


def covers(q: Tensor, runs: Sequence[KVRows], idx: Tensor, sink: Tensor, cos: Tensor | None,
           sin: Tensor | None) -> bool:
    """What the training kernels take: dense runs (one or two, of one float dtype), D <= 512 and what the forward
    kernel takes (`attention.covers`, `attention.covers_rotation`), gradients aside."""
    runs = list(runs)
    with torch.no_grad():
        return (all(isinstance(r, Tensor) for r in runs) and len({r.dtype for r in runs}) == 1
                and 0 < q.shape[-1] <= MAX_HEAD_DIM and attention.covers(q, runs, idx, sink)
                and attention.covers_rotation(q, cos, sin))


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, r0: Tensor, r1: Tensor | None, idx: Tensor, sink: Tensor, scale: float,
                cos: Tensor | None, sin: Tensor | None) -> Tensor:
        b, s, h, _ = q.shape
        lse = torch.empty(b, s, h, dtype=torch.float32, device=q.device)
        runs = [r0] if r1 is None else [r0, r1]
        out = attention.sparse_attn(q, runs, idx, sink, scale, cos, sin, lse=lse)
        ctx.save_for_backward(q, r0, r1, idx, sink, cos, sin, lse, out)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        q, r0, r1, idx, sink, cos, sin, lse, out = ctx.saved_tensors
        b, s, h, d = q.shape
        k = idx.shape[-1]
        second = r1 if r1 is not None else r0[:, :0]
        dq = torch.empty(b, s, h, d, dtype=torch.float32, device=q.device)
        d0 = torch.zeros(r0.shape, dtype=torch.float32, device=q.device)
        d1 = torch.zeros(second.shape, dtype=torch.float32, device=q.device)
        dsink = torch.empty(b, s, h, dtype=torch.float32, device=q.device)
        if q.numel() and k:
            block_d = max(16, triton.next_power_of_2(d))
            block_h = 16  # (tl.dot's least; V4's 64 heads take four programs a query)
            # the [slots, D] row tiles: 32 slots up to D = 128 and 16 beyond keep the small preset's D = 128 within
            # ptxas's registers at 8 warps (64 spilled ~700 bytes a thread; `triton_hopper_build.py --resources`)
            block_k = 32 if block_d <= 128 else 16
            rotate = cos is not None
            _sparse_attn_backward_kernel[(b * s, triton.cdiv(h, block_h))](
                q.contiguous(), grad.contiguous(), out.contiguous(), lse, idx.contiguous(),
                sink.to(torch.float32).contiguous(),
                r0.contiguous(), r0.shape[1], second.contiguous() if second.numel() else r0, second.shape[1],
                dq, d0, d1 if d1.numel() else d0, dsink,
                *((cos.contiguous(), sin.contiguous(), cos.shape[-1]) if rotate else (lse, lse, 0)),
                s, h, k, float(ctx.scale),
                D=d, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_K=block_k, ROTATE=rotate, WIDEN_DOTS=interpreting(),
                LIBDEVICE=libdevice_exp(), num_warps=4 if block_d <= 64 else 8,
            )
        else:
            dq.zero_()
            dsink.zero_()
        d_sink = dsink.sum(dim=(0, 1)).to(sink.dtype) if ctx.needs_input_grad[4] else None
        return (dq.to(q.dtype), d0.to(r0.dtype), d1.to(r1.dtype) if r1 is not None else None, None, d_sink, None,
                None, None)


def sparse_attn(q: Tensor, runs: Sequence[KVRows], idx: Tensor, sink: Tensor, scale: float,
                cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
    """`attention.sparse_attn`, differentiable in q, the runs and the sink (inputs as `covers` takes them)."""
    runs = list(runs)
    return _SparseAttention.apply(q, runs[0], runs[1] if len(runs) > 1 else None, idx, sink, scale, cos, sin)
