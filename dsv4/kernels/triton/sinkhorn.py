"""Triton mHC split + Sinkhorn (`ReferenceBackend.hc_split_sinkhorn`): one program per block of tokens, each token's
h x h comb matrix held in registers for all the iterations.

The arithmetic is the reference's, op for op and in its order: ``pre = sigmoid(m*s0 + b) + eps`` and
``post = 2*sigmoid(m*s1 + b)`` with sigmoid as ``1 / (1 + exp(-z))``; ``comb = exp(logit - rowmax)``, divided by
its row sum, ``+ eps``, divided by (column sum + eps), then ``iters - 1`` rounds of row then column division by
(sum + eps). The products and sums are not fused (launched with ``enable_fp_fusion=False``: ``m*s + b`` rounds the
product as torch does), the divisions are IEEE round-to-nearest (``div_rn``), and every row / column sum adds the
h terms one after another, 0 to h-1: each term is picked out of the tile by a masked sum whose other terms are
exact zeros, so no cross-lane reduction tree decides the order. That is the order torch's CPU sums over a dim of
h <= 4 use (checked for h = 2, 3, 4; at h = 8 torch pairs the column terms differently, an fp32 rounding apart).

What may not be bit-exact is ``exp`` (`numerics.exp`): libdevice's ``expf`` on a GPU (the function torch's CUDA
ops call, not the hardware's approximate ``ex2``), numpy's under the interpreter, while the reference on the CPU
uses torch's vectorised one; they differ in the last bit on some inputs, and those differences pass through the
normalisations as relative errors of a few 1e-7 (the tests allow 1e-6).

h (``hc_mult``) up to 16 is padded to a power of two with masks; the model's h = 4 needs none.

Training (`split_sinkhorn_trainable`): the forward kernel, then `_sinkhorn_backward_kernel` for the gradients of
the mixes, scales and bases, which runs each token's normalisations again, keeps each step's input in a scratch
buffer and walks the steps back in the same program (the reference's autograd records ~150 ops a call at 20
iterations and runs about twice as many backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .numerics import exp, libdevice_exp

_DTYPES = (torch.float32, torch.bfloat16)
_MAX_H = 16
_TILE = 2048  # comb elements per program (tokens x h x h)


@triton.jit
def _sigmoid(z, LIBDEVICE: tl.constexpr):
    return tl.math.div_rn(tl.full(z.shape, 1.0, tl.float32), 1.0 + exp(-z, LIBDEVICE))


@triton.jit
def _ordered_sum(x, idx, AXIS: tl.constexpr, H: tl.constexpr):
    """Sum of x [BLOCK_T, HP, HP] over AXIS (whose index, broadcast to x, is idx) as ((x_0 + x_1) + x_2) + ...
    over the first H entries: each x_j is a masked sum of one non-zero term (exact), then added in order."""
    acc = tl.sum(tl.where(idx == 0, x, 0.0), axis=AXIS)
    for j in tl.static_range(1, H):
        acc = acc + tl.sum(tl.where(idx == j, x, 0.0), axis=AXIS)
    return acc


@triton.jit
def _load_mixes(rows, cols, mask, splits, rms, WIDTH: tl.constexpr, PARTIALS: tl.constexpr):
    """The mixes at rows + cols (pointers); PARTIALS: the sum of `splits` partial products WIDTH apart, in order,
    times the rows' 1/rms (what `dsv4.kernels.triton.mhc` leaves: the RMS norm folded in after the product)."""
    if PARTIALS:
        acc = tl.load(rows + cols, mask=mask, other=0.0)
        for split in range(1, splits):
            acc += tl.load(rows + split * WIDTH + cols, mask=mask, other=0.0)
        return acc * rms
    else:
        return tl.load(rows + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def split_sinkhorn(m_ptr, ss_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, tok, T, stride_t, iters, eps,
                   splits, K, norm_eps, H: tl.constexpr, HP: tl.constexpr, BLOCK_T: tl.constexpr,
                   LIBDEVICE: tl.constexpr, PARTIALS: tl.constexpr, STORE: tl.constexpr, M: tl.constexpr):
    """Tokens `tok` [BLOCK_T] of mixes [T, M] (M = (2+H)*H; unit last stride): their pre [BLOCK_T, HP] (fp32, the
    padded columns junk), returned; with STORE also pre [T, H], post [T, H] and comb [T, H, H] written (contiguous,
    fp32). Without STORE the mixes may be the H of the hc head's map alone (M = H): pre is the same function of
    the first H (its one scale and H biases).

    PARTIALS: m_ptr holds [T, splits, M] partial products of the streams with the mixing map and ss_ptr
    [T, splits] partial sums of squares over K values, whose sums make the mixes (`_load_mixes`)."""
    tok_ok = tok < T
    tok64 = tok.to(tl.int64)
    rms = tl.full((BLOCK_T,), 1.0, tl.float32)
    if PARTIALS:  # rsqrt(mean(x^2) + eps) as 1 / sqrt, both correctly rounded (torch's CPU rsqrt)
        ss = tl.load(ss_ptr + tok64 * splits, mask=tok_ok, other=0.0)
        for split in range(1, splits):
            ss += tl.load(ss_ptr + tok64 * splits + split, mask=tok_ok, other=0.0)
        rms = tl.math.div_rn(tl.full((BLOCK_T,), 1.0, tl.float32), tl.math.sqrt_rn(ss / K + norm_eps))
    k = tl.arange(0, HP)
    k_ok = k < H
    s0 = tl.load(scale_ptr).to(tl.float32)

    # pre and post: [BLOCK_T, HP]
    rows2 = m_ptr + tok64[:, None] * stride_t
    mask2 = tok_ok[:, None] & k_ok[None, :]
    out2 = tok64[:, None] * H + k[None, :]
    m = _load_mixes(rows2, k[None, :], mask2, splits, rms[:, None], M, PARTIALS)
    b = tl.load(base_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    pre = _sigmoid(m * s0 + b[None, :], LIBDEVICE) + eps
    if STORE:
        tl.store(pre_ptr + out2, pre, mask=mask2)
        s1 = tl.load(scale_ptr + 1).to(tl.float32)
        s2 = tl.load(scale_ptr + 2).to(tl.float32)
        m = _load_mixes(rows2, H + k[None, :], mask2, splits, rms[:, None], M, PARTIALS)
        b = tl.load(base_ptr + H + k, mask=k_ok, other=0.0).to(tl.float32)
        post = 2.0 * _sigmoid(m * s1 + b[None, :], LIBDEVICE)
        tl.store(post_ptr + out2, post, mask=mask2)

        # comb: [BLOCK_T, HP (row i), HP (column j)]
        r3 = k[None, :, None]
        c3 = k[None, None, :]
        entry_ok = (r3 < H) & (c3 < H)  # [1, HP, HP]
        mask3 = tok_ok[:, None, None] & entry_ok
        entry = r3 * H + c3
        m = _load_mixes(m_ptr + tok64[:, None, None] * stride_t, 2 * H + entry, mask3, splits, rms[:, None, None],
                        M, PARTIALS)
        b = tl.load(base_ptr + 2 * H + entry, mask=entry_ok, other=0.0).to(tl.float32)
        # padded columns (h not a power of two) get exp(-inf) = 0; padded rows are finite junk that no sum picks up
        logits = tl.where(c3 < H, m * s2 + b, float("-inf"))
        rowmax = tl.max(logits, axis=2)
        comb = exp(logits - rowmax[:, :, None], LIBDEVICE)
        comb = tl.math.div_rn(comb, _ordered_sum(comb, c3, 2, H)[:, :, None]) + eps
        comb = tl.math.div_rn(comb, (_ordered_sum(comb, r3, 1, H) + eps)[:, None, :])
        for _ in range(iters - 1):
            comb = tl.math.div_rn(comb, (_ordered_sum(comb, c3, 2, H) + eps)[:, :, None])
            comb = tl.math.div_rn(comb, (_ordered_sum(comb, r3, 1, H) + eps)[:, None, :])
        tl.store(comb_ptr + tok64[:, None, None] * (H * H) + entry, comb, mask=mask3)
    return pre


@triton.jit
def _sinkhorn_kernel(m_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, T, stride_t, iters, eps,
                     H: tl.constexpr, HP: tl.constexpr, BLOCK_T: tl.constexpr, LIBDEVICE: tl.constexpr):
    """mixes [T, (2+H)*H] -> pre [T, H], post [T, H], comb [T, H, H] (`mhc.hc_pre` runs `split_sinkhorn` over
    partial products in its collapse launch instead)."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    split_sinkhorn(m_ptr, m_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, tok, T, stride_t, iters, eps,
                   1, 1, 0.0, H, HP, BLOCK_T, LIBDEVICE, False, True, (2 + H) * H)


def covers(mixes: Tensor, hc_mult: int, iters: int, scale: Tensor | None = None, base: Tensor | None = None) -> bool:
    """Whether the kernel takes these inputs: mixes fp32 / bf16 [..., (2+h)*h] with 1 <= h <= 16, iters >= 1, and
    no gradient wanted (the reference is differentiable, the kernel is not). `scale` and `base`, when given, must
    not want a gradient either and must not be fp64 (the reference would then compute in fp64); the kernel reads
    them as fp32."""
    if not (isinstance(mixes, Tensor) and mixes.dtype in _DTYPES and mixes.dim() >= 1):
        return False
    if not (isinstance(hc_mult, int) and 1 <= hc_mult <= _MAX_H and mixes.shape[-1] == (2 + hc_mult) * hc_mult):
        return False
    if not (isinstance(iters, int) and iters >= 1):
        return False
    params = [t for t in (scale, base) if t is not None]
    if any(t.dtype == torch.float64 for t in params):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (mixes, *params)))


def hc_split_sinkhorn(mixes: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``ReferenceBackend.hc_split_sinkhorn``: mixes [..., (2+h)*h], scale [3], base [(2+h)*h] ->
    (pre [..., h], post [..., h], comb [..., h, h]), all fp32."""
    h = hc_mult
    if not covers(mixes, hc_mult, iters):
        raise ValueError(f"Triton Sinkhorn does not take mixes {mixes.dtype} {tuple(mixes.shape)} with h={hc_mult}, "
                         f"iters={iters}")
    width = (2 + h) * h
    lead = mixes.shape[:-1]
    m2 = mixes.reshape(-1, width)
    if m2.stride(-1) != 1:
        m2 = m2.contiguous()
    t = m2.shape[0]
    dev = mixes.device
    scale = scale.to(device=dev, dtype=torch.float32).contiguous()
    base = base.to(device=dev, dtype=torch.float32).contiguous()
    pre = torch.empty((t, h), dtype=torch.float32, device=dev)
    post = torch.empty((t, h), dtype=torch.float32, device=dev)
    comb = torch.empty((t, h, h), dtype=torch.float32, device=dev)
    if t:
        _launch(m2, scale, base, pre, post, comb, t, m2.stride(0), h, iters, eps)
    return pre.view(*lead, h), post.view(*lead, h), comb.view(*lead, h, h)


def _launch(m: Tensor, scale: Tensor, base: Tensor, pre: Tensor, post: Tensor, comb: Tensor, t: int, stride_t: int,
            h: int, iters: int, eps: float) -> None:
    """Run the kernel on the mixes m of t tokens."""
    hp = triton.next_power_of_2(h)
    block_t = min(triton.next_power_of_2(t), max(1, _TILE // (hp * hp)))
    num_warps = 4 if block_t * hp * hp >= 2048 else 2 if block_t * hp * hp >= 512 else 1
    _sinkhorn_kernel[(triton.cdiv(t, block_t),)](
        m, scale, base, pre, post, comb, t, stride_t, iters, float(eps), H=h, HP=hp, BLOCK_T=block_t,
        LIBDEVICE=libdevice_exp(), num_warps=num_warps, enable_fp_fusion=False)


@triton.jit
def _sinkhorn_backward_kernel(m_ptr, stride_t, scale_ptr, base_ptr, gpre_ptr, gpost_ptr, gcomb_ptr, dz_ptr,
                              states_ptr, T, iters, eps, H: tl.constexpr, HP: tl.constexpr, BLOCK_T: tl.constexpr,
                              LIBDEVICE: tl.constexpr):
    """The gradient of `hc_split_sinkhorn` with respect to its pre-activations z = m * scale + base: dz [T, (2+H)*H]
    fp32 from the outputs' gradients (contiguous fp32 [T, H], [T, H], [T, H, H]).

    pre and post: the sigmoid's derivative. comb: the forward's normalisations run again, each step's input stored
    in `states` [T, 2 iters - 1, HP, HP] (this program's tokens only), then walked back, last step first: a step
    y = x / (sum x + eps) over rows (or columns) turns the gradient g into (g - sum(g * y)) / (sum x + eps) over
    the same axis; the row softmax at the start into s * (g - sum(g * s)), s its output (the reference subtracts a
    detached row maximum, which changes no gradient)."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < T
    tok64 = tok.to(tl.int64)
    k = tl.arange(0, HP)
    k_ok = k < H
    rows2 = m_ptr + tok64[:, None] * stride_t
    mask2 = tok_ok[:, None] & k_ok[None, :]
    out2 = tok64[:, None] * H + k[None, :]
    dz_rows = dz_ptr + tok64[:, None] * ((2 + H) * H)

    # pre = sigmoid(z) + eps, post = 2 sigmoid(z): dz = g * c * sig * (1 - sig)
    m = tl.load(rows2 + k[None, :], mask=mask2, other=0.0).to(tl.float32)
    b = tl.load(base_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    sig = _sigmoid(m * tl.load(scale_ptr).to(tl.float32) + b[None, :], LIBDEVICE)
    g = tl.load(gpre_ptr + out2, mask=mask2, other=0.0)
    tl.store(dz_rows + k[None, :], g * sig * (1.0 - sig), mask=mask2)
    m = tl.load(rows2 + H + k[None, :], mask=mask2, other=0.0).to(tl.float32)
    b = tl.load(base_ptr + H + k, mask=k_ok, other=0.0).to(tl.float32)
    sig = _sigmoid(m * tl.load(scale_ptr + 1).to(tl.float32) + b[None, :], LIBDEVICE)
    g = tl.load(gpost_ptr + out2, mask=mask2, other=0.0)
    tl.store(dz_rows + H + k[None, :], 2.0 * g * sig * (1.0 - sig), mask=mask2)

    # comb: [BLOCK_T, HP (row i), HP (column j)]
    r3 = k[None, :, None]
    c3 = k[None, None, :]
    entry_ok = (r3 < H) & (c3 < H)
    mask3 = tok_ok[:, None, None] & entry_ok
    entry = r3 * H + c3
    m = tl.load(rows2[:, :, None] + 2 * H + entry, mask=mask3, other=0.0).to(tl.float32)
    s2 = tl.load(scale_ptr + 2).to(tl.float32)
    b = tl.load(base_ptr + 2 * H + entry, mask=entry_ok, other=0.0).to(tl.float32)
    logits = tl.where(c3 < H, m * s2 + b, float("-inf"))
    soft = exp(logits - tl.max(logits, axis=2)[:, :, None], LIBDEVICE)
    soft = tl.where(entry_ok, tl.math.div_rn(soft, tl.sum(soft, axis=2)[:, :, None]), 0.0)  # the row softmax
    steps = 2 * iters - 1  # normalisations after the softmax: columns, then (rows, columns) iters - 1 times
    state = states_ptr + tok64[:, None, None] * (steps * HP * HP) + r3 * HP + c3  # step 0's [BLOCK_T, HP, HP]
    x = tl.where(entry_ok, soft + eps, 0.0)
    for step in range(steps):  # the forward again, each step's input kept
        tl.store(state + step * (HP * HP), x, mask=mask3)
        if step % 2 == 0:  # columns
            x = tl.where(entry_ok, tl.math.div_rn(x, (tl.sum(x, axis=1) + eps)[:, None, :]), 0.0)
        else:  # rows
            x = tl.where(entry_ok, tl.math.div_rn(x, (tl.sum(x, axis=2) + eps)[:, :, None]), 0.0)
    tl.debug_barrier()  # (the states this program stored, read back below)

    g = tl.load(gcomb_ptr + tok64[:, None, None] * (H * H) + entry, mask=mask3, other=0.0)
    for back in range(steps):
        step = steps - 1 - back
        x = tl.load(state + step * (HP * HP), mask=mask3, other=0.0)
        if step % 2 == 0:  # (names of their own in each branch: their shapes differ)
            col_den = tl.sum(x, axis=1)[:, None, :] + eps
            g = (g - tl.sum(g * (x / col_den), axis=1)[:, None, :]) / col_den
        else:
            row_den = tl.sum(x, axis=2)[:, :, None] + eps
            g = (g - tl.sum(g * (x / row_den), axis=2)[:, :, None]) / row_den
        g = tl.where(entry_ok, g, 0.0)
    dlogits = soft * (g - tl.sum(g * soft, axis=2)[:, :, None])
    tl.store(dz_rows[:, :, None] + 2 * H + entry, dlogits, mask=mask3)


def covers_backward(mixes: Tensor, hc_mult: int, iters: int, scale: Tensor, base: Tensor) -> bool:
    """Whether `split_sinkhorn_trainable` takes these inputs: what the forward kernel takes (`covers`), gradients
    aside."""
    with torch.no_grad():
        return covers(mixes, hc_mult, iters, scale, base)


class _SplitSinkhorn(torch.autograd.Function):
    """The forward kernel, and the backward kernel for the gradients of the mixes, the scales and the bases."""

    @staticmethod
    def forward(ctx, mixes: Tensor, scale: Tensor, base: Tensor, h: int, iters: int, eps: float):
        ctx.save_for_backward(mixes, scale, base)
        ctx.h, ctx.iters, ctx.eps = h, iters, eps
        return hc_split_sinkhorn(mixes, scale, base, h, iters, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_pre: Tensor, g_post: Tensor, g_comb: Tensor):
        mixes, scale, base = ctx.saved_tensors
        h, width = ctx.h, (2 + ctx.h) * ctx.h
        m2 = mixes.reshape(-1, width)
        dz = _backward(m2, scale, base, g_pre, g_post, g_comb, h, ctx.iters, ctx.eps)  # [T, width] fp32
        # z = m * s + b, s broadcast over each part: pre's h columns, post's h, comb's h * h
        s32 = scale.to(torch.float32)
        s_wide = torch.cat((s32[0].expand(h), s32[1].expand(h), s32[2].expand(h * h)))  # [width]
        d_mixes = d_scale = d_base = None
        if ctx.needs_input_grad[0]:
            d_mixes = (dz * s_wide).to(mixes.dtype).view(mixes.shape)
        if ctx.needs_input_grad[1]:
            per_column = (dz * m2.to(torch.float32)).sum(0)  # [width]
            d_scale = torch.stack((per_column[:h].sum(), per_column[h:2 * h].sum(), per_column[2 * h:].sum()))
            d_scale = d_scale.to(scale.dtype)
        if ctx.needs_input_grad[2]:
            d_base = dz.sum(0).to(base.dtype)
        return d_mixes, d_scale, d_base, None, None, None


def split_sinkhorn_trainable(mixes: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int,
                             eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """`hc_split_sinkhorn` differentiable in mixes, scale and base: the forward kernel, and a backward kernel that
    runs the normalisations again and walks them back (one launch each way, where the reference's autograd records
    some 150 ops a call at 20 iterations and runs about twice as many backward). Inputs must satisfy
    `covers_backward`."""
    return _SplitSinkhorn.apply(mixes, scale, base, hc_mult, iters, eps)


def _backward(m: Tensor, scale: Tensor, base: Tensor, g_pre: Tensor, g_post: Tensor, g_comb: Tensor, h: int,
              iters: int, eps: float) -> Tensor:
    """dz [T, (2+h)*h] fp32 for the mixes m [T, (2+h)*h] and the outputs' gradients."""
    t, dev = m.shape[0], m.device
    if m.stride(-1) != 1:
        m = m.contiguous()
    dz = torch.empty((t, (2 + h) * h), dtype=torch.float32, device=dev)
    if not t:
        return dz
    hp = triton.next_power_of_2(h)
    grads = [g.reshape(t, -1).to(torch.float32).contiguous() for g in (g_pre, g_post, g_comb)]
    states = torch.empty((t, 2 * iters - 1, hp, hp), dtype=torch.float32, device=dev)
    block_t = min(triton.next_power_of_2(t), max(1, _TILE // 2 // (hp * hp)))
    num_warps = 4 if block_t * hp * hp >= 1024 else 2 if block_t * hp * hp >= 256 else 1
    _sinkhorn_backward_kernel[(triton.cdiv(t, block_t),)](
        m, m.stride(0), scale.to(device=dev, dtype=torch.float32).contiguous(),
        base.to(device=dev, dtype=torch.float32).contiguous(), *grads, dz, states, t, iters, float(eps), H=h, HP=hp,
        BLOCK_T=block_t, LIBDEVICE=libdevice_exp(), num_warps=num_warps)
    return dz
