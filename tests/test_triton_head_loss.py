"""The head's cross-entropy on the triton backend (`dsv4/kernels/triton/head_loss.py`: the chunked GEMM + loss
with one launch a block turning its logits into their gradient), against the reference backend and an fp64 oracle
(`tests/head_loss_checks.py`): in fp32 to fp32 rounding, under bf16 autocast (the kernel reading and writing bf16
logits) no further from the oracle than twice the reference; over a vocabulary of several of the kernel's tiles
and a partial last one, blocks of one row, of a few and of all, ignored rows and targets at the least likely token.
Then the trainer's path: a model's `head_loss` on the backend, the backend taking the op, and fp64 left to the
reference.

On a machine without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py)
on CPU tensors; with one, on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch
from head_loss_checks import REF, assert_matches_the_reference, oracle, problem

pytest.importorskip("triton")

from dsv4 import kernels  # noqa: E402
from dsv4.config import preset  # noqa: E402
from dsv4.kernels.cross_entropy import IGNORE_INDEX  # noqa: E402
from dsv4.kernels.triton import TritonBackend, head_loss  # noqa: E402
from dsv4.model import Transformer, init_weights  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 128 logits, so a vocabulary of 300 takes three, the last partial (the interpreter's speed)."""
    monkeypatch.setattr(head_loss, "_TILE", 128)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("chunk", [1, 7, None], ids=["row_blocks", "odd_blocks", "one_block"])
def test_the_loss_and_gradients_are_the_references(chunk, autocast, small_tiles):
    x, weight, targets = problem(40, 24, 300)
    assert_matches_the_reference(lambda a, b, t: head_loss.head_cross_entropy(a, b, t, IGNORE_INDEX, chunk),
                                 x, weight, targets, autocast, DEVICE)


def test_logits_far_apart_and_a_lone_tile(small_tiles):
    """A vocabulary inside one tile, logits spread over thousands (most exponentials underflow), the target the
    least likely: the loss in the thousands to fp32 rounding, its gradient the oracle's."""
    x, weight, targets = problem(9, 16, 100, seed=3)
    weight = weight * 300
    loss, dx, dw = (t.cpu() for t in _run(x, weight, targets))
    want = oracle(x, weight, targets, False, scale=1.0)
    assert float(want[0]) > 1000
    assert abs(float(loss) - float(want[0])) <= 1e-6 * float(want[0])
    for got, exact in ((dx, want[1]), (dw, want[2])):
        assert float((got.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())


def _run(x, weight, targets):
    leaves = [x.clone().to(DEVICE).requires_grad_(), weight.clone().to(DEVICE).requires_grad_()]
    loss = head_loss.head_cross_entropy(*leaves, targets.to(DEVICE), IGNORE_INDEX)
    loss.backward()
    return loss.detach(), leaves[0].grad, leaves[1].grad


def test_the_rows_kernel_without_gradients_leaves_the_logits(small_tiles):
    """Evaluation's launch (no gradient): the rows' losses, the logits untouched; ignored rows lose 0."""
    x, weight, targets = problem(10, 8, 200, seed=4)
    logits = (x @ weight.t()).to(DEVICE)
    kept = logits.clone()
    losses = head_loss.rows(logits, targets.to(DEVICE), IGNORE_INDEX, False).cpu()
    want = torch.nn.functional.cross_entropy(kept.cpu(), targets, reduction="none")
    assert torch.equal(logits, kept)
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-5)
    assert not losses[targets == IGNORE_INDEX].any()


def test_the_backend_takes_it_and_leaves_fp64_to_the_reference(monkeypatch, small_tiles):
    calls = []
    original = head_loss.head_cross_entropy
    monkeypatch.setattr(head_loss, "head_cross_entropy", lambda *a: calls.append(a[0].dtype) or original(*a))
    x, weight, targets = problem(6, 8, 50)
    backend = TritonBackend()
    got = backend.head_cross_entropy(x.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE))
    assert calls == [torch.float32]
    torch.testing.assert_close(got.cpu(), REF.head_cross_entropy(x, weight, targets), rtol=1e-6, atol=0)
    exact = backend.head_cross_entropy(x.double().to(DEVICE), weight.double().to(DEVICE), targets.to(DEVICE))
    assert calls == [torch.float32] and exact.dtype == torch.float64


def test_the_models_head_loss_on_the_backend(small_tiles):
    """`Transformer.head_loss` on the triton backend (what `dsv4 train` runs there): the reference backend's loss
    and head gradient, to fp32 rounding."""
    args = preset("tiny")
    model = init_weights(Transformer(args, dtype=torch.float32), seed=0).to(DEVICE).train()
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, args.vocab_size, (2, 6), generator=g).to(DEVICE)
    targets = torch.randint(0, args.vocab_size, (2, 6), generator=g).to(DEVICE)
    with kernels.use_backend("reference"), torch.no_grad():
        streams = model.forward_streams(tokens)  # (one trunk: only the head's loss is compared)
    results = []
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        with kernels.use_backend(backend):
            loss = model.head_loss(streams, targets)
        loss.backward()
        results.append((loss.detach().cpu(), model.head.weight.grad.cpu()))
    (ref_loss, ref_grad), (loss, grad) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert float((grad - ref_grad).abs().max()) <= 1e-5 * float(ref_grad.abs().max())
