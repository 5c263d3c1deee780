"""Manifold-constrained hyper-connections (mHC): the residual stream is `hc_mult` parallel copies.

Before each sublayer, `hc_pre` reads the streams into one input (weights `pre`) and computes the
mixing for the way back; after it, `hc_post` writes the output into every stream (weights `post`)
on top of a doubly-stochastic mix of the old streams (`comb`, Sinkhorn-projected). All coefficients
are data-dependent per token and computed in fp32; the streams themselves stay in the model dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels


def _mixes(x: Tensor, fn: Tensor, norm_eps: float) -> Tensor:
    """x [B,S,h,d] -> fp32 [B,S,m]: a weightless RMS norm over all h*d values folded into a linear map."""
    flat = x.flatten(2).to(torch.float32)
    rms = torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    return (flat @ fn.to(torch.float32).t()) * rms


def hc_pre(
    x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int, eps: float, norm_eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Collapse the streams for a sublayer.

    x [B,S,h,d] -> u [B,S,d] (x.dtype), post [B,S,h] fp32, comb [B,S,h,h] fp32 (comb[j,k]: stream j -> k).
    """
    pre, post, comb = kernels.hc_split_sinkhorn(_mixes(x, fn, norm_eps), scale, base, hc_mult, iters, eps)
    u = (pre.unsqueeze(-1) * x.to(torch.float32)).sum(dim=2)
    return u.to(x.dtype), post, comb


def hc_post(out: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """New streams X'_k = post_k * out + sum_j comb[j,k] * X_j, in fp32, returned in x.dtype."""
    # the official expression: products rounded to fp32, then summed over j (an einsum fuses them differently)
    mixed = torch.sum(comb.unsqueeze(-1) * x.to(torch.float32).unsqueeze(-2), dim=2)
    return (post.unsqueeze(-1) * out.to(torch.float32).unsqueeze(2) + mixed).to(x.dtype)


def hc_head(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, eps: float, norm_eps: float) -> Tensor:
    """Final collapse of the streams before the output norm: [B,S,h,d] -> [B,S,d]."""
    pre = torch.sigmoid(_mixes(x, fn, norm_eps) * scale.to(torch.float32) + base.to(torch.float32)) + eps
    return (pre.unsqueeze(-1) * x.to(torch.float32)).sum(dim=2).to(x.dtype)
