"""Manifold-constrained hyper-connections (mHC): the residual stream is `hc_mult` parallel copies.

Before each sublayer, `hc_pre` reads the streams into one input (weights `pre`) and computes the
mixing for the way back; after it, `hc_post` writes the output into every stream (weights `post`)
on top of a doubly-stochastic mix of the old streams (`comb`, Sinkhorn-projected). All coefficients
are data-dependent per token and computed in fp32; the streams themselves stay in the model dtype.

Ablations (`Transformer(hc_mode=...)`, for training studies): "hc" keeps the same dynamic coefficients but
leaves `comb` unconstrained (ByteDance's hyper-connections: no Sinkhorn, so the composite gain over depth is
free to grow); "residual" is a plain pre-norm residual network (the streams stay identical copies).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels

HC_MODES = ("mhc", "hc", "residual")


def hc_split_unconstrained(mixes: Tensor, scale: Tensor, base: Tensor, hc_mult: int, eps: float
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """The "hc" ablation: pre and post as in mHC, comb the raw dynamic matrix (no softmax, no Sinkhorn)."""
    h = hc_mult
    pre = torch.sigmoid(mixes[..., :h] * scale[0] + base[:h]) + eps
    post = 2.0 * torch.sigmoid(mixes[..., h:2 * h] * scale[1] + base[h:2 * h])
    comb = (mixes[..., 2 * h:] * scale[2] + base[2 * h:]).unflatten(-1, (h, h))
    return pre, post, comb


def hc_pre(
    x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int, eps: float, norm_eps: float,
    mode: str = "mhc",
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Collapse the streams for a sublayer.

    x [B,S,h,d] -> u [B,S,d] (x.dtype), post [B,S,h] fp32, comb [B,S,h,h] fp32 (comb[j,k]: stream j -> k).
    In "residual" mode u is the (single, replicated) stream and post, comb are None.
    """
    if mode == "residual":
        return x[:, :, 0], None, None
    if mode == "mhc":
        return kernels.hc_pre(x, fn, scale, base, hc_mult, iters, eps, norm_eps)
    mixes = kernels.hc_mixes(x, fn, norm_eps)
    pre, post, comb = hc_split_unconstrained(mixes, scale.to(torch.float32), base.to(torch.float32), hc_mult, eps)
    return kernels.hc_collapse(x, pre), post, comb


def hc_post(out: Tensor, x: Tensor, post: Tensor | None, comb: Tensor | None, inplace: bool = False) -> Tensor:
    """New streams X'_k = post_k * out + sum_j comb[j,k] * X_j, in fp32, returned in x.dtype (the kernel op
    `dsv4.kernels.hc_post`; a plain residual X + out when post and comb are None). `inplace`: x is not used
    afterwards and the result may take its storage."""
    if comb is None:
        return (x.to(torch.float32) + out.to(torch.float32).unsqueeze(2)).to(x.dtype)
    return kernels.hc_post(out, x, post, comb, inplace)


def hc_head(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, eps: float, norm_eps: float,
            mode: str = "mhc") -> Tensor:
    """Final collapse of the streams before the output norm: [B,S,h,d] -> [B,S,d]."""
    if mode == "residual":
        return x[:, :, 0]
    return kernels.hc_head(x, fn, scale, base, eps, norm_eps)


@torch.no_grad()
def composite_gain(maps: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The mHC paper's Amax gain magnitude of the residual mixing over depth (training.md 2.5).

    maps: each sublayer's comb [B,S,h,h] (comb[j,k]: stream j -> k), in order. The composite map taking the
    first sublayer's input streams to the last one's output is H = (C_1 C_2 ... C_L)^T per token; its largest
    absolute row sum is the forward gain, its largest absolute column sum the backward gain, each averaged
    over the tokens. Returns (forward, backward) as fp32 scalars; both are 1 for doubly stochastic maps."""
    product = maps[0].to(torch.float32)
    for comb in maps[1:]:
        product = product @ comb.to(torch.float32)
    composite = product.transpose(-1, -2)  # [B,S,h,h]: row i = output stream i
    forward = composite.abs().sum(dim=-1).amax(dim=-1).mean()
    backward = composite.abs().sum(dim=-2).amax(dim=-1).mean()
    return forward, backward
