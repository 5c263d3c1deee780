"""The backward of mHC's reads and writes of the streams, for training: `hc_collapse` and `hc_post` as autograd
Functions over their forward kernels (`mhc.py`), each with one backward launch, and `hc_mixes` over `hc_pre`'s
partial products (one pass over the streams) with one backward launch for the streams' gradient.

In training the streams are the largest activations a layer touches ([tokens, h, d], h = 4 copies of the
residual), and the reference's autograd makes several passes over them per op: the write-back's h products of
[tokens, h, d] each and their sums, forward, and about twice as many backward. Here a backward program takes one
token's rows (under the interpreter many tokens' at once) and walks its columns in chunks, reading the output's
gradient and the inputs once:

* ``hc_post`` (``X'_k = post_k * out + sum_j comb[j, k] * X_j``): ``d out = sum_k post_k * g_k``,
  ``d X_j = sum_k comb[j, k] * g_k`` (written per chunk), ``d post_k = sum_cols g_k * out`` and
  ``d comb[j, k] = sum_cols g_k * X_j`` (accumulated over the chunks in fp32, written at the end);
* ``hc_collapse`` (``u = sum_k pre_k * X_k``): ``d X_k = pre_k * g`` and ``d pre_k = sum_cols g * X_k``; inside
  `hc_pre` the first is left to the mixes' backward, which writes the streams' gradient anyway (`PreLink`).

Everything is computed in fp32 from the stored dtypes and rounded once to the input's dtype, as autograd through
the reference's fp32 arithmetic does; the sums' order is the chunks', so gradients agree with the reference's to
fp32 rounding (bit for bit is not the aim: training).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import mhc
from .numerics import TL_DTYPES, dot, interpreting, round_to

_BD = 256  # columns per chunk on a GPU
_INTERPRETER_TILE = 16384  # values a program takes under the interpreter (many tokens, whole rows)


@triton.jit
def _post_backward_kernel(g_ptr, out_ptr, x_ptr, post_ptr, comb_ptr, dout_ptr, dx_ptr, dpost_ptr, dcomb_ptr, T, D,
                          H: tl.constexpr, HP: tl.constexpr, BLOCK_T: tl.constexpr, BD: tl.constexpr,
                          OUT_DT: tl.constexpr, X_DT: tl.constexpr):
    """g, x [T, H, D] and out [T, D] contiguous, post [T, H] and comb [T, H, H] fp32 -> d out [T, D] (OUT_DT),
    d x [T, H, D] (X_DT), d post [T, H] and d comb [T, H, H] (fp32)."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = t < T
    k = tl.arange(0, HP)
    k_ok = k < H
    tk_ok = t_ok[:, None] & k_ok[None, :]
    post = tl.load(post_ptr + t[:, None] * H + k[None, :], mask=tk_ok, other=0.0)  # [BLOCK_T, HP]
    d_post = tl.zeros((BLOCK_T, HP), tl.float32)
    r3 = k[None, :, None]
    d_comb = tl.zeros((BLOCK_T, HP, HP), tl.float32)  # [token, j, k]
    for c0 in range(0, D, BD):
        col = c0 + tl.arange(0, BD)
        col_ok = col < D
        mask2 = t_ok[:, None] & col_ok[None, :]
        mask3 = tk_ok[:, :, None] & col_ok[None, None, :]
        rows3 = t[:, None, None] * (H * D) + k[None, :, None] * D + col[None, None, :]  # [BLOCK_T, HP, BD]
        g = tl.load(g_ptr + rows3, mask=mask3, other=0.0).to(tl.float32)  # g_k
        o = tl.load(out_ptr + t[:, None] * D + col[None, :], mask=mask2, other=0.0).to(tl.float32)
        tl.store(dout_ptr + t[:, None] * D + col[None, :], round_to(tl.sum(post[:, :, None] * g, axis=1), OUT_DT),
                 mask=mask2)
        d_post += tl.sum(g * o[:, None, :], axis=2)
        for j in tl.static_range(H):
            comb_j = tl.load(comb_ptr + t[:, None] * (H * H) + j * H + k[None, :], mask=tk_ok, other=0.0)  # [., k]
            tl.store(dx_ptr + t[:, None] * (H * D) + j * D + col[None, :],
                     round_to(tl.sum(comb_j[:, :, None] * g, axis=1), X_DT), mask=mask2)
            x_j = tl.load(x_ptr + t[:, None] * (H * D) + j * D + col[None, :], mask=mask2, other=0.0).to(tl.float32)
            d_comb += tl.where(r3 == j, tl.sum(g * x_j[:, None, :], axis=2)[:, None, :], 0.0)
    tl.store(dpost_ptr + t[:, None] * H + k[None, :], d_post, mask=tk_ok)
    tl.store(dcomb_ptr + t[:, None, None] * (H * H) + r3 * H + k[None, None, :], d_comb,
             mask=tk_ok[:, :, None] & k_ok[None, None, :])


