"""Triton mHC reads and writes of the streams: `hc_pre` in two launches (the reference's takes about twenty) and
`hc_collapse` / `hc_post` in one each.

`hc_pre` (x [T, h, d] -> u [T, d], post [T, h], comb [T, h, h]):

1. `_mixes_partials_kernel`: programs over (16 tokens, 1,024 of the h*d values) take their slice of the product
   with the mixing map fn [m, h*d] (fp32 dots, no TF32) and of the sum of squares, into partials
   [T, splits, m] and [T, splits]. The split depends on h*d alone, so a token's mixes do not depend on the batch
   it is in, and a batch-1 decode step still spreads the map's read over h*d / 1,024 programs.
2. `_sinkhorn_collapse_kernel`, programs over (tokens, columns) as the collapse's: the Sinkhorn kernel's
   arithmetic (`sinkhorn.split_sinkhorn` with ``PARTIALS``) adds each token's partials in order, times ``1/rms``
   (the reference's ``(x @ fn.T) * rsqrt(mean(x^2) + eps)``), and splits and projects (the first column block's
   programs; the others compute pre alone), then ``u = sum_k pre_k * x_k`` over the program's columns in fp32,
   products rounded, the h terms added in order (`_collapse_kernel`'s arithmetic). `hc_pre_norm`: the programs
   take whole rows (a token's 4,096 columns at batch 1, where `hc_pre`'s take 256) and norm them, with their FP8
   quantisation, before they store them (`rows.normed_rows`, `rows.store_act_quant`: the sublayer's
   `rms_norm_quant` in the same launch).

`hc_post`: ``X'_k = post_k * out + sum_j comb[j, k] * X_j`` per (token, 256 columns), products rounded and the
terms added in order (the reference's order; launched with ``enable_fp_fusion=False``), always a new tensor.

Under Triton's interpreter (the CPU tests) a collapse or write-back program takes whole rows of many tokens
instead: the interpreter pays per program, and no element's arithmetic depends on the tiling.

Step 1's dot sums in the hardware's order, so the mixes agree with the reference's fp32 matmul to fp32 rounding
(`tests/test_triton_mhc.py` states the tolerances); the collapse and the write-back are the reference's
arithmetic term for term.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsv4.quant import ACT_AMAX_FLOOR, FP8_BLOCK, FP8_MAX

from . import sinkhorn
from .numerics import TL_DTYPES, dot, interpreting, libdevice_exp, round_to
from .rows import normed_rows, row_warps, store_act_quant, widen

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK = 1024  # h*d values per partial product (a multiple of _BK)
_BK = 64
_BLOCK_T = 16  # tokens per partials program (a dot's smallest M)
_BD = 256  # columns per collapse / write-back program
_MAX_H = 16
_MAX_NORM_D = 16384  # the widest row a collapse program norms whole


@triton.jit
def _mixes_partials_kernel(x_ptr, fn_ptr, part_ptr, ss_ptr, T, K, M, sxt, sfm, splits,
                           MP: tl.constexpr, BLOCK_T: tl.constexpr, BK: tl.constexpr, CHUNK: tl.constexpr,
                           F32: tl.constexpr):
    """x [T, K] (unit last stride), fn [M, K] -> part [T, splits, M] (x's K slice `split` times fn's, fp32) and
    ss [T, splits] (the slice's sum of squares)."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    tok_ok = tok < T
    tok64 = tok.to(tl.int64)
    m = tl.arange(0, MP)
    m_ok = m < M
    acc = tl.zeros((BLOCK_T, MP), tl.float32)
    ss = tl.zeros((BLOCK_T,), tl.float32)
    for k0 in range(split * CHUNK, tl.minimum(split * CHUNK + CHUNK, K), BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        xt = tl.load(x_ptr + tok64[:, None] * sxt + k[None, :], mask=tok_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        ss += tl.sum(xt * xt, axis=1)
        f = tl.load(fn_ptr + m[None, :] * sfm + k[:, None], mask=k_ok[:, None] & m_ok[None, :],
                    other=0.0).to(tl.float32)  # [BK, MP]
        acc += dot(xt, f, F32)
    tl.store(part_ptr + (tok64[:, None] * splits + split) * M + m[None, :], acc, mask=tok_ok[:, None] & m_ok[None, :])
    tl.store(ss_ptr + tok64 * splits + split, ss, mask=tok_ok)


@triton.jit
def _collapse_kernel(x_ptr, pre_ptr, u_ptr, T, D, sxt, sxh, sut, H: tl.constexpr, BLOCK_T: tl.constexpr,
                     BD: tl.constexpr, DT: tl.constexpr):
    """x [T, H, D], pre [T, H] fp32 -> u [T, D] = sum_k pre_k * x_k (products rounded, added in order), in DT."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    col = tl.program_id(1) * BD + tl.arange(0, BD)
    t_ok = t < T
    mask = t_ok[:, None] & (col < D)[None, :]
    rows = x_ptr + t[:, None] * sxt + col[None, :]
    u = tl.load(pre_ptr + t * H, mask=t_ok, other=0.0)[:, None] * tl.load(rows, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(1, H):
        pre = tl.load(pre_ptr + t * H + k, mask=t_ok, other=0.0)
        u += pre[:, None] * tl.load(rows + k * sxh, mask=mask, other=0.0).to(tl.float32)
    tl.store(u_ptr + t[:, None] * sut + col[None, :], round_to(u, DT), mask=mask)


@triton.jit
def _sinkhorn_collapse_kernel(part_ptr, ss_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, x_ptr, u_ptr, T, D,
                              stride_t, iters, eps, splits, K, norm_eps, sxt, sxh, sut,
                              w_ptr, q_ptr, s_ptr, NB, rms_eps,  # NORM
                              H: tl.constexpr, HP: tl.constexpr, BLOCK_T: tl.constexpr, BD: tl.constexpr,
                              DT: tl.constexpr, LIBDEVICE: tl.constexpr, HEAD: tl.constexpr, NORM: tl.constexpr,
                              QUANT: tl.constexpr, QB: tl.constexpr, FLOOR: tl.constexpr, INV_MAX: tl.constexpr):
    """`hc_pre`'s last two steps in one launch, a program per (block of tokens, block of columns): the tokens' pre
    from the partials (the Sinkhorn kernel's arithmetic), then `_collapse_kernel`'s sum over its columns. The
    programs of the first column block also finish the split and the Sinkhorn iterations and write pre, post and
    comb; the others compute pre alone (a few dozen operations a token), which the collapse needs before any store
    could be read. HEAD: the hc head's collapse (`hc_head`), partials of its H mixes, pre alone in every program.
    NORM (whole rows a program, BD >= D): the collapsed rows, rounded to DT, through the sublayer's RMSNorm with
    the weight at w_ptr (`rows.normed_rows`) before they are stored, and with QUANT their `act_quant` into q and s
    (`rows.store_act_quant`): `hc_pre` then `rms_norm_quant`'s kernel, in one launch."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    if HEAD:
        pre = sinkhorn.split_sinkhorn(part_ptr, ss_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, tok, T,
                                      stride_t, iters, eps, splits, K, norm_eps, H, HP, BLOCK_T, LIBDEVICE, True,
                                      False, H)
    elif tl.program_id(1) == 0:
        pre = sinkhorn.split_sinkhorn(part_ptr, ss_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, tok, T,
                                      stride_t, iters, eps, splits, K, norm_eps, H, HP, BLOCK_T, LIBDEVICE, True, True,
                                      (2 + H) * H)
    else:
        pre = sinkhorn.split_sinkhorn(part_ptr, ss_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, tok, T,
                                      stride_t, iters, eps, splits, K, norm_eps, H, HP, BLOCK_T, LIBDEVICE, True,
                                      False, (2 + H) * H)
    t = tok.to(tl.int64)
    k = tl.arange(0, HP)
    col = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = (t < T)[:, None] & (col < D)[None, :]
    rows = x_ptr + t[:, None] * sxt + col[None, :]
    # pre_k picked out of the tile by a masked sum of one non-zero term (exact), as `_collapse_kernel` loads it
    u = tl.sum(tl.where(k[None, :] == 0, pre, 0.0), axis=1)[:, None] * tl.load(rows, mask=mask, other=0.0).to(
        tl.float32)
    for j in tl.static_range(1, H):
        pre_j = tl.sum(tl.where(k[None, :] == j, pre, 0.0), axis=1)
        u += pre_j[:, None] * tl.load(rows + j * sxh, mask=mask, other=0.0).to(tl.float32)
    u = round_to(u, DT)
    if NORM:
        u = normed_rows(tl.where(mask, widen(u, DT), 0.0), w_ptr, col, D, rms_eps, DT)
        if QUANT:
            store_act_quant(u, t, t < T, col, mask, q_ptr, s_ptr, D, NB, BD, BLOCK_T, QB, FLOOR, INV_MAX, DT)
    tl.store(u_ptr + t[:, None] * sut + col[None, :], u, mask=mask)


@triton.jit
def _post_kernel(out_ptr, x_ptr, post_ptr, comb_ptr, new_ptr, T, D, sot, sxt, sxh, snt, snh, H: tl.constexpr,
                 BLOCK_T: tl.constexpr, BD: tl.constexpr, DT: tl.constexpr):
    """out [T, D], x [T, H, D], post [T, H], comb [T, H, H] fp32 -> new [T, H, D]: post_k * out + sum_j comb[j, k]
    * x_j (products rounded, the sum in order of j), rounded to DT."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    col = tl.program_id(1) * BD + tl.arange(0, BD)
    t_ok = t < T
    mask = t_ok[:, None] & (col < D)[None, :]
    rows = x_ptr + t[:, None] * sxt + col[None, :]
    o = tl.load(out_ptr + t[:, None] * sot + col[None, :], mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(H):
        comb = tl.load(comb_ptr + t * (H * H) + k, mask=t_ok, other=0.0)  # comb[0, k]
        mixed = comb[:, None] * tl.load(rows, mask=mask, other=0.0).to(tl.float32)
        for j in tl.static_range(1, H):
            comb = tl.load(comb_ptr + t * (H * H) + j * H + k, mask=t_ok, other=0.0)
            mixed += comb[:, None] * tl.load(rows + j * sxh, mask=mask, other=0.0).to(tl.float32)
        post = tl.load(post_ptr + t * H + k, mask=t_ok, other=0.0)
        tl.store(new_ptr + t[:, None] * snt + k * snh + col[None, :], round_to(post[:, None] * o + mixed, DT),
                 mask=mask)


def _tiles(t: int, d: int) -> tuple[int, int]:
    """(tokens, columns) a collapse / write-back program takes: 256 columns of one token on a GPU (a decode's
    row spread over its SMs); under the interpreter, which runs programs one by one, whole rows of many tokens."""
    if interpreting():
        bd = triton.next_power_of_2(d)
        return max(1, min(triton.next_power_of_2(t), 16384 // bd)), bd
    return 1, _BD


def stream_rows(x: Tensor) -> Tensor | None:
    """x [..., h, d] as [T, h, d] with a unit last stride, without a copy (None where it does not view so)."""
    if x.dim() < 2 or x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.shape[-2], x.shape[-1])
    except RuntimeError:
        return None


def _no_grad(*tensors: Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def covers_pre(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int) -> bool:
    """x fp32/bf16/fp16 [..., h, d] (1 <= h <= 16), fn [(2+h)*h, h*d] and scale / base not fp64, iters >= 1, no
    gradient wanted."""
    if not (x.dtype in DTYPES and x.dim() >= 2 and x.shape[-2] == hc_mult and x.numel() > 0):
        return False
    if fn.dim() != 2 or tuple(fn.shape) != ((2 + hc_mult) * hc_mult, hc_mult * x.shape[-1]):
        return False
    if any(t.dtype == torch.float64 for t in (fn, scale, base)) or not _no_grad(x, fn, scale, base):
        return False
    return 1 <= hc_mult <= _MAX_H and isinstance(iters, int) and iters >= 1 and stream_rows(x) is not None


def covers_collapse(x: Tensor, pre: Tensor) -> bool:
    """x fp32/bf16/fp16 [..., h, d] (h <= 16), pre fp32 [..., h], no gradient wanted."""
    return (x.dtype in DTYPES and x.dim() >= 2 and 1 <= x.shape[-2] <= _MAX_H and pre.dtype == torch.float32
            and tuple(pre.shape) == tuple(x.shape[:-1]) and _no_grad(x, pre) and stream_rows(x) is not None)


def covers_post(out: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> bool:
    """out [..., d], x [..., h, d] fp32/bf16/fp16 (h <= 16), post [..., h] and comb [..., h, h] fp32, no gradient
    wanted."""
    if not (x.dtype in DTYPES and out.dtype in DTYPES and x.dim() >= 2 and 1 <= x.shape[-2] <= _MAX_H):
        return False
    h = x.shape[-2]
    if not (tuple(out.shape) == (*x.shape[:-2], x.shape[-1]) and tuple(post.shape) == tuple(x.shape[:-1])
            and tuple(comb.shape) == (*x.shape[:-1], h)):
        return False
    if post.dtype != torch.float32 or comb.dtype != torch.float32 or not _no_grad(out, x, post, comb):
        return False
    return stream_rows(x) is not None and out.stride(-1) == 1


def _collapse(xv: Tensor, pre: Tensor, dtype: torch.dtype) -> Tensor:
    t, h, d = xv.shape
    u = torch.empty((t, d), dtype=dtype, device=xv.device)
    if u.numel():
        block_t, bd = _tiles(t, d)
        _collapse_kernel[(triton.cdiv(t, block_t), triton.cdiv(d, bd))](
            xv, pre, u, t, d, xv.stride(0), xv.stride(1), u.stride(0), H=h, BLOCK_T=block_t, BD=bd, DT=TL_DTYPES[dtype],
            num_warps=2, enable_fp_fusion=False)
    return u


def hc_collapse(x: Tensor, pre: Tensor) -> Tensor:
    """``ReferenceBackend.hc_collapse``: x [..., h, d], pre [..., h] -> [..., d] in x.dtype."""
    xv = stream_rows(x)
    return _collapse(xv, pre.reshape(-1, x.shape[-2]).contiguous(), x.dtype).view(*x.shape[:-2], x.shape[-1])


def mixes_partials(flat: Tensor, fn: Tensor) -> tuple[Tensor, Tensor]:
    """Step 1 of `hc_pre`: flat [T, K] (unit last stride) and fn [M, K] fp32 contiguous -> the partial products
    [T, splits, M] and partial sums of squares [T, splits] fp32 over K / 1,024 slices."""
    t, k = flat.shape
    m = fn.shape[0]
    splits = triton.cdiv(k, _CHUNK)
    part = torch.empty((t, splits, m), dtype=torch.float32, device=flat.device)
    ss = torch.empty((t, splits), dtype=torch.float32, device=flat.device)
    if t:
        _mixes_partials_kernel[(triton.cdiv(t, _BLOCK_T), splits)](
            flat, fn, part, ss, t, k, m, flat.stride(0), fn.stride(0), splits,
            MP=max(16, triton.next_power_of_2(m)), BLOCK_T=_BLOCK_T, BK=_BK, CHUNK=_CHUNK, F32=interpreting(),
            num_warps=4)
    return part, ss


def hc_pre(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int, eps: float,
           norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``ReferenceBackend.hc_pre``: x [..., h, d] -> (u [..., d] in x.dtype, post [..., h], comb [..., h, h])."""
    u, _, post, comb = _pre(x, fn, scale, base, iters, eps, norm_eps, None)
    return u, post, comb


def covers_pre_norm(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int,
                    weight: Tensor) -> bool:
    """`covers_pre`, and a norm weight [d] not fp64 wanting no gradient, d <= 16,384 (a row a program)."""
    d = x.shape[-1] if x.dim() else 0
    return (covers_pre(x, fn, scale, base, hc_mult, iters) and d <= _MAX_NORM_D and weight.dim() == 1
            and weight.shape[0] == d and weight.dtype != torch.float64 and _no_grad(weight))


def hc_pre_norm(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int, eps: float,
                norm_eps: float, weight: Tensor, rms_eps: float, quantize: bool
                ) -> tuple[Tensor, tuple[Tensor, Tensor] | None, Tensor, Tensor]:
    """``ReferenceBackend.hc_pre_norm`` in `hc_pre`'s two launches: the collapse's programs take whole rows and
    norm them (and quantise them) before they store them, as `rows.rms_norm_quant`'s kernel does."""
    return _pre(x, fn, scale, base, iters, eps, norm_eps, (weight, rms_eps, quantize))


def _pre(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, eps: float, norm_eps: float,
         norm: tuple[Tensor, float, bool] | None) -> tuple[Tensor, tuple[Tensor, Tensor] | None, Tensor, Tensor]:
    xv = stream_rows(x)
    t, h, d = xv.shape
    k, m = h * d, fn.shape[0]
    flat = xv.reshape(t, k)  # (a view unless h's stride is not d)
    dev = x.device
    part, ss = mixes_partials(flat, fn.to(torch.float32).contiguous())
    splits = part.shape[1]
    pre = torch.empty((t, h), dtype=torch.float32, device=dev)
    post = torch.empty((t, h), dtype=torch.float32, device=dev)
    comb = torch.empty((t, h, h), dtype=torch.float32, device=dev)
    u = torch.empty((t, d), dtype=x.dtype, device=dev)
    weight, rms_eps, quantize = norm if norm is not None else (u, 0.0, False)
    nb = -(-d // FP8_BLOCK)
    q = s = None
    if quantize:
        q = torch.empty((t, d), dtype=torch.uint8, device=dev)
        s = torch.empty((t, nb), dtype=torch.float32, device=dev)
    if u.numel():
        block_t, bd = _tiles(t, d)
        warps = 2
        if norm is not None:  # whole rows (and quantisation blocks) a program, as `rows.rms_norm`'s programs take
            bd = max(triton.next_power_of_2(d), FP8_BLOCK if quantize else 1)
            block_t = max(1, min(triton.next_power_of_2(t), 16384 // bd)) if interpreting() else 1
            warps = row_warps(block_t * bd)
        _sinkhorn_collapse_kernel[(triton.cdiv(t, block_t), triton.cdiv(d, bd))](
            part, ss, scale.to(device=dev, dtype=torch.float32).contiguous(),
            base.to(device=dev, dtype=torch.float32).contiguous(), pre, post, comb, xv, u, t, d, splits * m, iters,
            float(eps), splits, k, float(norm_eps), xv.stride(0), xv.stride(1), u.stride(0),
            weight.contiguous(), u if q is None else q, u if s is None else s, nb, float(rms_eps), H=h,
            HP=triton.next_power_of_2(h), BLOCK_T=block_t, BD=bd, DT=TL_DTYPES[x.dtype], LIBDEVICE=libdevice_exp(),
            HEAD=False, NORM=norm is not None, QUANT=quantize, QB=FP8_BLOCK, FLOOR=ACT_AMAX_FLOOR,
            INV_MAX=1.0 / FP8_MAX, num_warps=warps, enable_fp_fusion=False)
    lead = x.shape[:-2]
    quantized = None if q is None else (q.view(torch.float8_e4m3fn).view(*lead, d), s.view(*lead, nb))
    return u.view(*lead, d), quantized, post.view(*lead, h), comb.view(*lead, h, h)


def covers_head(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor) -> bool:
    """x fp32/bf16/fp16 [..., h, d] (1 <= h <= 16), fn [h, h*d], scale [1] and base [h], none fp64, no gradient
    wanted."""
    if not (x.dtype in DTYPES and x.dim() >= 2 and 1 <= x.shape[-2] <= _MAX_H and x.numel() > 0):
        return False
    h = x.shape[-2]
    if tuple(fn.shape) != (h, h * x.shape[-1]) or scale.numel() != 1 or tuple(base.shape) != (h,):
        return False
    if any(t.dtype == torch.float64 for t in (fn, scale, base)) or not _no_grad(x, fn, scale, base):
        return False
    return stream_rows(x) is not None


def hc_head(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, eps: float, norm_eps: float) -> Tensor:
    """``ReferenceBackend.hc_head`` in two launches, `hc_pre`'s: the partial products with the head's map, then its
    pre (``sigmoid(mixes * scale + base) + eps``, the Sinkhorn kernel's arithmetic for pre) and the collapse."""
    xv = stream_rows(x)
    t, h, d = xv.shape
    part, ss = mixes_partials(xv.reshape(t, h * d), fn.to(torch.float32).contiguous())
    u = torch.empty((t, d), dtype=x.dtype, device=x.device)
    block_t, bd = _tiles(t, d)
    _sinkhorn_collapse_kernel[(triton.cdiv(t, block_t), triton.cdiv(d, bd))](
        part, ss, scale.to(device=x.device, dtype=torch.float32).contiguous(),
        base.to(device=x.device, dtype=torch.float32).contiguous(), part, part, part, xv, u, t, d, part.shape[1] * h,
        0, float(eps), part.shape[1], h * d, float(norm_eps), xv.stride(0), xv.stride(1), u.stride(0),
        u, u, u, 1, 0.0, H=h, HP=triton.next_power_of_2(h), BLOCK_T=block_t, BD=bd, DT=TL_DTYPES[x.dtype],
        LIBDEVICE=libdevice_exp(), HEAD=True, NORM=False, QUANT=False, QB=FP8_BLOCK, FLOOR=ACT_AMAX_FLOOR,
        INV_MAX=1.0 / FP8_MAX, num_warps=2, enable_fp_fusion=False)
    return u.view(*x.shape[:-2], d)


def hc_post(out: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """``ReferenceBackend.hc_post``: a new tensor [..., h, d] in x.dtype."""
    xv = stream_rows(x)
    t, h, d = xv.shape
    ov = out.reshape(t, d)
    new = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    nv = new.view(t, h, d)
    if new.numel():
        block_t, bd = _tiles(t, d)
        _post_kernel[(triton.cdiv(t, block_t), triton.cdiv(d, bd))](
            ov, xv, post.reshape(t, h).contiguous(), comb.reshape(t, h, h).contiguous(), nv, t, d, ov.stride(0),
            xv.stride(0), xv.stride(1), nv.stride(0), nv.stride(1), H=h, BLOCK_T=block_t, BD=bd, DT=TL_DTYPES[x.dtype],
            num_warps=2, enable_fp_fusion=False)
    return new
