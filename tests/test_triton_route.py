"""The Triton MoE routing (`dsv4/kernels/triton/route.py`, the tail of `moe_gate` after torch's product with the gate
weight) against the reference: the same experts in the same order, the same scores (V4's sqrt(softplus), which the
kernel computes, to fp32 rounding under the interpreter), the weights bit for bit where the scores are torch's and
torch's CPU sum adds the k picks in order (k = 2, 3) and to fp32 rounding otherwise (k = 6); a hash layer's given
ids kept.

On a machine without a GPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py)
on CPU tensors; with one, on CUDA tensors against the reference on CPU copies.
"""

from __future__ import annotations

import pytest
import torch
from test_triton_rows import _on

pytest.importorskip("triton")

from dsv4.kernels.reference import ReferenceBackend  # noqa: E402
from dsv4.kernels.triton import TritonBackend, route  # noqa: E402

REF, TRI = ReferenceBackend(), TritonBackend()


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize(("tokens", "experts", "k"), [(40, 16, 2), (1, 16, 2), (37, 256, 6), (5, 20, 3)])
def test_the_router_picks_the_references_experts(score_func, tokens, experts, k):
    gen = torch.Generator().manual_seed(tokens + experts)
    x = torch.randn(tokens, 256, generator=gen)
    weight, bias = torch.randn(experts, 256, generator=gen) * 0.05, torch.randn(experts, generator=gen) * 0.1
    hashed = torch.randint(0, experts, (tokens, k), generator=gen)
    for ids, b in ((None, bias), (hashed, None)):
        got = [t.cpu() for t in TRI.moe_gate(_on(x), _on(weight), _on(b), _on(ids), score_func, k, 1.5)]
        want = REF.moe_gate(x, weight, b, ids, score_func, k, 1.5)
        assert got[1].dtype == torch.int64 and torch.equal(got[1], want[1])
        if score_func == "sqrtsoftplus":  # (made in the kernel: libdevice's functions on a GPU, numpy's here)
            torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=0.0)
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
            continue
        assert torch.equal(got[2], want[2])
        if k in (2, 3) or score_func == "softmax":
            assert torch.equal(got[0], want[0])
        else:
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)


def test_the_kernels_sqrt_softplus_is_torchs_across_its_range():
    """Logits from -110 (exp underflows: a score of 0) through the threshold of 20 (above it softplus is the logit
    itself) to 1e4, and the small ones where log1p differs from log(1 + x): within two fp32 steps of torch's. (Below
    a logit of about -87 exp(z) is subnormal: torch's CPU exp flushes it to 0, numpy's keeps it, a score < 1e-22.)"""
    logits = torch.cat((torch.linspace(-110, 30, 4001), torch.tensor([19.999998, 20.0, 20.000002, 1e4, -1e-3, 0.0]),
                        -torch.logspace(-8, 1.5, 200))).view(1, -1)
    bias = torch.zeros(logits.shape[1])
    weights, ids, scores = route.route_sqrt_softplus(_on(logits), _on(bias), None, 4, 1.0)
    want = torch.nn.functional.softplus(logits).sqrt()
    torch.testing.assert_close(scores.cpu(), want, rtol=2.5e-7, atol=1e-22)
    assert scores.cpu()[0, 0] == 0.0 and scores.cpu()[0, 4001 + 3] == want[0, 4001 + 3] == 100.0
    assert torch.equal(ids.cpu(), want.topk(4).indices)


def test_ties_go_to_the_earlier_expert_and_nan_ranks_first():
    scores = torch.tensor([[0.5, 0.5, 0.1, 0.5], [0.1, float("nan"), 0.5, 0.5], [0.2, 0.3, 0.3, 0.9]])
    weights, ids = route.route(_on(scores), _on(torch.zeros(4)), None, 3, True, 1.0)
    assert ids.cpu().tolist() == [[0, 1, 3], [1, 2, 3], [3, 1, 2]]
    torch.testing.assert_close(weights.cpu()[2], torch.tensor([0.9, 0.3, 0.3]) / 1.5)


def test_what_the_router_kernel_covers():
    bias, given = torch.rand(16), torch.zeros(3, 2, dtype=torch.long)
    assert route.covers(3, 16, bias, None, 2) and route.covers(3, 16, None, given, 2)
    assert not route.covers(3, 16, None, None, 2)  # neither a bias to rank by nor given ids
    assert not route.covers(3, 16, bias.double(), None, 2) and not route.covers(3, 16, torch.rand(8), None, 2)
    assert not route.covers(3, 16, bias, None, 17) and not route.covers(3, 16, bias, None, 0)
    assert not route.covers(3, 16, None, torch.zeros(3, 3, dtype=torch.long), 2)
    assert not route.covers(3, 16, bias.requires_grad_(), None, 2)
    x, weight = torch.randn(3, 8, requires_grad=True), torch.randn(16, 8)
    weights, ids, scores = TRI.moe_gate(x, weight, torch.rand(16), None, "sigmoid", 2, 1.0)
    assert scores.requires_grad and weights.requires_grad  # (training: the reference's differentiable router)



def test_under_autocast_the_router_is_the_references():
    """Under autocast torch's scores come in bf16 (the gate's linear runs in autocast's dtype), which the kernel does
    not rank: an evaluation under `dsv4 train --autocast bf16` routes as the reference does, without an error."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(6, 64, generator=gen), torch.randn(16, 64, generator=gen) * 0.05
    bias = torch.rand(16, generator=gen)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
        got = TRI.moe_gate(_on(x), _on(weight), _on(bias), None, "sqrtsoftplus", 2, 1.5)
        want = REF.moe_gate(x, weight, bias, None, "sqrtsoftplus", 2, 1.5)
    assert want[2].dtype == torch.bfloat16
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.cpu(), b)