@triton.jit
def _collapse_backward_kernel(g_ptr, x_ptr, pre_ptr, dx_ptr, dpre_ptr, T, D, H: tl.constexpr, HP: tl.constexpr,
                              BLOCK_T: tl.constexpr, BD: tl.constexpr, X_DT: tl.constexpr, DX: tl.constexpr):
    """g [T, D] and x [T, H, D] contiguous, pre [T, H] fp32 -> d x [T, H, D] (X_DT; where DX: else the mixes'
    backward adds it, see `PreLink`) and d pre [T, H] (fp32)."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = t < T
    k = tl.arange(0, HP)
    tk_ok = t_ok[:, None] & (k < H)[None, :]
    pre = tl.load(pre_ptr + t[:, None] * H + k[None, :], mask=tk_ok, other=0.0)
    d_pre = tl.zeros((BLOCK_T, HP), tl.float32)
    for c0 in range(0, D, BD):
        col = c0 + tl.arange(0, BD)
        col_ok = col < D
        mask3 = tk_ok[:, :, None] & col_ok[None, None, :]
        rows3 = t[:, None, None] * (H * D) + k[None, :, None] * D + col[None, None, :]
        g = tl.load(g_ptr + t[:, None] * D + col[None, :], mask=t_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows3, mask=mask3, other=0.0).to(tl.float32)
        if DX:
            tl.store(dx_ptr + rows3, round_to(pre[:, :, None] * g[:, None, :], X_DT), mask=mask3)
        d_pre += tl.sum(x * g[:, None, :], axis=2)
    tl.store(dpre_ptr + t[:, None] * H + k[None, :], d_pre, mask=tk_ok)


@triton.jit
def _mixes_backward_kernel(dp_ptr, coef_ptr, fn_ptr, x_ptr, dx_ptr, gu_ptr, pre_ptr, T, K, M, D, H, sxt,
                           MP: tl.constexpr, BLOCK_T: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr,
                           X_DT: tl.constexpr, COLLAPSE: tl.constexpr):
    """dp [T, M] and coef [T] fp32, fn [M, K] fp32 and x [T, K] (unit last strides) -> dx [T, K] (contiguous, X_DT)
    = dp @ fn - coef * x, over a (BLOCK_T tokens, BK columns) tile; with COLLAPSE also the collapse's term,
    pre [T, H] fp32 times its output's gradient gu [T, D] (contiguous; K = H * D): dx[t, k*D + c] += pre[t, k] *
    gu[t, c]."""
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    col = tl.program_id(1) * BK + tl.arange(0, BK)
    m = tl.arange(0, MP)
    tok_ok = tok < T
    col_ok = col < K
    m_ok = m < M
    dp = tl.load(dp_ptr + tok[:, None] * M + m[None, :], mask=tok_ok[:, None] & m_ok[None, :], other=0.0)
    f = tl.load(fn_ptr + m[:, None] * K + col[None, :], mask=m_ok[:, None] & col_ok[None, :], other=0.0)
    mask = tok_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + tok[:, None] * sxt + col[None, :], mask=mask, other=0.0).to(tl.float32)
    coef = tl.load(coef_ptr + tok, mask=tok_ok, other=0.0)
    dx = dot(dp, f, F32) - coef[:, None] * x
    if COLLAPSE:
        stream = col // D
        p = tl.load(pre_ptr + tok[:, None] * H + stream[None, :], mask=mask, other=0.0)
        gu = tl.load(gu_ptr + tok[:, None] * D + (col - stream * D)[None, :], mask=mask, other=0.0).to(tl.float32)
        dx += p * gu
    tl.store(dx_ptr + tok[:, None] * K + col[None, :], round_to(dx, X_DT), mask=mask)


def _tiles(t: int, h: int, d: int) -> tuple[int, int]:
    """(tokens, columns) a backward program takes: one token, 256 columns a chunk on a GPU; under the interpreter
    whole rows of as many tokens as fit its tile."""
    hp = triton.next_power_of_2(h)
    if interpreting():
        bd = triton.next_power_of_2(d)
        return max(1, min(triton.next_power_of_2(t), _INTERPRETER_TILE // (hp * bd))), bd
    return 1, _BD


def covers_post(out: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> bool:
    """What the forward kernel takes (`mhc.covers_post`), gradients aside."""
    with torch.no_grad():
        return mhc.covers_post(out, x, post, comb)


def covers_collapse(x: Tensor, pre: Tensor) -> bool:
    """What the forward kernel takes (`mhc.covers_collapse`), gradients aside."""
    with torch.no_grad():
        return mhc.covers_collapse(x, pre)


class _Post(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        ctx.save_for_backward(out, x, post, comb)
        return mhc.hc_post(out, x, post, comb)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        out, x, post, comb = ctx.saved_tensors
        h, d = x.shape[-2], x.shape[-1]
        xv = x.reshape(-1, h, d).contiguous()
        t = xv.shape[0]
        gv = g.reshape(t, h, d).contiguous()
        ov = out.reshape(t, d).contiguous()
        d_out = torch.empty((t, d), dtype=out.dtype, device=x.device)
        d_x = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
        d_post = torch.empty((t, h), dtype=torch.float32, device=x.device)
        d_comb = torch.empty((t, h, h), dtype=torch.float32, device=x.device)
        if t and d:
            block_t, bd = _tiles(t, h, d)
            _post_backward_kernel[(triton.cdiv(t, block_t),)](
                gv, ov, xv, post.reshape(t, h).contiguous(), comb.reshape(t, h, h).contiguous(), d_out, d_x, d_post,
                d_comb, t, d, H=h, HP=triton.next_power_of_2(h), BLOCK_T=block_t, BD=bd, OUT_DT=TL_DTYPES[out.dtype],
                X_DT=TL_DTYPES[x.dtype], num_warps=4)
        return d_out.view(out.shape), d_x.view(x.shape), d_post.view(post.shape), d_comb.view(comb.shape)


class PreLink:
    """What `hc_pre`'s collapse hands its mixes in backward: the streams feed both, so autograd would add their two
    [tokens, h, d] gradients (a pass writing one, an add reading both and writing a third). Linked, the collapse's
    backward writes only the pre weights' gradient and leaves here its output's gradient [T, d] and the pre weights
    [T, h]; the mixes' backward, which autograd runs after it (the mixes feed the pre weights), adds
    ``pre_k * g`` to the streams' gradient as it writes it. Nothing left here (the collapse's output unused) adds
    nothing."""

    def __init__(self) -> None:
        self.grad: Tensor | None = None  # [T, d]
        self.pre: Tensor | None = None  # [T, h] fp32


class _Collapse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, pre: Tensor, link: PreLink | None) -> Tensor:
        ctx.save_for_backward(x, pre)
        ctx.link = link
        return mhc.hc_collapse(x, pre)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        x, pre = ctx.saved_tensors
        h, d = x.shape[-2], x.shape[-1]
        xv = x.reshape(-1, h, d).contiguous()
        t = xv.shape[0]
        linked = ctx.link is not None
        gv, pv = g.reshape(t, d).contiguous(), pre.reshape(t, h).contiguous()
        d_x = None if linked or not ctx.needs_input_grad[0] else torch.empty((t, h, d), dtype=x.dtype,
                                                                             device=x.device)
        d_pre = torch.empty((t, h), dtype=torch.float32, device=x.device)
        if t and d:
            block_t, bd = _tiles(t, h, d)
            _collapse_backward_kernel[(triton.cdiv(t, block_t),)](
                gv, xv, pv, d_x if d_x is not None else d_pre, d_pre, t, d, H=h, HP=triton.next_power_of_2(h),
                BLOCK_T=block_t, BD=bd, X_DT=TL_DTYPES[x.dtype], DX=d_x is not None, num_warps=4)
        if linked:
            ctx.link.grad, ctx.link.pre = gv, pv
        return d_x.view(x.shape) if d_x is not None else None, d_pre.view(pre.shape), None


_MAX_MIXES = 64  # the mixes (M = (2 + h) * h) a backward tile's dot takes: h up to 6


def covers_mixes(x: Tensor, fn: Tensor) -> bool:
    """x fp32/bf16/fp16 [..., h, d] whose rows view as [T, h*d] with a unit last stride, fn [M, h*d] float (not
    fp64) with M <= 64, and a gradient wanted: inference keeps the reference's matmul (its rounding is what the
    inference kernels' results are compared with)."""
    if not (isinstance(x, Tensor) and isinstance(fn, Tensor) and x.dtype in mhc.DTYPES and x.dim() >= 2):
        return False
    if fn.dim() != 2 or fn.dtype == torch.float64 or not fn.dtype.is_floating_point:
        return False
    k = x.shape[-2] * x.shape[-1]
    if fn.shape[1] != k or not 1 <= fn.shape[0] <= _MAX_MIXES or x.numel() == 0 or fn.device != x.device:
        return False
    if not (torch.is_grad_enabled() and (x.requires_grad or fn.requires_grad)):
        return False
    return mhc.stream_rows(x) is not None and x.stride(-2) == x.shape[-1]


