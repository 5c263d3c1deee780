"""The head's summed cross-entropy (`kernels.head_cross_entropy`, `Transformer.head_loss`): what training computes
of the vocabulary head instead of its logits.

* The chunked form (`dsv4/kernels/cross_entropy.py`: the GEMM, the loss and its gradients a block of rows at a
  time, the gradients computed forward and scaled by the output's gradient backward), over the torch row function
  the CPU backend uses, against the reference backend (all the logits, then the loss) and an fp64 oracle: in fp32
  and under bf16 autocast, blocks of one row, of a few and of all, ignored rows, gradients of x or of the weight
  alone, no gradient at all, no rows.
* The model's `head_loss` / `mtp_head_loss` equal the summed cross-entropy of its `logits` / `mtp_logits`, with
  every parameter's gradient, and a head the model does not own as a plain projection (a recipe's replaced
  forward) is asked for its logits.

The triton backend's row kernel: `tests/test_triton_head_loss.py`.
"""

from __future__ import annotations

import pytest
import torch
from head_loss_checks import REF, assert_matches_the_reference, oracle, problem

from dsv4 import kernels
from dsv4.config import preset
from dsv4.kernels.cpu import CpuBackend
from dsv4.kernels.cross_entropy import IGNORE_INDEX, chunked_head_cross_entropy, torch_rows
from dsv4.model import Transformer, init_weights


def _chunked(chunk):
    return lambda x, w, t: chunked_head_cross_entropy(x, w, t, IGNORE_INDEX, torch_rows, chunk)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("chunk", [1, 7, None], ids=["row_blocks", "odd_blocks", "one_block"])
def test_the_chunked_loss_is_the_references(chunk, autocast):
    x, weight, targets = problem(40, 24, 300)
    assert_matches_the_reference(_chunked(chunk), x, weight, targets, autocast)


def test_the_cpu_backend_chunks_the_head_loss(monkeypatch):
    """The CPU backend runs the chunked form (its blocks by `CHUNK_BYTES`: three here) and gives the reference's
    loss; fp64 stays the reference's (gradcheck's dtype)."""
    from dsv4.kernels import cross_entropy

    blocks = []
    original = cross_entropy.ChunkedHeadCrossEntropy.apply
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 300 * 4 * 14)
    monkeypatch.setattr(cross_entropy.ChunkedHeadCrossEntropy, "apply",
                        lambda *a: blocks.append(a[5]) or original(*a))
    x, weight, targets = problem(40, 24, 300)
    assert_matches_the_reference(CpuBackend().head_cross_entropy, x, weight, targets, False)
    assert blocks == [14]
    loss = CpuBackend().head_cross_entropy(x.double(), weight.double(), targets)
    assert blocks == [14] and loss.dtype == torch.float64


@pytest.mark.parametrize("wanted", ["x", "weight", "none"])
def test_only_the_wanted_gradients(wanted):
    """A gradient of x alone, of the weight alone, or none (evaluation: the loss only, the same value)."""
    x, weight, targets = problem(12, 16, 50)
    want_loss, want_dx, want_dw = oracle(x, weight, targets, False, scale=1.0)
    x = x.clone().requires_grad_(wanted == "x")
    weight = weight.clone().requires_grad_(wanted == "weight")
    loss = _chunked(5)(x, weight, targets)
    assert abs(loss.item() - float(want_loss)) < 1e-5 * float(want_loss)
    if wanted == "none":
        assert not loss.requires_grad
        return
    loss.backward()
    got, want = (x.grad, want_dx) if wanted == "x" else (weight.grad, want_dw)
    assert float((got.double() - want).abs().max()) < 1e-5 * float(want.abs().max())
    assert (weight.grad if wanted == "x" else x.grad) is None


