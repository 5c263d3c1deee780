"""`head_cross_entropy` for training: the head's GEMM and the summed cross-entropy a block of rows at a time
(`cross_entropy.ChunkedHeadCrossEntropy`), each block's logits turned into the loss's gradient in place by one
launch.

A program takes one row of logits [V] (fp32, bf16 or fp16, what the GEMM wrote) and walks the vocabulary twice
in tiles of `_TILE`:

1. a running maximum and sum of exponentials per lane (rescaled as the maximum grows), folded into the row's
   log-sum-exp at the end; the loss is ``lse - logit[target]``;
2. the gradient ``exp(logit - lse) - [column == target]`` written over the logits in their dtype (rounded to
   nearest even), a row of zeros where the target is ignored.

Two reads and a write of the row, where the unfused loss reads and writes its fp32 widening some dozen times. The
exponentials are libdevice's expf on a GPU (torch's), fp32 throughout: the reference's loss and gradient to fp32
rounding of the sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..cross_entropy import chunked_head_cross_entropy, compute_dtype
from .numerics import TL_DTYPES, exp, libdevice_exp, round_to

_TILE = 4096  # logits a lane group reads per step of the walk over the vocabulary
_LOWEST = tl.constexpr(-3.0e38)  # a running maximum's start: finite, so exp(start - start) is 1, not NaN


@triton.jit
def _head_ce_rows_kernel(logits_ptr, targets_ptr, loss_ptr, V, ignore_index, TILE: tl.constexpr,
                         GRAD: tl.constexpr, DT: tl.constexpr, LIBDEVICE: tl.constexpr):
    """logits [rows, V] contiguous, targets [rows] int64 -> loss [rows] fp32; with GRAD, the logits overwritten
    by the loss's gradient with respect to them."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    lanes = tl.arange(0, TILE)
    target = tl.load(targets_ptr + row)
    keep = (lanes * 0 + target) != ignore_index  # (a vector: the interpreter takes no scalar in a mask)
    top = tl.full((TILE,), _LOWEST, tl.float32)
    total = tl.zeros((TILE,), tl.float32)
    for start in range(0, V, TILE):
        col = start + lanes
        x = tl.load(base + col, mask=col < V, other=float("-inf")).to(tl.float32)
        new_top = tl.maximum(top, x)
        total = total * exp(top - new_top, LIBDEVICE) + exp(x - new_top, LIBDEVICE)
        top = new_top
    row_top = tl.max(top, axis=0)
    lse = row_top + tl.log(tl.sum(total * exp(top - row_top, LIBDEVICE), axis=0))
    # (a target outside the vocabulary reads nothing: the caller's data has none)
    at = lanes * 0 + target
    picked = tl.load(base + at, mask=keep & (lanes == 0) & (at >= 0) & (at < V), other=0.0).to(tl.float32)
    loss = tl.where(keep, lse - picked, 0.0)
    tl.store(loss_ptr + row + lanes * 0, loss, mask=lanes == 0)
    if GRAD:
        for start in range(0, V, TILE):
            col = start + lanes
            ok = col < V
            x = tl.load(base + col, mask=ok, other=0.0).to(tl.float32)
            g = exp(x - lse, LIBDEVICE) - tl.where(col == target, 1.0, 0.0)
            tl.store(base + col, round_to(tl.where(keep, g, 0.0), DT), mask=ok)


def rows(logits: Tensor, targets: Tensor, ignore_index: int, grad: bool) -> Tensor:
    """`cross_entropy.RowsFn` as one launch: one program a row."""
    m, v = logits.shape
    loss = torch.empty(m, dtype=torch.float32, device=logits.device)
    if m:
        tile = min(_TILE, triton.next_power_of_2(v))
        _head_ce_rows_kernel[(m,)](logits, targets.contiguous(), loss, v, int(ignore_index), TILE=tile, GRAD=grad,
                                   DT=TL_DTYPES[logits.dtype], LIBDEVICE=libdevice_exp(),
                                   num_warps=8 if tile >= 2048 else 4)
    return loss


def covers(x: Tensor, weight: Tensor, targets: Tensor) -> bool:
    """x [..., K] and weight [V, K] fp32/bf16/fp16 on one device, a GEMM dtype of those (not fp64, which the
    reference keeps for gradcheck), targets int64 [...] of x's rows."""
    return (x.dtype in TL_DTYPES and weight.dtype in TL_DTYPES and compute_dtype(x, weight) in TL_DTYPES
            and weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and weight.shape[0] > 0
            and targets.dtype == torch.int64 and targets.shape == x.shape[:-1] and x.device == weight.device
            and targets.device == x.device)


def head_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                       chunk: int | None = None) -> Tensor:
    """The chunked head cross-entropy over the row kernel (`chunk`: rows a block, default by its bytes)."""
    return chunked_head_cross_entropy(x, weight, targets, ignore_index, rows, chunk)
