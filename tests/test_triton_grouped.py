"""A training step's routed experts on torch's grouped GEMM (`dsv4/kernels/triton/grouped.py`) against the
reference's expert-by-expert loop: the routed sum and every gradient (x, routing weights, experts' weights), in
fp32 and under bf16 autocast; the triton backend taking that path in a model's training step, without reading the
device; and the fallback where torch's grouped GEMM fails."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from host_reads import count_host_reads

from dsv4 import kernels
from dsv4.config import preset
from dsv4.kernels.experts import ExpertWeights
from dsv4.kernels.reference import ReferenceBackend
from dsv4.model import Transformer, init_weights

pytest.importorskip("triton", reason="the Triton backend's tests need the triton package (the dev extra installs it)")

from dsv4.kernels.triton import TritonBackend, grouped  # noqa: E402

REF = ReferenceBackend()
LIMIT = 0.5  # (small enough that the clamps bite on these weights)


def _case(seed: int, n_experts: int = 6, d: int = 64, inter: int = 32, tokens: int = 37, k: int = 2):
    """Float experts that want gradients, x, routing weights and ids; the last expert is chosen by no token."""
    g = torch.Generator().manual_seed(seed)

    def weight(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).requires_grad_()

    table = [ExpertWeights(weight(inter, d), None, weight(inter, d), None, weight(d, inter), None)
             for _ in range(n_experts)]
    x = torch.randn(tokens, d, generator=g).requires_grad_()
    weights = torch.rand(tokens, k, generator=g).requires_grad_()
    ids = torch.stack([torch.randperm(n_experts - 1, generator=g)[:k] for _ in range(tokens)])
    return table, x, weights, ids


def _grads(out: torch.Tensor, table, x, weights, seed: int) -> list[torch.Tensor]:
    """Every input's gradient of <out, fixed random>, zeros where the input took no part."""
    inputs = [x, weights, *(t for w in table for t in (w.w1, w.w3, w.w2))]
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    grads = torch.autograd.grad(out, inputs, probe, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("seed,k", [(0, 2), (1, 6)])
def test_fp32_equals_the_reference_loop(seed, k):
    table, x, weights, ids = _case(seed, n_experts=8, k=k)
    assert grouped.covers(x, table)
    out = grouped.routed_experts(x, weights, ids, table, LIMIT)
    expected = REF.routed_experts(x, weights, ids, table, None, LIMIT)
    assert out.dtype == torch.float32
    assert _relative(out, expected) < 1e-6
    fast = _grads(out, table, x, weights, seed)
    for got, want in zip(fast, _grads(expected, table, x, weights, seed), strict=True):
        assert _relative(got, want) < 1e-5
    # the expert no token chose: a zero gradient here (it joins the graph), none from the reference's loop
    assert not fast[-1].any()


def test_bf16_autocast_equals_the_reference_under_autocast():
    """Under autocast the GEMMs run in bf16 as `F.linear`'s would: the same routed sum (each GEMM output rounded
    to bf16 alike), gradients within bf16 rounding."""
    table, x, weights, ids = _case(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grouped.compute_dtype(x, table[0].w1) == torch.bfloat16
        assert grouped.covers(x, table)
        out = grouped.routed_experts(x, weights, ids, table, LIMIT)
        expected = REF.routed_experts(x, weights, ids, table, None, LIMIT)
    assert _relative(out, expected) < 1e-2
    for got, want in zip(_grads(out, table, x, weights, 2), _grads(expected, table, x, weights, 2), strict=True):
        assert _relative(got, want) < 2e-2


def test_covers_only_a_forward_that_wants_gradients_over_float_experts():
    table, x, weights, ids = _case(3)
    with torch.no_grad():
        assert not grouped.covers(x, table)
    frozen = [ExpertWeights(*(t.detach() if t is not None else None for t in (w.w1, w.s1, w.w3, w.s3, w.w2, w.s2)))
              for w in table]
    assert not grouped.covers(x.detach(), frozen)
    assert grouped.covers(x.detach(), table)  # the experts' weights alone want gradients
    assert grouped.covers(x, frozen)
    scaled = [ExpertWeights(w.w1, torch.ones(1), w.w3, torch.ones(1), w.w2, torch.ones(1)) for w in table]
    assert not grouped.covers(x, scaled)
    assert not grouped.covers(x[:, :62], [ExpertWeights(w.w1[:, :62], None, w.w3[:, :62], None, w.w2[:62], None)
                                          for w in table])  # (62 fp32 values: not a multiple of 16 bytes)
    assert not grouped.covers(x.double(), table)


def test_the_triton_backend_gives_the_expert_weights_their_gradients_when_x_wants_none():
    """A forward whose activations want no gradient but whose experts do (fine-tuning the experts alone) must not
    reach the kernels, which have no backward: the backend routes it through the grouped GEMM."""
    table, x, weights, ids = _case(4)
    x = x.detach()
    backend = TritonBackend()
    assert backend.routes_on_device(x, table)
    out = backend.routed_experts(x, weights, ids, table, None, LIMIT)
    expected = REF.routed_experts(x, weights, ids, table, None, LIMIT)
    got = torch.autograd.grad(out.sum(), [table[0].w2, weights])
    want = torch.autograd.grad(expected.sum(), [table[0].w2, weights])
    for a, b in zip(got, want, strict=True):
        assert _relative(a, b) < 1e-5
    # with a `which`, too (the kernels' host-scheduled path is not taken either)
    out = backend.routed_experts(x, weights, ids, table, [0, 1, 2, 3, 4], LIMIT)
    assert torch.autograd.grad(out.sum(), table[1].w1)[0].abs().max() > 0


def _tiny_model() -> Transformer:
    args = preset("tiny")
    return init_weights(Transformer(args, dtype=torch.float32), seed=0).train()


def _training_step(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_training_step_on_the_triton_backend_equals_the_references(monkeypatch):
    """The MoE layers of a training step take the grouped path (no read of the device in them: the reference reads
    it once per expert), the loss is the reference backend's to fp32 rounding, and every gradient is as close to
    the reference's in fp64 as the reference's in fp32 is, within a factor of 16 (floor 2e-6, relative to the
    largest entry): a few gradients (the hc head's scales) are so ill-conditioned that fp32 rounding anywhere
    upstream moves them by 1e-3 to 1e-1, the reference's own fp32 gradients included."""
    model = _tiny_model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with kernels.use_backend("reference"):
        loss, grads = _training_step(model, tokens)
    calls = []
    original = grouped.routed_experts
    monkeypatch.setattr(grouped, "routed_experts", lambda *a: calls.append(1) or original(*a))
    assert grouped.works(tokens.device, torch.float32)  # (its probe reads the device, once)
    with kernels.use_backend("reference"), count_host_reads() as reads:
        _training_step(model, tokens)
    assert [site for site in reads if "experts.py" in site or "reference.py" in site]  # (what is counted)
    with kernels.use_backend("triton"), count_host_reads() as reads:
        fast_loss, fast_grads = _training_step(model, tokens)
    assert len(calls) == model.args.n_layers
    assert not [site for site in reads if any(f in site for f in ("moe.py", "experts.py", "reference.py",
                                                                   "grouped.py"))], reads
    assert abs(float(fast_loss - loss)) <= 1e-5 * abs(float(loss))
    with kernels.use_backend("reference"):
        _, exact = _training_step(copy.deepcopy(model).double(), tokens)
    for name, grad in grads.items():  # (the grouped path's unchosen experts: zero gradients, the reference's none)
        assert _relative(fast_grads[name], exact[name]) <= 16 * max(_relative(grad, exact[name]), 2e-6), name


def test_a_failing_grouped_gemm_warns_and_the_reference_runs(monkeypatch, caplog):
    table, x, weights, ids = _case(5)
    grouped.works.cache_clear()

    def broken(*args, **kwargs):
        raise RuntimeError("grouped GEMM not built for this device")

    monkeypatch.setattr(torch, "_grouped_mm", broken)
    try:
        with caplog.at_level(logging.WARNING, logger=grouped.__name__):
            assert not grouped.covers(x, table)
            assert not grouped.covers(x, table)  # (checked once)
        assert len([r for r in caplog.records if "_grouped_mm unavailable" in r.getMessage()]) == 1
        backend = TritonBackend()
        assert not backend.routes_on_device(x, table)
        out = backend.routed_experts(x, weights, ids, table, None, LIMIT)  # the reference's loop
        assert torch.equal(out, REF.routed_experts(x, weights, ids, table, None, LIMIT))
    finally:
        grouped.works.cache_clear()


def test_a_grouped_gemm_that_disagrees_is_not_used(monkeypatch):
    table, x, _, _ = _case(6)
    grouped.works.cache_clear()
    original = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: original(a, b, offs=offs) * 1.01)
    try:
        assert not grouped.covers(x, table)
    finally:
        grouped.works.cache_clear()
