"""The summed cross-entropy of a vocabulary head, with its gradient in one pass, for every backend.

Two pieces:

* `summed_cross_entropy(logits, targets)`: F.cross_entropy(..., reduction="sum") over logits the caller holds,
  its backward ``softmax(logits) - onehot(target)`` straight from the logits and their log-sum-exp. What the
  reference backend's `head_cross_entropy` computes after its head, and what the trainer uses over logits of any
  head (a vocab-parallel one).
* `ChunkedHeadCrossEntropy`: the head's GEMM and the loss together, a block of rows at a time, for a fast
  backend. A training step's logits are its largest tensor (8,192 rows of V4's 129,280-word vocabulary are
  4.2 GB in fp32), and the unfused loss passes over them some dozen times: the GEMM writes them, a cast widens
  them, the loss reads them, its backward writes a gradient as large, a cast narrows it, the GEMMs' backward read
  it. Here each block's logits are written by the GEMM, turned in place into their gradient by one row function
  (a backend's kernel: two reads and a write), and consumed at once by the two gradient GEMMs, so no more than one
  block is ever held. The gradients are those of the loss with respect to itself (an output gradient of 1) and
  are scaled by the real one in backward: the loss is a sum, so that is exact up to rounding (the unfused path
  rounds ``g * (p - onehot)`` to the GEMMs' dtype, this one ``p - onehot``).

Ignored targets (``IGNORE_INDEX``, F.cross_entropy's default) add nothing and get no gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

IGNORE_INDEX = -100

# exp's arguments are floored here: below it the results are denormal, which takes torch's vectorised exp on the
# CPU a slow path (about 100x slower per element). Such a term is under 2e-38, below fp32's resolution of a
# softmax denominator of at least 1 and of any gradient it would carry.
EXP_FLOOR = -87.0

# the logits of one block of rows of `ChunkedHeadCrossEntropy` at most (V4's vocabulary: 4,096 rows in bf16). Each
# block also passes once over the weight's fp32 gradient (adding its product), so fewer, larger blocks move less.
CHUNK_BYTES = 1 << 30


def summed_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Sum over the rows of F.cross_entropy(logits [..., V] in fp32, targets [...]), ignored targets left out (fp64
    logits stay fp64: gradcheck's dtype)."""
    wide = logits if logits.dtype == torch.float64 else logits.float()
    return _SummedCrossEntropy.apply(wide.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index)


class _SummedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits [M, V], targets [M], ignore_index, reduction="sum") with its gradient in one pass,
    softmax(logits) - onehot(target) times the output's gradient (zero on ignored rows), from the logits and their
    log-sum-exp. Autograd's log_softmax + nll_loss writes the [M, V] log-probabilities forward and a zero-filled
    [M, V] gradient that it reads back beside them; and a trained model's logits spread over more than 87, where
    torch's exp (in log_softmax too) turns denormal and slow: the exponentials' arguments are floored at
    `EXP_FLOOR`. Over 3,584 rows of a 2,048 vocabulary, forward and backward take 12.3 ms instead of 39.3 with logits
    spread over 100, the same 11 ms over 10."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        losses, lse, safe, keep = _row_losses(logits, targets, ignore_index)
        ctx.save_for_backward(logits, lse, safe, keep)
        return losses.sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, lse, safe, keep = ctx.saved_tensors
        g = torch.where(keep, grad, 0.0).unsqueeze(1)  # [M, 1]
        # the floor raised per row so that a floored probability times g stays normal too (a product's denormal
        # result is as slow as exp's): each floored term of the gradient is then exp(EXP_FLOOR) at most
        floor = (EXP_FLOOR - g.abs().log()).clamp_(min=EXP_FLOOR, max=0.0)
        probs = torch.sub(logits, lse).clamp_(min=floor).exp_()
        return probs.mul_(g).scatter_add_(1, safe, -g), None, None


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the head's GEMM runs in, as `kernels.linear` would run it here: autocast's where it is on for
    x's device, else the weight's."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


# a block of logits [m, V] (the compute dtype) and its targets [m] -> the rows' losses [m] fp32 (0 where ignored);
# with `grad`, the logits are overwritten by the loss's gradient with respect to them (zero rows where ignored)
RowsFn = Callable[[Tensor, Tensor, int, bool], Tensor]


