"""The backward of the Triton mHC stream kernels (`dsv4/kernels/triton/mhc_grad.py`: `hc_post` and `hc_collapse`
as autograd Functions, what a training step runs on the triton backend) against autograd through the reference.

The forward is the forward kernel's (bit for bit the reference's). The gradients are sums over at most h terms
(the streams' and the inputs' gradients) or over the columns (the coefficients'), in the kernel's order, so they are
held to fp32 rounding: 1e-6 of the largest gradient, on the interpreter's tiling (whole rows of many tokens) and a
GPU's (one token a program, 256 columns a chunk, a partial last chunk).

On a machine without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py)
on CPU tensors; with one, on CUDA tensors against the reference on CPU copies.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from dsv4.kernels.reference import ReferenceBackend  # noqa: E402
from dsv4.kernels.triton import TritonBackend, mhc_grad  # noqa: E402

REF = ReferenceBackend()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=[False, True], ids=["interpreter_tiles", "gpu_tiles"])
def gpu_tiles(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(mhc_grad, "interpreting", lambda: False)
    return request.param


def _both(fn_fast, fn_ref, inputs, seed: int):
    """(outputs, gradients) of each function on copies of `inputs` that want gradients, for one random output
    gradient in the output's dtype."""
    results = []
    for fn, device in ((fn_fast, DEVICE), (fn_ref, "cpu")):
        leaves = [t.clone().to(device).requires_grad_() for t in inputs]
        y = fn(*leaves)
        probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
        results.append((y.detach().cpu(), [g.cpu() for g in torch.autograd.grad(y, leaves, probe.to(device))]))
    return results


