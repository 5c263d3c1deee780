"""`sparse_attn` differentiable on the triton backend (`dsv4/kernels/triton/attention_grad.py`: the forward kernel
keeping each head's log-sum-exp, one backward launch with atomic adds into the rows' gradient), what a training
step's attention runs, against autograd through the reference.

fp32 (a training forward's rows): the output and the gradients of q, both runs and the sink to fp32 rounding of the
largest (1e-5), with and without the output's rotation, unused slots, a query with none (the sink alone), a row
named twice by one query, one run or two, and head dims taking each slot-block width. 16-bit rows: no further from
the fp64 reference than twice the fp32-computing reference (the kernel's probabilities are not rounded to the rows'
dtype before the value product's gradient, the reference's are), the sink's gradient three times (the kernel takes
``dO . O`` from the output as stored, rounded to bf16; about twice the reference's distance).

On a machine without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py)
on CPU tensors; with one, on CUDA tensors against the reference on CPU copies.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4 import kernels  # noqa: E402
from dsv4.kernels.paged import PagedRows  # noqa: E402
from dsv4.kernels.reference import ReferenceBackend  # noqa: E402
from dsv4.kernels.triton import TritonBackend, attention_grad  # noqa: E402

REF = ReferenceBackend()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(b, s, h, d, sizes, k, seed=0, dtype=torch.float32, half=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g).to(dtype)
    runs = [torch.randn(b, n, d, generator=g).to(dtype) for n in sizes]
    idx = torch.randint(-1, sum(sizes), (b, s, k), generator=g)
    idx[0, 0] = -1  # a query with no slot: the sink alone
    idx[-1, -1, :2] = idx[-1, -1, 2]  # one row named three times by one query
    sink = torch.randn(h, generator=g)
    angle = torch.randn(b, s, half, generator=g)
    probe = torch.randn(b, s, h, d, generator=g)
    return q, runs, idx, sink, angle.cos(), angle.sin(), probe


def _grads(fn, q, runs, idx, sink, cos, sin, probe, device, dtype=None):
    """(out, dq, d runs..., dsink) of (fn(...) * probe).sum() on `device` (inputs cast to `dtype` where given)."""
    cast = lambda t: t.detach().clone().to(device, dtype or t.dtype)  # noqa: E731 (fresh leaves each call)
    leaves = [cast(q).requires_grad_()] + [cast(r).requires_grad_() for r in runs] + [cast(sink).requires_grad_()]
    trig = (cos.to(device), sin.to(device)) if cos is not None else (None, None)
    out = fn(leaves[0], leaves[1:-1], idx.to(device), leaves[-1], 0.2, *trig)
    (out * probe.to(device, out.dtype)).sum().backward()
    return [out.detach().cpu()] + [t.grad.cpu() for t in leaves]


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated_back"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 32, (7, 4), 70), (1, 6, 8, 128, (9,), 12), (1, 3, 20, 256, (5, 6), 40),
                                   (1, 2, 4, 512, (4, 3), 20)],
                         ids=["two_runs", "one_run_eight_heads", "wide_rows", "v4_rows"])
def test_gradients_equal_the_references(shape, rotate):
    b, s, h, d, sizes, k = shape
    q, runs, idx, sink, cos, sin, probe = _case(b, s, h, d, sizes, k)
    trig = (cos, sin) if rotate else (None, None)
    got = _grads(attention_grad.sparse_attn, q, runs, idx, sink, *trig, probe, DEVICE)
    want = _grads(REF.sparse_attn, q, runs, idx, sink, *trig, probe, "cpu")
    for name, ours, ref in zip(["out", "dq", *[f"d_run{i}" for i in range(len(runs))], "dsink"], got, want,
                               strict=True):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
        assert float((ours - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), name
    assert not got[1][0, 0].any()  # the query with no slot: output 0, no gradient


def test_16bit_rows_are_as_close_to_fp64_as_the_reference():
    q, runs, idx, sink, cos, sin, probe = _case(2, 4, 3, 64, (6, 5), 20, seed=1, dtype=torch.bfloat16)
    exact = _grads(REF.sparse_attn, q, runs, idx, sink, cos, sin, probe, "cpu", torch.float64)
    ref = _grads(REF.sparse_attn, q, runs, idx, sink, cos, sin, probe, "cpu")
    got = _grads(attention_grad.sparse_attn, q, runs, idx, sink, cos, sin, probe, DEVICE)
    for i, (ours, theirs, truth) in enumerate(zip(got, ref, exact, strict=True)):
        scale = float(truth.abs().max())
        ours_err = float((ours.double() - truth).abs().max()) / scale
        ref_err = float((theirs.double() - truth).abs().max()) / scale
        bound = 3 if i == len(got) - 1 else 2  # (the sink's: from the output as stored, in bf16)
        assert ours_err <= bound * ref_err + 1e-6, (i, ours_err, ref_err)


def test_the_backend_takes_it_in_training_and_leaves_the_rest(monkeypatch):
    """With gradients wanted: dense runs go to the kernels; a paged run (a cache's) stays the reference's."""
    calls = []
    original = attention_grad.sparse_attn
    monkeypatch.setattr(attention_grad, "sparse_attn", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q, runs, idx, sink, cos, sin, probe = _case(1, 3, 2, 32, (5, 4), 10)
    backend = TritonBackend()
    got = _grads(backend.sparse_attn, q, runs, idx, sink, cos, sin, probe, DEVICE)
    assert calls == [1]
    want = _grads(REF.sparse_attn, q, runs, idx, sink, cos, sin, probe, "cpu")
    assert float((got[1] - want[1]).abs().max()) <= 1e-5 * float(want[1].abs().max())
    paged = PagedRows(runs[1].reshape(1, 4, 32).to(DEVICE), torch.tensor([[0]], device=DEVICE), 4, None,
                      torch.float32)
    qd = q.clone().to(DEVICE).requires_grad_()
    backend.sparse_attn(qd, [runs[0].to(DEVICE), paged], idx.to(DEVICE), sink.to(DEVICE), 0.2).sum().backward()
    assert calls == [1] and qd.grad is not None


def test_a_training_step_runs_its_attention_on_the_kernels(monkeypatch):
    """The model's training forward (tiny preset) on the triton backend reaches the training kernels in every
    layer."""
    from dsv4.config import preset
    from dsv4.model import Transformer, init_weights

    calls = []
    original = attention_grad.sparse_attn
    monkeypatch.setattr(attention_grad, "sparse_attn", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    args = preset("tiny")
    model = init_weights(Transformer(args, dtype=torch.float32), seed=0).to(DEVICE).train()
    tokens = torch.randint(0, args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with kernels.use_backend("triton"):
        model.head_loss(model.forward_streams(tokens), tokens).backward()
    assert len(calls) == args.n_layers
    assert model.layers[0].attn.attn_sink.grad is not None and model.layers[0].attn.wkv.weight.grad is not None
