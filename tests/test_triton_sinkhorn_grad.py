"""The Triton Sinkhorn's backward (`sinkhorn.split_sinkhorn_trainable`, what a training step's mHC runs on the triton
backend) against autograd through the reference's op sequence.

The gradients are a different computation's (each normalisation walked back as one expression, where autograd
chains a division's and a sum's backward), so both are held to the same standard: their distance from autograd in
fp64, relative to the largest gradient. The kernel must be as close as the fp32 reference is, within a small
factor, and never further than 2e-6.

On a machine without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py)
on CPU tensors; with one, on CUDA tensors against the reference on CPU copies.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.kernels.reference import ReferenceBackend  # noqa: E402
from dsv4.kernels.triton import TritonBackend, sinkhorn  # noqa: E402

REF = ReferenceBackend()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(lead: tuple, h: int, seed: int, dtype=torch.float32):
    """mixes [*lead, (2+h)*h] (the logits' spread of a trained model's and beyond), scale [3], base [(2+h)*h]."""
    g = torch.Generator().manual_seed(seed)
    width = (2 + h) * h
    mixes = (torch.randn(*lead, width, generator=g) * 3).to(dtype)
    return mixes, torch.rand(3, generator=g) + 0.5, torch.randn(width, generator=g)


def _reference_grads(mixes, scale, base, h, iters, out_grads, dtype):
    """Autograd through the reference in `dtype` (fp32 or fp64)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (mixes, scale, base)]
    outs = REF.hc_split_sinkhorn(*leaves, h, iters, 1e-6)
    return torch.autograd.grad(outs, leaves, [g.to(dtype) for g in out_grads])


def _distance(got: torch.Tensor, exact: torch.Tensor) -> float:
    got, exact = got.detach().cpu().double(), exact.detach().cpu().double()
    return float((got - exact).abs().max() / exact.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize(("lead", "h", "iters"), [((37,), 4, 20), ((2, 5), 4, 20), ((9,), 3, 5), ((4,), 4, 1),
                                                 ((3,), 2, 7), ((600,), 4, 20)])
def test_gradients_are_as_close_to_fp64_as_the_references(lead, h, iters):
    """h = 4 (the model's) at 20 iterations, a padded h = 3, one iteration (the column step alone), h = 2, and more
    tokens than one program takes."""
    mixes, scale, base = _inputs(lead, h, seed=h * 100 + iters)
    leaves = [t.to(DEVICE).requires_grad_() for t in (mixes, scale, base)]
    outs = sinkhorn.split_sinkhorn_trainable(*leaves, h, iters, 1e-6)
    g = torch.Generator().manual_seed(1)
    out_grads = [torch.randn(o.shape, generator=g) for o in outs]
    got = torch.autograd.grad(outs, leaves, [t.to(DEVICE) for t in out_grads])
    fp32 = _reference_grads(mixes, scale, base, h, iters, out_grads, torch.float32)
    fp64 = _reference_grads(mixes, scale, base, h, iters, out_grads, torch.float64)
    for name, a, r32, r64 in zip(("mixes", "scale", "base"), got, fp32, fp64, strict=True):
        assert a.dtype == r32.dtype and a.shape == r32.shape, name
        kernel, reference = _distance(a, r64), _distance(r32, r64)
        assert kernel <= max(4 * reference, 5e-7) and kernel < 2e-6, (name, kernel, reference)
    # the forward is the forward kernel's
    for a, b in zip(outs, sinkhorn.hc_split_sinkhorn(leaves[0].detach(), scale.to(DEVICE), base.to(DEVICE), h,
                                                      iters, 1e-6), strict=True):
        assert torch.equal(a.detach(), b)


def test_bf16_mixes_get_a_bf16_gradient_and_frozen_parameters_none():
    """Under autocast the mixes arrive in bf16: their gradient is bf16 (the reference's), within one bf16 step of
    fp64's; a scale and base that want no gradient get none (and are not computed)."""
    mixes, scale, base = _inputs((11,), 4, seed=5, dtype=torch.bfloat16)
    leaf = mixes.to(DEVICE).requires_grad_()
    outs = sinkhorn.split_sinkhorn_trainable(leaf, scale.to(DEVICE), base.to(DEVICE), 4, 20, 1e-6)
    out_grads = [torch.randn(o.shape, generator=torch.Generator().manual_seed(2)) for o in outs]
    (got,) = torch.autograd.grad(outs, [leaf], [t.to(DEVICE) for t in out_grads])
    exact = _reference_grads(mixes, scale, base, 4, 20, out_grads, torch.float64)[0]
    assert got.dtype == torch.bfloat16
    assert _distance(got, exact) < 2**-8


def test_the_backend_runs_the_kernels_both_ways_in_training(monkeypatch):
    """The triton backend's `hc_split_sinkhorn` (and `hc_pre`, which calls it) with gradients wanted: the kernels'
    Function, and the gradients of the streams, the mixing map, the scales and the bases are the reference's to fp32
    rounding."""
    calls = []
    original = sinkhorn.split_sinkhorn_trainable
    monkeypatch.setattr(sinkhorn, "split_sinkhorn_trainable", lambda *a: calls.append(1) or original(*a))
    tri = TritonBackend()
    g = torch.Generator().manual_seed(3)
    h, d = 4, 64
    x = torch.randn(2, 3, h, d, generator=g)
    fn = torch.randn((2 + h) * h, h * d, generator=g) * 0.02
    scale, base = torch.rand(3, generator=g) + 0.5, torch.randn((2 + h) * h, generator=g) * 0.1
    results = []
    for backend in (tri, REF):
        leaves = [t.clone().to(DEVICE).requires_grad_() for t in (x, fn, scale, base)]
        u, post, comb = backend.hc_pre(*leaves, h, 20, 1e-6, 1e-6)
        loss = (u * torch.linspace(-1, 1, d, device=DEVICE)).sum() + (post * post).sum() + (comb[..., 0, :]).sum()
        results.append(torch.autograd.grad(loss, leaves))
    assert calls == [1]
    for name, a, b in zip(("x", "fn", "scale", "base"), *results, strict=True):
        assert _distance(a, b) < 1e-5, name
    with torch.no_grad():  # inference: the forward kernel alone
        tri.hc_split_sinkhorn(torch.randn(3, 24).to(DEVICE), scale.to(DEVICE), base.to(DEVICE), h, 20, 1e-6)
    assert calls == [1]


def test_what_the_backward_covers():
    mixes, scale, base = _inputs((3,), 4, seed=0)
    wants = mixes.requires_grad_()
    assert not sinkhorn.covers(wants, 4, 20, scale, base)  # (the forward kernel alone: no gradient)
    assert sinkhorn.covers_backward(wants, 4, 20, scale, base)
    assert sinkhorn.covers_backward(mixes.detach(), 4, 20, scale.requires_grad_(), base)
    assert not sinkhorn.covers_backward(wants, 4, 0, scale, base)
    assert not sinkhorn.covers_backward(wants.double(), 4, 20, scale, base)
    assert not sinkhorn.covers_backward(wants, 4, 20, scale.double(), base)
    assert not sinkhorn.covers_backward(torch.randn(2, (2 + 32) * 32), 32, 20, scale, torch.randn(34 * 32))
