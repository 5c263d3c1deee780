"""Checks shared by the head cross-entropy tests (`test_head_loss.py`, `test_triton_head_loss.py`): a backend's
`head_cross_entropy` against the reference backend's (the head's logits in full, then the summed cross-entropy)
and against an fp64 oracle."""

from __future__ import annotations

import torch

from dsv4.kernels.cross_entropy import IGNORE_INDEX
from dsv4.kernels.reference import ReferenceBackend

REF = ReferenceBackend()


def problem(rows: int, k: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [rows, k], weight [vocab, k] with logits spread over some tens, targets with every fifth row ignored and
    some targets the least likely token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    weight = torch.randn(vocab, k, generator=g) * (4.0 / k**0.5)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::5] = IGNORE_INDEX
    targets[1::7] = (x @ weight.t()).argmin(dim=-1)[1::7]
    return x, weight, targets


def run(fn, x, weight, targets, autocast: bool, scale: float = 0.7, device: str = "cpu"):
    """(loss, dx, dw) of fn(x, weight, targets) * scale, backward, on `device` (under bf16 autocast or not)."""
    leaves = [x.clone().to(device).requires_grad_(), weight.clone().to(device).requires_grad_()]
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = fn(leaves[0], leaves[1], targets.to(device))
    (loss * scale).backward()
    return loss.detach().cpu(), leaves[0].grad.cpu(), leaves[1].grad.cpu()


def oracle(x, weight, targets, autocast: bool, scale: float = 0.7):
    """fp64 (loss, dx, dw) from the logits the head's GEMM writes (bf16 ones under autocast)."""
    if autocast:
        xb, wb = x.bfloat16(), weight.bfloat16()
        logits, x64, w64 = (xb @ wb.t()).double(), xb.double(), wb.double()
    else:
        x64, w64 = x.double(), weight.double()
        logits = x64 @ w64.t()
    keep = targets != IGNORE_INDEX
    safe = torch.where(keep, targets, 0)
    lse = logits.logsumexp(dim=-1)
    loss = torch.where(keep, lse - logits.gather(1, safe[:, None])[:, 0], 0.0).sum()
    grad = (logits - lse[:, None]).exp()
    grad[torch.arange(len(safe)), safe] -= 1.0
    grad = grad * keep[:, None] * scale
    return loss, grad @ w64, grad.t() @ x64


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference, relative to the oracle's largest magnitude."""
    return float((got.double() - want).abs().max() / want.abs().max())


def assert_matches_the_reference(fn, x, weight, targets, autocast: bool, device: str = "cpu") -> None:
    """fp32: the reference's loss and gradients to fp32 rounding. bf16 autocast: no further from the fp64 oracle
    than twice the reference's own distance (both round the logits' gradient and the GEMMs' outputs to bf16; the
    reference rounds it times the output's gradient, these before it)."""
    got = run(fn, x, weight, targets, autocast, device=device)
    ref = run(REF.head_cross_entropy, x, weight, targets, autocast)
    want = oracle(x, weight, targets, autocast)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert got[1].dtype == x.dtype and got[2].dtype == weight.dtype
    for ours, theirs, exact in zip(got, ref, want, strict=True):
        if autocast:
            assert error(ours, exact) <= 2 * error(theirs, exact) + 1e-6, (error(ours, exact), error(theirs, exact))
        else:
            assert error(ours, exact) < 2e-6 and error(theirs, exact) < 2e-6
    assert not got[1][targets == IGNORE_INDEX].any()  # an ignored row gets no gradient