def _row_losses(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each row's loss [M] (0 where ignored) of logits [M, V], with its log-sum-exp [M, 1], the safe target [M, 1]
    (0 where ignored) and which rows count [M]."""
    keep = targets != ignore_index
    safe = torch.where(keep, targets, 0).unsqueeze(1)  # [M, 1]
    top = logits.amax(dim=-1, keepdim=True)  # [M, 1]
    total = torch.sub(logits, top).clamp_(min=EXP_FLOOR).exp_().sum(dim=-1, keepdim=True)
    lse = top.add_(total.log_())  # [M, 1]
    return torch.where(keep, (lse - logits.gather(1, safe)).squeeze(1), 0.0), lse, safe, keep


def torch_rows(logits: Tensor, targets: Tensor, ignore_index: int, grad: bool) -> Tensor:
    """`RowsFn` in torch ops, fp32 inside (the oracle of the backends' row kernels, and the CPU's)."""
    wide = logits.float()
    losses, lse, safe, keep = _row_losses(wide, targets, ignore_index)
    if grad:
        probs = wide.sub_(lse).clamp_(min=EXP_FLOOR).exp_().scatter_add_(
            1, safe, torch.full_like(lse, -1.0)).mul_(keep.unsqueeze(1))
        logits.copy_(probs)
    return losses


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """sum CE(x [M, K] @ weight [V, K]^T in `dtype`, targets [M]) a block of `chunk` rows at a time, each block's
    logits turned into their gradient by `rows` (see the module docstring). The gradients are computed forward
    (fp32 for the weight's, summed over the blocks) and scaled by the output's gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, dtype: torch.dtype,
                chunk: int, rows: RowsFn, recorded: bool) -> Tensor:
        # (`needs_input_grad` says what requires a gradient even under no_grad, where nothing will ask for one)
        want_x, want_w = recorded and ctx.needs_input_grad[0], recorded and ctx.needs_input_grad[1]
        grads = want_x or want_w
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        gx = torch.empty_like(x) if want_x else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, x.shape[0], chunk):
                xs = x[start:start + chunk].to(dtype)  # [m, K]
                logits = xs @ w.t()  # [m, V]
                total += rows(logits, targets[start:start + chunk], ignore_index, grads).sum()
                if want_x:
                    gx[start:start + chunk] = logits @ w
                if want_w:
                    add_product(gw, logits.t(), xs)  # [V, K]
        ctx.save_for_backward(gx, gw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        gx, gw = ctx.saved_tensors
        dx = gx * g.to(gx.dtype) if gx is not None else None
        dw = (gw * g).to(ctx.weight_dtype) if gw is not None else None
        return dx, dw, None, None, None, None, None, None


def add_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b: in the GEMM's own accumulation (its epilogue reads acc) for fp32 operands, and for 16-bit
    ones where torch's addmm takes an fp32 `out_dtype` (CUDA, `_adds_in_fp32`); elsewhere a product in the
    operands' dtype, then added."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _adds_in_fp32(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


_ADDS_IN_FP32: dict[tuple[torch.device, torch.dtype], bool] = {}


def _adds_in_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's addmm with an fp32 `out_dtype` runs here on `dtype` operands, in place, and agrees with the
    fp32 sum of their fp32 product: probed once per (device, dtype) on a small product (CUDA only; torch registers
    it nowhere else)."""
    key = (device, dtype)
    if key not in _ADDS_IN_FP32:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device=device).manual_seed(0)
                a = torch.randn(64, 96, device=device, generator=g).to(dtype)
                b = torch.randn(96, 32, device=device, generator=g).to(dtype)
                acc = torch.randn(64, 32, device=device, generator=g)
                want = acc + a.float() @ b.float()
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                ok = bool(torch.allclose(acc, want, rtol=1e-5, atol=1e-4))
            except (RuntimeError, TypeError):
                ok = False
        _ADDS_IN_FP32[key] = ok
    return _ADDS_IN_FP32[key]


def chunked_head_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, rows: RowsFn,
                               chunk: int | None = None) -> Tensor:
    """`ChunkedHeadCrossEntropy` over x [..., K] and targets [...], in the dtype `compute_dtype` picks, blocks of
    `chunk` rows (default: `CHUNK_BYTES` of logits)."""
    dtype = compute_dtype(x, weight)
    if chunk is None:
        chunk = max(1, CHUNK_BYTES // (weight.shape[0] * dtype.itemsize))
    return ChunkedHeadCrossEntropy.apply(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1), ignore_index,
                                         dtype, chunk, rows, torch.is_grad_enabled())
