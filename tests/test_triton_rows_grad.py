"""`rms_norm` differentiable on the triton backend (`dsv4/kernels/triton/rows_grad.py`: the forward kernel and one
backward launch), what a training step's norms run, against autograd through the reference.

The forward is the forward kernel's (fp32 rounding from the reference's, `tests/test_triton_rows.py`). The
gradients are the closed form over each row (its two sums in the kernel's order) and the weight's a sum over the
rows of per-program partials: held to fp32 rounding (1e-6 of the largest), a bf16 input's gradient to one bf16
step, on the interpreter's tiling (one program) and a GPU's (64 rows a program, a partial last one).

On a machine without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py)
on CPU tensors; with one, on CUDA tensors against the reference on CPU copies.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.kernels.reference import ReferenceBackend  # noqa: E402
from dsv4.kernels.triton import TritonBackend, rows_grad  # noqa: E402

REF = ReferenceBackend()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=[False, True], ids=["interpreter_tiles", "gpu_tiles"])
def gpu_tiles(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(rows_grad, "interpreting", lambda: False)
    return request.param


def _grads(fn, x, w, probe, device):
    leaves = [x.clone().to(device).requires_grad_(), w.clone().to(device).requires_grad_()]
    y = fn(*leaves, 1e-6)
    return y.detach().cpu(), [g.cpu() for g in torch.autograd.grad(y, leaves, probe.to(device))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 300), (130, 64), (1, 4096), (2, 7)])
def test_gradients_equal_the_references(dtype, shape, gpu_tiles):
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = torch.rand(shape[-1], generator=g) + 0.5
    probe = torch.randn(*shape, generator=g).to(dtype)
    y, (dx, dw) = _grads(rows_grad.rms_norm, x, w, probe, DEVICE)
    y_ref, (dx_ref, dw_ref) = _grads(REF.rms_norm, x, w, probe, "cpu")
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    assert float((dw - dw_ref).abs().max() / dw_ref.abs().max()) < 1e-6
    if dtype == torch.float32:
        assert float((dx - dx_ref).abs().max() / dx_ref.abs().max()) < 1e-6
    else:
        step = torch.exp2(torch.floor(torch.log2(dx_ref.float().abs().clamp_min(2.0**-126))) - 7)
        assert bool(((dx.float() - dx_ref.float()).abs() <= step).all())


def test_the_backend_takes_it_in_training(monkeypatch):
    calls = []
    original = rows_grad.rms_norm
    monkeypatch.setattr(rows_grad, "rms_norm", lambda *a: calls.append(1) or original(*a))
    tri = TritonBackend()
    x, w = torch.randn(4, 64).to(DEVICE), (torch.rand(64) + 0.5).to(DEVICE).requires_grad_()
    tri.rms_norm(x, w, 1e-6).sum().backward()
    assert calls == [1] and w.grad is not None
    with torch.no_grad():
        tri.rms_norm(x, w, 1e-6)
    assert calls == [1]


def test_what_it_covers():
    x, w = torch.randn(4, 64).requires_grad_(), torch.rand(64)
    assert rows_grad.covers_rms_norm(x, w)
    assert not rows_grad.covers_rms_norm(x.double(), w)
    assert not rows_grad.covers_rms_norm(x, w.double())
    assert not rows_grad.covers_rms_norm(x, w[:32])
    assert not rows_grad.covers_rms_norm(torch.randn(2, 20000), torch.rand(20000))  # wider than a program's row