def _close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, name
    scale = want.float().abs().max().clamp_min(1e-30)
    if want.dtype == torch.float32:
        assert float((got - want).abs().max() / scale) < 1e-6, name
    else:  # rounded once from fp32 sums: one step of the dtype apart at most
        step = torch.exp2(torch.floor(torch.log2(want.float().abs().clamp_min(2.0**-126))) - 7)
        assert bool(((got.float() - want.float()).abs() <= step).all()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lead", "h", "d"), [((2, 3), 4, 300), ((1, 5), 3, 40), ((3, 1), 2, 64)])
def test_hc_post_gradients_equal_the_references(dtype, lead, h, d, gpu_tiles):
    g = torch.Generator().manual_seed(d)
    out, x = torch.randn(*lead, d, generator=g).to(dtype), torch.randn(*lead, h, d, generator=g).to(dtype)
    post, comb = torch.rand(*lead, h, generator=g) * 2, torch.rand(*lead, h, h, generator=g)
    (y, grads), (y_ref, grads_ref) = _both(mhc_grad.hc_post, REF.hc_post, (out, x, post, comb), seed=1)
    assert torch.equal(y, y_ref)
    for name, a, b in zip(("out", "x", "post", "comb"), grads, grads_ref, strict=True):
        _close(a, b, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lead", "h", "d"), [((2, 3), 4, 300), ((1, 5), 3, 40)])
def test_hc_collapse_gradients_equal_the_references(dtype, lead, h, d, gpu_tiles):
    g = torch.Generator().manual_seed(d + 1)
    x, pre = torch.randn(*lead, h, d, generator=g).to(dtype), torch.rand(*lead, h, generator=g)
    (u, grads), (u_ref, grads_ref) = _both(mhc_grad.hc_collapse, REF.hc_collapse, (x, pre), seed=2)
    assert torch.equal(u, u_ref)
    for name, a, b in zip(("x", "pre"), grads, grads_ref, strict=True):
        _close(a, b, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lead", "h", "d"), [((2, 3), 4, 300), ((3, 1), 3, 40)])
def test_hc_mixes_gradients_equal_the_references(dtype, lead, h, d):
    """The product with the map and the RMS factor in one pass over the streams (the sums in another order than
    torch's matmul and mean: fp32 rounding), the streams' gradient as one more (a tile's dot with the map, less the
    RMS term), the map's as one fp32 GEMM."""
    g = torch.Generator().manual_seed(h * d)
    x = torch.randn(*lead, h, d, generator=g).to(dtype)
    fn = torch.randn((2 + h) * h, h * d, generator=g) * 0.02
    (mixes, grads), (mixes_ref, grads_ref) = _both(lambda a, b: mhc_grad.hc_mixes(a, b, 1e-6),
                                                   lambda a, b: REF.hc_mixes(a, b, 1e-6), (x, fn), seed=3)
    assert mixes.dtype == torch.float32 and float((mixes - mixes_ref).abs().max() / mixes_ref.abs().max()) < 1e-6
    for name, a, b in zip(("x", "fn"), grads, grads_ref, strict=True):
        _close(a, b, name)


def test_the_backend_takes_them_in_training(monkeypatch):
    """With gradients wanted the triton backend's `hc_post` and `hc_collapse` (and `hc_pre`, through its collapse)
    run the Functions; without, the forward kernels alone."""
    calls = []
    for name in ("hc_post", "hc_collapse", "hc_mixes"):
        original = getattr(mhc_grad, name)
        monkeypatch.setattr(mhc_grad, name, lambda *a, original=original, name=name: calls.append(name) or original(*a))
    tri = TritonBackend()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, 64, generator=g).to(DEVICE).requires_grad_()
    out, post, comb = (t.to(DEVICE) for t in (torch.randn(1, 3, 64), torch.rand(1, 3, 4), torch.rand(1, 3, 4, 4)))
    fn = (torch.randn(24, 256, generator=g) * 0.02).to(DEVICE)
    scale, base = (torch.rand(3, generator=g) + 0.5).to(DEVICE), torch.randn(24, generator=g).to(DEVICE)
    u, _, _ = tri.hc_pre(x, fn, scale, base, 4, 20, 1e-6, 1e-6)
    y = tri.hc_post(out, x, post, comb)
    assert calls == ["hc_mixes", "hc_collapse", "hc_post"]
    (u.sum() + y.sum()).backward()
    assert x.grad is not None and x.grad.abs().max() > 0
    with torch.no_grad():
        tri.hc_post(out, x, post, comb)
        tri.hc_collapse(x, post)
        tri.hc_mixes(x, fn, 1e-6)
    assert calls == ["hc_mixes", "hc_collapse", "hc_post"]


class _StreamAdds(TorchDispatchMode):
    """Counts the adds of tensors shaped like the streams (autograd summing two gradients of them)."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.shape, self.adds = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("add") and any(
                isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape for t in args):
            self.adds += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("used", ["all", "post_and_comb"])
def test_hc_pre_in_training_adds_the_collapse_gradient_in_the_mixes(dtype, used):
    """`hc_pre` on the backend in a training step (mixes, Sinkhorn and collapse, each one Function): the collapse's
    gradient of the streams is added by the mixes' backward kernel (`PreLink`), so autograd sums no two gradients
    of the streams; the gradients of x, fn, scale and base are the reference's (fp32 rounding through Sinkhorn's
    backward; bf16 streams one step), also where the collapsed output is unused (nothing linked)."""
    g = torch.Generator().manual_seed(7)
    h, d = 4, 96
    x = torch.randn(2, 3, h, d, generator=g).to(dtype)
    fn = torch.randn((2 + h) * h, h * d, generator=g) * 0.05
    scale, base = torch.rand(3, generator=g) + 0.5, torch.randn((2 + h) * h, generator=g) * 0.5
    probes = [torch.randn(2, 3, *shape, generator=g) for shape in ((d,), (h,), (h, h))]
    results = []
    for backend, device in ((TritonBackend(), DEVICE), (REF, "cpu")):
        leaves = [t.clone().to(device).requires_grad_() for t in (x, fn, scale, base)]
        u, post, comb = backend.hc_pre(*leaves[:2], leaves[2], leaves[3], h, 20, 1e-6, 1e-6)
        terms = [(u.float() * probes[0].to(device)).sum()] if used == "all" else []
        loss = sum(terms, (post * probes[1].to(device)).sum() + (comb * probes[2].to(device)).sum())
        counter = _StreamAdds(x.shape)
        with counter:
            grads = torch.autograd.grad(loss, leaves)
        results.append(([t.cpu() for t in grads], counter.adds))
    (grads, adds), (grads_ref, adds_ref) = results
    assert adds == 0 and adds_ref >= (1 if used == "all" else 0)
    for name, a, b in zip(("x", "fn", "scale", "base"), grads, grads_ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale_ = float(b.float().abs().max())
        tol = 1e-5 if dtype == torch.float32 or name != "x" else 2.0**-7
        assert float((a.float() - b.float()).abs().max()) <= tol * scale_ + 1e-6 * scale_, name


def test_what_the_backward_covers():
    x, pre = torch.randn(2, 4, 64).requires_grad_(), torch.rand(2, 4)
    fn = torch.randn(24, 256)
    assert mhc_grad.covers_mixes(x, fn) and mhc_grad.covers_mixes(x.detach(), fn.requires_grad_())
    assert not mhc_grad.covers_mixes(x.detach(), fn.detach())  # (inference: the reference's matmul)
    with torch.no_grad():
        assert not mhc_grad.covers_mixes(x, fn)
    assert not mhc_grad.covers_mixes(x, fn[:, :128]) and not mhc_grad.covers_mixes(x, fn.double())
    assert not mhc_grad.covers_mixes(x.transpose(-1, -2), torch.randn(24, 256))  # (rows not [T, h*d])
    assert not mhc_grad.covers_mixes(x, torch.randn(80, 256))  # more mixes than a tile's dot takes
    out, post, comb = torch.randn(2, 64), torch.rand(2, 4), torch.rand(2, 4, 4)
    assert mhc_grad.covers_collapse(x, pre) and mhc_grad.covers_post(out, x, post, comb)
    assert not mhc_grad.covers_collapse(x.double(), pre)
    assert not mhc_grad.covers_collapse(x, pre.bfloat16())
    assert not mhc_grad.covers_post(out, x, post.double(), comb)
    assert not mhc_grad.covers_post(out[:, :32], x, post, comb)
    assert not mhc_grad.covers_post(out, torch.randn(2, 20, 64), torch.rand(2, 20), torch.rand(2, 20, 20))  # h > 16