class _Mixes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, fn: Tensor, norm_eps: float, link: PreLink | None) -> Tensor:
        k, m = x.shape[-2] * x.shape[-1], fn.shape[0]
        flat = x.reshape(-1, k)  # (a view: `covers_mixes`)
        fn32 = fn.to(torch.float32).contiguous()
        part, ss = mhc.mixes_partials(flat, fn32)  # one pass over the streams
        product = part.sum(dim=1)  # [T, M]
        rms = torch.rsqrt(ss.sum(dim=1) / k + norm_eps)  # [T]
        ctx.save_for_backward(flat, fn32, product, rms)
        ctx.shape, ctx.fn_dtype, ctx.link = x.shape, fn.dtype, link
        return (product * rms.unsqueeze(1)).view(*x.shape[:-2], m)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        flat, fn32, product, rms = ctx.saved_tensors
        t, k = flat.shape
        m = fn32.shape[0]
        g = g.reshape(t, m).to(torch.float32)
        d_product = g * rms.unsqueeze(1)  # [T, M]
        # d rms = sum_m g * product; rms = (sum x^2 / K + eps)^-1/2, so d x gets -d rms * rms^3 / K * x
        coef = (g * product).sum(dim=1) * rms.pow(3) / k  # [T]
        d_x = d_fn = None
        link = ctx.link if ctx.link is not None and ctx.link.grad is not None else None
        if ctx.needs_input_grad[0]:
            d_x = torch.empty((t, k), dtype=flat.dtype, device=flat.device)
            if t:
                block_k = 64
                h = ctx.shape[-2]
                _mixes_backward_kernel[(triton.cdiv(t, 16), triton.cdiv(k, block_k))](
                    d_product, coef, fn32, flat, d_x, *((link.grad, link.pre) if link else (coef, coef)), t, k, m,
                    k // h, h, flat.stride(0), MP=max(16, triton.next_power_of_2(m)), BLOCK_T=16, BK=block_k,
                    F32=interpreting(), X_DT=TL_DTYPES[flat.dtype], COLLAPSE=link is not None, num_warps=4)
            d_x = d_x.view(ctx.shape)
        if ctx.link is not None:
            ctx.link.grad = ctx.link.pre = None
        if ctx.needs_input_grad[1]:
            d_fn = (d_product.t() @ flat.to(torch.float32)).to(ctx.fn_dtype)  # [M, K]
        return d_x, d_fn, None, None


def hc_mixes(x: Tensor, fn: Tensor, norm_eps: float, link: PreLink | None = None) -> Tensor:
    """``ReferenceBackend.hc_mixes`` differentiable in x and fn (`covers_mixes` must hold): fp32 [..., M], the
    product with fn in fp32 (also under autocast, where the reference's matmul runs in its dtype); `link`: the
    collapse of the same streams adds its gradient of them here (`PreLink`)."""
    return _Mixes.apply(x, fn, norm_eps, link)


def hc_post(out: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """``ReferenceBackend.hc_post`` differentiable in all four inputs (`covers_post` must hold)."""
    return _Post.apply(out, x, post, comb)


def hc_collapse(x: Tensor, pre: Tensor, link: PreLink | None = None) -> Tensor:
    """``ReferenceBackend.hc_collapse`` differentiable in x and pre (`covers_collapse` must hold); `link`: its
    gradient of x left for the mixes of the same streams to add (`PreLink`)."""
    return _Collapse.apply(x, pre, link)


__all__ = ["PreLink", "covers_collapse", "covers_mixes", "covers_post", "hc_collapse", "hc_mixes", "hc_post"]