def test_evaluation_computes_no_gradients(monkeypatch):
    """Under no_grad (evaluation) with parameters that require gradients, the blocks' rows are asked for the loss
    alone and no gradient GEMM runs."""
    from dsv4.kernels import cross_entropy

    asked, products = [], []
    monkeypatch.setattr(cross_entropy, "add_product", lambda *a: products.append(1))
    x, weight, targets = problem(12, 16, 50)
    rows = lambda *a: asked.append(a[3]) or torch_rows(*a)  # noqa: E731
    weight.requires_grad_()
    with torch.no_grad():
        loss = chunked_head_cross_entropy(x.requires_grad_(), weight, targets, IGNORE_INDEX, rows, 5)
    assert asked == [False] * 3 and not products and not loss.requires_grad
    loss = chunked_head_cross_entropy(x, weight, targets, IGNORE_INDEX, rows, 5)
    assert asked[3:] == [True] * 3 and len(products) == 3 and loss.requires_grad


def test_no_rows_and_no_targets():
    """No rows: a zero loss and zero gradients; every target ignored: the same, whatever the logits."""
    x, weight, _ = problem(6, 8, 20)
    for rows, targets in ((x[:0], torch.zeros(0, dtype=torch.long)), (x, torch.full((6,), IGNORE_INDEX))):
        xs, w = rows.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = _chunked(4)(xs, w, targets)
        loss.backward()
        assert loss.item() == 0.0 and not xs.grad.any() and not w.grad.any()
        assert w.grad.shape == w.shape and xs.grad.shape == xs.shape


def _model():
    args = preset("tiny")
    return init_weights(Transformer(args, dtype=torch.float32), seed=0).train(), args


def _parameter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_the_models_head_loss_is_the_cross_entropy_of_its_logits(backend):
    """head_loss and mtp_head_loss against the summed cross-entropy of logits / mtp_logits on the same backend:
    the losses to fp32 rounding, and every parameter's gradient (the trunk's through the head input, the head's,
    the MTP block's) to 1e-3 of its largest plus 1e-5 of the largest of all: some, the mHC scales', are sums that
    cancel far below their terms, where fp32 rounding shows at 1e-3 of the sum; a wrong scale or row would be off
    by its whole size."""
    model, args = _model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=g)
    targets = torch.randint(0, args.vocab_size, (2, 9), generator=g)
    targets[0, :3] = IGNORE_INDEX

    def losses(fused: bool):
        model.zero_grad(set_to_none=True)
        streams = model.forward_streams(tokens)
        if fused:
            ce = model.head_loss(streams, targets)
            mtp = model.mtp_head_loss(streams[:, :-1], tokens[:, 1:], targets[:, 1:])
        else:
            ce = kernels.summed_cross_entropy(model.logits(streams), targets)
            mtp = kernels.summed_cross_entropy(model.mtp_logits(streams[:, :-1], tokens[:, 1:]), targets[:, 1:])
        (ce + 0.3 * mtp).backward()
        return ce.detach(), mtp.detach(), _parameter_grads(model)

    with kernels.use_backend(backend):  # (the trunk's ops the backend's both times: only the head's loss differs)
        want, got = losses(False), losses(True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)
    assert got[2].keys() == want[2].keys() and "head.weight" in got[2] and "mtp.0.hc_head_fn" in got[2]
    largest = max(float(grad.abs().max()) for grad in want[2].values())
    for name, grad in want[2].items():
        assert float((got[2][name] - grad).abs().max()) <= 1e-3 * float(grad.abs().max()) + 1e-5 * largest, name


def test_a_head_the_model_does_not_own_computes_its_logits():
    """A head whose forward a training recipe replaced is not a plain projection: head_loss asks it for the
    logits (and the greedy token too), so what it computes is what the loss sees."""
    model, args = _model()
    calls = []
    plain = type(model.head).forward
    model.head.forward = lambda x: calls.append(x.shape) or plain(model.head, x) * 2.0
    tokens = torch.randint(0, args.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), kernels.use_backend("cpu"):
        streams = model.forward_streams(tokens)
        loss = model.head_loss(streams, tokens)
        want = kernels.summed_cross_entropy(model.logits(streams), tokens)
        plain_loss = REF.head_cross_entropy(model.head_input(streams), model.head.weight, tokens)
    assert len(calls) == 2 and float(loss) == float(want)
    assert float(plain_loss) != float(loss)
