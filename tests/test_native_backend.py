"""The "native" kernel backend (C kernels built at first use) against the reference oracle.

Elementwise ops (the FP8 / FP4 block simulations) and the Hadamard butterflies keep the reference's every rounding,
so they must be equal bit for bit. The GEMM-shaped ops (quantised linears, experts) compute the same quantisation
and two-level block accumulation, but sum a block's products sequentially where BLAS picks its own order, so they
must agree within fp32 rounding (1e-5 of the largest value) in fp32, and within one bf16 step where the output is
bf16; mHC's split and Sinkhorn bit for bit (torch keeps the exponentials), and its whole read of fp32 streams in one
fused pass within 1e-5. At model level: plain fp32 logits within
1e-5, exact-numerics logits within the official-parity tolerance, and identical greedy tokens through the engine
(`test_regression_pins.py` runs its pins on this backend too).
"""

from __future__ import annotations

import collections
import ctypes
import platform

import pytest
import torch
from test_cpu_backend import small_preset_case
from test_long_context import adversarial_scores

from dsv4 import kernels
from dsv4.kernels import cpu as cpu_kernels
from dsv4.kernels import native
from dsv4.kernels.cpu import CpuBackend
from dsv4.kernels.experts import ExpertWeights
from dsv4.kernels.native import build
from dsv4.kernels.reference import ReferenceBackend
from dsv4.quant import quantize_fp4_weight, quantize_fp8_weight

REF = ReferenceBackend()
FAST = native.NativeBackend()


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _awkward(shape, seed=0):
    """Values that probe the rounding rules: wide magnitudes, exact powers of two, zeros, -0.0, FP4 ties, blocks
    under the amax floors."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = _rand(*shape, seed=seed) * torch.exp2(torch.randint(-20, 20, shape, generator=gen).float())
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[1::11] = 2.0 ** torch.randint(-10, 10, flat[1::11].shape, generator=gen).float()
    flat[2::13] = 0.25
    flat[3::17] = -0.0
    x[..., :32] *= 1e-9
    return x


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rel * want.float().abs().max().item(), (err, want.abs().max().item())


# ---------------------------------------------------------------------------------------------- elementwise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [128, 200, 64, 40])
def test_block_simulations_equal_the_reference_bit_for_bit(dtype, k):
    x = _awkward((5, 3, k)).to(dtype)
    for block in (128, 64):
        got, want = FAST.fp8_simulate(x, block), REF.fp8_simulate(x, block)
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    for block in (32, 16):
        got, want = FAST.fp4_simulate(x, block), REF.fp4_simulate(x, block)
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


def test_the_fp4_and_fp8_roundings_hit_every_grid_point_and_tie():
    grid = torch.arange(-6 * 16, 6 * 16 + 1, dtype=torch.float32) / 16  # every e2m1 code and midpoint
    x = torch.cat((grid, torch.full((31,), 6.0))).view(-1, 32)
    assert torch.equal(FAST.fp4_simulate(x), REF.fp4_simulate(x))
    # e4m3: every code's neighbourhood at a scale of 1 (amax 448), subnormals and ties included
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[codes.isfinite()]
    mids = torch.cat((codes, codes * (1 + 2.0**-4), codes * (1 - 2.0**-5), codes.nextafter(codes + 1)))
    x = torch.cat((mids.clamp(-448, 448), torch.tensor([448.0]))).view(1, -1)
    assert torch.equal(FAST.fp8_simulate(x, x.shape[1]), REF.fp8_simulate(x, x.shape[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hadamard_equals_the_reference_bit_for_bit(dtype):
    """Rows shorter than a vector (scalar butterflies) and longer (the first four stages by in-vector shuffles),
    awkward values included (infinities, NaN, -0.0, magnitudes far apart)."""
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 1024):
        x = _rand(3, 2, n, seed=n).to(dtype)
        assert torch.equal(FAST.hadamard(x), REF.hadamard(x)), n
        odd = _awkward((5, n), seed=n).to(dtype)
        odd.view(-1)[:: 11] = float("inf")
        odd.view(-1)[5:: 13] = float("nan")
        got, want = FAST.hadamard(odd), REF.hadamard(odd)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num()), n


def test_sinkhorn_equals_the_reference_bit_for_bit():
    """Bit for bit, not merely close: mHC's coefficients feed the FP8 activations of every sublayer, where a
    last-bit difference grows (a libm-exp version of this kernel missed the official-parity tolerance 16-fold)."""
    h = 4
    # a decode's one token, odd counts (torch's sigmoid rounds a tensor's tail past its last 2 vectors with libm's
    # exp), and more values than one thread's grain
    for seed, lead in enumerate([(1, 1), (1, 3), (2, 9)] + [(3, 17)] * 20 + [(1, 9000)]):
        mixes = _rand(*lead, (2 + h) * h, seed=seed, scale=4.0)
        scale, base = _rand(3, seed=seed + 100).abs() * 3, _rand((2 + h) * h, seed=seed + 200)
        for got, want in zip(FAST.hc_split_sinkhorn(mixes, scale, base, h, 20, 1e-6),
                             REF.hc_split_sinkhorn(mixes, scale, base, h, 20, 1e-6), strict=True):
            assert torch.equal(got, want), (seed, lead)
    comb = FAST.hc_split_sinkhorn(mixes, scale, base, h, 20, 1e-6)[2]
    torch.testing.assert_close(comb.sum(dim=-2), torch.ones(*lead, h), rtol=0, atol=1e-5)  # columns normalised


def test_sinkhorn_gradients_agree_with_the_reference():
    """Training: the forward bit for bit, the C backward's gradients (of mixes, scale and base) within fp32
    rounding of autograd's through the reference's 120 ops."""
    gen = torch.Generator().manual_seed(0)
    inputs = (_rand(2, 37, 24, seed=1, scale=3.0), _rand(3, seed=2).abs() * 2, _rand(24, seed=3))
    weights = [torch.randn(2, 37, 4, generator=gen), torch.randn(2, 37, 4, generator=gen),
               torch.randn(2, 37, 4, 4, generator=gen)]
    results = {}
    for name, backend in (("native", FAST), ("reference", REF)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        outs = backend.hc_split_sinkhorn(*leaves, 4, 20, 1e-6)
        sum((o * w).sum() for o, w in zip(outs, weights, strict=True)).backward()
        results[name] = (outs, [t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(results["native"][0], results["reference"][0], strict=True))
    for got, want in zip(results["native"][1], results["reference"][1], strict=True):
        _close(got, want, 1e-5)


def test_rms_norm_equals_the_reference_bit_for_bit():
    """The mean of squares sums in torch's own order (its cascade of partial sums, at the vector width the backend's
    self-test found), so the norm is the reference's to the bit: every length from 1 to 70 and the model's, one
    row and many, fp32 and bf16."""
    assert FAST._lanes in (8, 16), "the self-test found no vector width at which the C sum is torch's"
    gen = torch.Generator().manual_seed(0)
    for n in [*range(1, 71), 127, 128, 256, 512, 1000, 4096, 7168]:
        weight = torch.randn(n, generator=gen)
        for rows in (1, 5, 33):
            x = torch.randn(rows, n, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
            for dtype in (torch.float32, torch.bfloat16):
                got, want = FAST.rms_norm(x.to(dtype), weight, 1e-6), REF.rms_norm(x.to(dtype), weight, 1e-6)
                assert got.dtype == dtype and torch.equal(got, want), (n, rows, dtype)


def test_head_norm_equals_the_reference_bit_for_bit():
    """The weightless per-head query norm: fp32 through the C RMSNorm (weight 1, an exact product) to the bit; bf16,
    which the reference computes in bf16, stays the reference's."""
    gen = torch.Generator().manual_seed(3)
    for shape in [(1, 1, 4, 32), (2, 7, 8, 128), (1, 300, 4, 64)]:
        for dtype in (torch.float32, torch.bfloat16):
            q = (torch.randn(*shape, generator=gen) * 4).to(dtype)
            got, want = FAST.head_norm(q, 1e-6), REF.head_norm(q, 1e-6)
            assert got.dtype == dtype and torch.equal(got, want), (shape, dtype)


def test_head_norm_with_rope_is_the_two_ops_bit_for_bit(monkeypatch):
    """The queries' normalisation and rotation in one C pass (`dsv4_rms_norm_rope`) give the bits of the two ops
    (and the reference's): cos / sin shared by a query's heads or one row per head, widths with and without a
    nope part; bf16 and training keep the two ops."""
    lib = _CountingLib(FAST.lib)
    monkeypatch.setattr(FAST, "lib", lib)
    gen = torch.Generator().manual_seed(4)
    for shape, half, shared in [((1, 37, 4, 32), 8, True), ((2, 7, 8, 128), 16, False), ((1, 3, 2, 16), 8, True)]:
        angles = torch.rand(*shape[:2], 1 if shared else shape[2], half, generator=gen) * 40
        cos, sin = torch.cos(angles), torch.sin(angles)
        for dtype in (torch.float32, torch.bfloat16):
            q = (torch.randn(*shape, generator=gen) * 4).to(dtype)
            got = FAST.head_norm(q, 1e-6, cos, sin)
            assert torch.equal(got, FAST.rope(FAST.head_norm(q, 1e-6), cos, sin)), (shape, dtype)
            assert torch.equal(got, REF.head_norm(q, 1e-6, cos, sin)), (shape, dtype)
            own = q.clone()  # in place: each row read whole before it is written, the same bits
            over = FAST.head_norm(own, 1e-6, cos, sin, inplace=True)
            assert torch.equal(over, got) and (dtype != torch.float32 or over.data_ptr() == own.data_ptr())
            wide = torch.cat((q, q), dim=-1)  # a strided x is copied first: the caller's tensor keeps its values
            before = wide.clone()
            assert torch.equal(FAST.head_norm(wide[..., :shape[-1]], 1e-6, cos, sin, inplace=True), got)
            assert torch.equal(wide, before)
    assert lib.calls["dsv4_rms_norm_rope"] == 3 + 3 * 2
    leaf = torch.randn(1, 5, 4, 32, generator=gen).requires_grad_()
    cos, sin = torch.cos(torch.rand(1, 5, 1, 8)), torch.sin(torch.rand(1, 5, 1, 8))
    FAST.head_norm(leaf, 1e-6, cos, sin).sum().backward()
    want = leaf.detach().clone().requires_grad_()
    REF.head_norm(want, 1e-6, cos, sin).sum().backward()
    _close(leaf.grad, want.grad, 1e-5)


def test_hc_mixes_equals_the_reference_bit_for_bit():
    """mHC's coefficients: the C RMS factor over all h*d values times torch's product, the reference's bits."""
    gen = torch.Generator().manual_seed(1)
    for lead in [(1, 1), (1, 3), (2, 17), (1, 300)]:
        for d in (32, 64, 128, 256):
            fn = torch.randn(24, 4 * d, generator=gen)
            for dtype in (torch.float32, torch.bfloat16):
                x = (torch.randn(*lead, 4, d, generator=gen) * 3).to(dtype)
                assert torch.equal(FAST.hc_mixes(x, fn, 1e-6), REF.hc_mixes(x, fn, 1e-6)), (lead, d, dtype)


def test_hc_collapse_equals_the_reference_bit_for_bit():
    """The streams' read into a sublayer input: products added in order, torch's reduction over 4 streams (whose
    vectorised and leftover columns both add in order), fp32 and bf16, widths with and without leftovers."""
    gen = torch.Generator().manual_seed(2)
    for lead in [(1, 1), (2, 9), (1, 70)]:
        for d in (32, 100, 128, 256):
            pre = torch.rand(*lead, 4, generator=gen) * 2
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(*lead, 4, d, generator=gen).to(dtype)
                x[..., :3] = -0.0  # signed zeros: a sum of -0.0 terms is +0.0, as torch's from 0
                got, want = FAST.hc_collapse(x, pre), REF.hc_collapse(x, pre)
                bits = torch.int32 if dtype == torch.float32 else torch.int16
                assert torch.equal(got.view(bits), want.view(bits)), (lead, d, dtype)


def test_the_vector_exponential_is_within_one_ulp():
    """`exp16` (the fp32 fast paths' exponential) against float64's over its whole range, and at its edges: 0 below
    -87, e^88 above 88 (and for +inf), NaN kept."""
    x = torch.cat((torch.linspace(-87, 88, 400_001), _rand(4096, seed=3) * 20, torch.tensor([0.0, -0.0, 1e-30])))
    got = torch.empty_like(x)
    assert FAST.lib.dsv4_exp(x.data_ptr(), got.data_ptr(), x.numel()) == 0
    want = torch.exp(x.double())
    ulp = torch.nextafter(want.float(), torch.tensor(float("inf"))).double() - want.float().double()
    assert ((got.double() - want).abs() / ulp).max().item() <= 1.0
    edges = torch.tensor([-87.01, -1e30, float("-inf"), 88.01, 1e30, float("inf"), float("nan")])
    out = torch.empty_like(edges)
    FAST.lib.dsv4_exp(edges.data_ptr(), out.data_ptr(), edges.numel())
    e88 = torch.exp(torch.tensor(88.0, dtype=torch.float64)).item()
    assert out[:3].tolist() == [0.0, 0.0, 0.0] and out[6].isnan()
    assert all(abs(v - e88) <= 1e-6 * e88 for v in out[3:6].tolist())


def _mhc_read_float64(x, fn, scale, base, h, iters, eps, norm_eps):
    """mHC's read by its formulas (spec: mixes, split, row softmax, Sinkhorn ending on columns, collapse) in
    float64: the yardstick of the fused fp32 kernel."""
    x, fn, scale, base = x.double(), fn.double(), scale.double(), base.double()
    flat = x.flatten(2)
    mixes = flat @ fn.T / torch.sqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mixes[..., :h] * scale[0] + base[:h]) + eps
    post = 2 * torch.sigmoid(mixes[..., h:2 * h] * scale[1] + base[h:2 * h])
    comb = torch.softmax((mixes[..., 2 * h:] * scale[2] + base[2 * h:]).unflatten(-1, (h, h)), dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return (pre.unsqueeze(-1) * x).sum(2), post, comb


def _mhc_inputs(lead, h, d, seed):
    gen = torch.Generator().manual_seed(seed)
    m = (2 + h) * h
    return (torch.randn(*lead, h, d, generator=gen), torch.randn(m, h * d, generator=gen) * 0.05,
            torch.rand(3, generator=gen) + 0.5, torch.randn(m, generator=gen))


@pytest.mark.parametrize(("lead", "h", "d"), [((1, 256), 4, 256), ((1, 1), 4, 256), ((3, 7), 4, 33), ((2, 19), 2, 16),
                                              ((1, 21), 8, 64)])
def test_the_fused_mhc_read_of_fp32_streams_follows_the_formulas(monkeypatch, lead, h, d):
    """fp32 inference takes one C pass (`dsv4_hc_pre`: panel product, vector exponentials, reciprocal Sinkhorn
    steps) for the three ops: within 1e-5 of the float64 formulas and of the reference, for token counts off the
    16-token blocks, widths off the 16-lane vectors, 2 to 8 streams."""
    calls = []
    fused = FAST.lib.dsv4_hc_pre
    monkeypatch.setattr(FAST.lib, "dsv4_hc_pre", lambda *a: calls.append(a) or fused(*a))
    x, fn, scale, base = _mhc_inputs(lead, h, d, seed=d + h)
    got = FAST.hc_pre(x, fn, scale, base, h, 20, 1e-6, 1e-6)
    assert len(calls) == 1
    for g, f, r in zip(got, _mhc_read_float64(x, fn, scale, base, h, 20, 1e-6, 1e-6),
                       REF.hc_pre(x, fn, scale, base, h, 20, 1e-6, 1e-6), strict=True):
        assert g.dtype == torch.float32 and g.shape == r.shape
        _close(g.double(), f, 1e-5)
        _close(g, r, 1e-5)


def test_the_fused_mhc_read_of_a_token_does_not_depend_on_its_batch():
    """Each token is a lane of its 16-token block and its own rows of the panel product: alone or at any place in a
    batch, the same bits; a NaN token spoils only its own outputs."""
    x, fn, scale, base = _mhc_inputs((1, 37), 4, 64, seed=5)
    x[0, 20, 1, 3] = float("nan")
    whole = FAST.hc_pre(x, fn, scale, base, 4, 20, 1e-6, 1e-6)
    for t in (0, 15, 16, 36):
        alone = FAST.hc_pre(x[:, t:t + 1], fn, scale, base, 4, 20, 1e-6, 1e-6)
        assert all(torch.equal(a, w[:, t:t + 1]) for a, w in zip(alone, whole, strict=True)), t
    assert all(w[0, 20].isnan().all() for w in whole)
    assert not any(w[0, :20].isnan().any() or w[0, 21:].isnan().any() for w in whole)


def test_the_mhc_read_of_bf16_streams_and_in_training_is_the_three_ops():
    """bf16 streams keep the reference's bits (each op's own kernel); with gradients the three ops' backward."""
    x, fn, scale, base = _mhc_inputs((2, 9), 4, 64, seed=7)
    xb = x.to(torch.bfloat16)
    for got, want in zip(FAST.hc_pre(xb, fn, scale, base, 4, 20, 1e-6, 1e-6),
                         REF.hc_pre(xb, fn, scale, base, 4, 20, 1e-6, 1e-6), strict=True):
        assert torch.equal(got, want)
    grads = {}
    for name, backend in (("native", FAST), ("reference", REF)):
        leaf = x.clone().requires_grad_()
        u, post, comb = backend.hc_pre(leaf, fn, scale, base, 4, 20, 1e-6, 1e-6)
        (u.sum() + post.sum() + (comb * torch.arange(16.0).view(4, 4)).sum()).backward()
        grads[name] = leaf.grad
    _close(grads["native"], grads["reference"], 1e-5)


@pytest.mark.parametrize(("rows", "c", "entries", "n"), [(528, 128, 64, 8), (384, 128, 2, 128), (20, 33, 5, 3)])
def test_the_compressor_pooling_in_c_agrees_with_the_reference(rows, c, entries, n):
    """fp32 pooling in one C call (`dsv4_gated_pool`): CSA's (8 candidates) and HCA's (128) shapes and a width off
    the 16 lanes, candidates that do not exist (-1: weight 0), an entry with none (NaN, as the reference's softmax
    of -inf scores), scores spread over tens; a candidate past the rows is an IndexError. With gradients wanted,
    the reference's ops (the same values, differentiable)."""
    gen = torch.Generator().manual_seed(rows + n)
    kv, score = torch.randn(rows, c, generator=gen), torch.randn(rows, c, generator=gen) * 10
    candidates = torch.randint(0, rows, (entries, n), generator=gen)
    candidates[0, : n // 2] = -1
    candidates[-1] = -1
    got, want = FAST.gated_pool(kv, score, candidates), REF.gated_pool(kv, score, candidates)
    assert got[-1].isnan().all() and want[-1].isnan().all()
    _close(got[:-1], want[:-1], 1e-5)
    leaf = kv.clone().requires_grad_()
    trained = FAST.gated_pool(leaf, score, candidates[:-1])
    assert trained.requires_grad and torch.equal(trained, REF.gated_pool(kv, score, candidates[:-1]))
    candidates[1, 0] = rows
    with pytest.raises(IndexError, match=f"past the {rows} rows"):
        FAST.gated_pool(kv, score, candidates)


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize(("tokens", "experts", "k"), [(256, 16, 2), (1, 16, 2), (37, 256, 6), (5, 20, 3)])
def test_the_router_in_c_picks_the_references_experts(monkeypatch, score_func, tokens, experts, k):
    """fp32 routing in one C call (`dsv4_moe_gate`: the product with the gate weight in panels, vector scores, the
    top-k of scores + bias): the reference's experts in its order, weights and scores within 1e-5; a hash layer's
    given ids kept. Expert counts off the 16 lanes and the 32-wide panels, a single token."""
    calls = []
    gate = FAST.lib.dsv4_moe_gate
    monkeypatch.setattr(FAST.lib, "dsv4_moe_gate", lambda *a: calls.append(a) or gate(*a))
    gen = torch.Generator().manual_seed(tokens + experts)
    x = torch.randn(tokens, 256, generator=gen)
    weight, bias = torch.randn(experts, 256, generator=gen) * 0.05, torch.randn(experts, generator=gen) * 0.1
    hashed = torch.randint(0, experts, (tokens, k), generator=gen)
    for ids, b in ((None, bias), (hashed, None)):
        got = FAST.moe_gate(x, weight, b, ids, score_func, k, 1.5)
        want = REF.moe_gate(x, weight, b, ids, score_func, k, 1.5)
        assert torch.equal(got[1], want[1]) and got[1].dtype == torch.int64
        _close(got[0], want[0], 1e-5)
        _close(got[2], want[2], 1e-5)
    assert len(calls) == 2


def test_the_router_in_c_over_extreme_logits_and_ties():
    """Scores past softplus' threshold (20) and far below (-80) within 1e-5 of the largest, as torch's; tied scores
    go to the lower expert id first and NaN scores first of all (the order the indexer's top-k keeps too); a given
    id out of range is an IndexError."""
    x = torch.tensor([[30.0, 19.9, 20.1, -80.0, 0.0, 3.0, -3.0, 1e-8], [0.5] * 8, [0.1, 0.0, 0.5, 0.5, 0.2, 0, 0, 0]])
    eye = torch.eye(8)  # the logits are x
    for score_func in ("sqrtsoftplus", "sigmoid"):
        weights, ids, scores = FAST.moe_gate(x[:1], eye, torch.zeros(8), None, score_func, 2, 1.0)
        _close(scores, REF.moe_gate(x[:1], eye, torch.zeros(8), None, score_func, 2, 1.0)[2], 1e-6)
    assert FAST.moe_gate(x[1:2], eye, torch.zeros(8), None, "sigmoid", 3, 1.0)[1].tolist() == [[0, 1, 2]]
    nan_rows = eye.clone()
    nan_rows[[1, 5]] = float("nan")  # logits 1 and 5 NaN
    assert FAST.moe_gate(x[2:], nan_rows, torch.zeros(8), None, "sigmoid", 3, 1.0)[1].tolist() == [[1, 5, 2]]
    with pytest.raises(IndexError, match="out of range"):
        FAST.moe_gate(x[:1], eye, None, torch.tensor([[0, 8]]), "sigmoid", 2, 1.0)


@pytest.mark.parametrize("spread", [1.0, 30.0])  # 30: logits spread over hundreds, exp's floor reached
def test_chunk_attention_in_training_agrees_with_the_reference(spread):
    """Training attention over a chunk's fp32 rows (C bookkeeping, closed-form gradient, blocks of queries written
    into place): the reference's output and gradients of q, rows and sink within fp32 rounding, over several
    query blocks, with unused and repeated slots, a query with no slot (0) and a block naming no row at all."""
    b, s, h, d, n, w = 2, 150, 4, 32, 180, 24
    band = (torch.arange(s).view(1, s, 1) + 20 - torch.arange(w).view(1, 1, w)).expand(b, s, w).clone()
    band[:, ::7, 3] = -1
    entries = torch.arange(170, 178).view(1, 1, 8).expand(b, s, 8)
    idx = torch.cat((band, entries, entries[..., :2]), dim=-1)
    idx[1, 5] = -1  # a query with no slot
    idx[:, 128:] = -1  # the last block of queries names no row
    results = {}
    for name, backend in (("native", FAST), ("reference", REF)):
        q = (_rand(b, s, h, d, seed=1) * spread).requires_grad_()
        kv, sink = _rand(b, n, d, seed=2).requires_grad_(), _rand(h, seed=3).requires_grad_()
        out = backend.sparse_attn(q, kv, idx, sink, d**-0.5)
        (out * _rand(*out.shape, seed=5)).sum().backward()
        results[name] = (out.detach(), q.grad, kv.grad, sink.grad)
    assert not results["native"][0][1, 5].any() and not results["native"][0][:, 128:].any()
    for got, want in zip(results["native"], results["reference"], strict=True):
        _close(got, want, 2e-6)


def test_rms_norm_without_a_width_is_the_reference():
    """No vector width found (another torch's sum): the reference's ops, in training too."""
    x, weight = torch.randn(3, 64), torch.randn(64, requires_grad=True)
    backend = native.NativeBackend()
    backend._lanes = None
    assert torch.equal(backend.rms_norm(x, weight.detach(), 1e-6), REF.rms_norm(x, weight.detach(), 1e-6))
    out = backend.rms_norm(x, weight, 1e-6)
    assert out.grad_fn is not None and "RmsNorm" not in type(out.grad_fn).__name__


def _training_cases():
    """(name, op(backend, *leaves), inputs that get gradients): the ops the native backend trains with a backward of
    its own, on shapes and values that reach every branch (clamped SwiGLU inputs, an expert no token chose)."""
    cos, sin = _rand(2, 37, 8, seed=20), _rand(2, 37, 8, seed=21)
    visible = torch.arange(37).expand(2, 37) // 4  # 0 .. 9 entries seen: picks past them are -1
    experts = [ExpertWeights(*(t for w in ws for t in (w, None))) for ws in
               ([_rand(16, 32, seed=30 + 3 * e, scale=0.3), _rand(16, 32, seed=31 + 3 * e, scale=0.3),
                 _rand(32, 16, seed=32 + 3 * e, scale=0.3)] for e in range(4))]
    ids = torch.tensor([[0, 2], [2, 1], [0, 1], [2, 0], [1, 2]] * 4)  # expert 3: no rows

    def routed(b, x, w, *flat):
        table = [ExpertWeights(flat[3 * e], None, flat[3 * e + 1], None, flat[3 * e + 2], None) for e in range(4)]
        return b.routed_experts(x, w, ids, table, [0, 1, 2, 3], 1.5)

    expert_leaves = [t for e in experts for t in (e.w1, e.w3, e.w2)]
    return [
        ("rms_norm", lambda b, x, w: b.rms_norm(x, w, 1e-6), [_rand(3, 37, 128, seed=1, scale=3), _rand(128, seed=2)]),
        ("head_norm", lambda b, x: b.head_norm(x, 1e-6), [_rand(2, 37, 4, 32, seed=3, scale=2)]),
        ("hc_mixes", lambda b, x, fn: b.hc_mixes(x, fn, 1e-6), [_rand(2, 37, 4, 64, seed=4), _rand(24, 256, seed=5)]),
        ("rope", lambda b, x: b.rope(x, cos, sin), [_rand(2, 37, 32, seed=6)]),
        ("rope over heads, inverse", lambda b, x: b.rope(x, cos.unsqueeze(2), sin.unsqueeze(2), inverse=True),
         [_rand(2, 37, 4, 32, seed=7)]),
        ("hadamard", lambda b, x: b.hadamard(x), [_rand(2, 37, 64, seed=8)]),
        ("index_topk", lambda b, s: torch.cat([t.float() for t in b.index_topk(s * 1.0, visible, 9)], dim=-1)
         .nan_to_num(neginf=-1e4), [_rand(2, 37, 40, seed=18)]),
        ("hc_collapse", lambda b, x, pre: b.hc_collapse(x, pre),
         [_rand(2, 37, 4, 40, seed=12), _rand(2, 37, 4, seed=13)]),
        ("hc_post", lambda b, out, x, post, comb: b.hc_post(out, x, post, comb),
         [_rand(2, 37, 40, seed=14), _rand(2, 37, 4, 40, seed=15), _rand(2, 37, 4, seed=16),
          _rand(2, 37, 4, 4, seed=17)]),
        ("swiglu", lambda b, x, w1, w3, w2: b.swiglu(x, ExpertWeights(w1, None, w3, None, w2, None), 1.5),
         [_rand(40, 32, seed=9, scale=2), *expert_leaves[:3]]),
        ("routed experts", routed, [_rand(20, 32, seed=10, scale=2), torch.rand(20, 2, generator=torch.Generator()
                                                                            .manual_seed(11)), *expert_leaves]),
    ]


@pytest.mark.parametrize("case", range(len(_training_cases())), ids=[c[0] for c in _training_cases()])
def test_training_ops_keep_the_forward_and_agree_on_gradients(case):
    """Training (fp32, gradients wanted): the native backend's own backwards (RMSNorm, head norm and mHC's RMS factor
    in C or closed form, rotations and the Hadamard transform by their transposes, SwiGLU's activation in C, the
    experts over their sorted rows) and the indexer's top-k picked in C give the reference's forward to the bit and
    its gradients within fp32 rounding, for every input, including an expert that ran on no rows (a zero gradient,
    not None) and picks past what a query sees (-1, -inf)."""
    name, op, inputs = _training_cases()[case]
    results = {}
    for backend_name, backend in (("native", FAST), ("reference", REF)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = op(backend, *leaves)
        assert out.grad_fn is not None
        (out * _rand(*out.shape, seed=99)).sum().backward()
        results[backend_name] = (out.detach(), [t.grad for t in leaves])
    assert torch.equal(results["native"][0], results["reference"][0]), name
    for got, want in zip(results["native"][1], results["reference"][1], strict=True):
        assert got is not None and want is not None
        _close(got, want, 1e-5)
    if name == "routed experts":
        assert not results["native"][1][-1].any()  # expert 3's w2: in the graph with a zero gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 1, 3, 8, 39, 40, 55])  # 40 = N, 55 > N
def test_index_topk_equals_the_reference_bit_for_bit(dtype, k):
    """The C selection picks, orders and masks exactly as the reference (torch's topk with its tie fix-up) on
    score sets where the choice among exact ties decides: few values, zeros of both signs, -inf, rows that see
    fewer entries than k."""
    gen = torch.Generator().manual_seed(k)
    for name, scores in adversarial_scores(gen).items():
        scores = scores.to(dtype)
        visible = torch.randint(0, scores.shape[-1] + 1, scores.shape[:2], generator=gen)
        got_scores, want_scores = scores.clone(), scores.clone()
        got, want = FAST.index_topk(got_scores, visible, k), REF.index_topk(want_scores, visible, k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name
        assert torch.equal(got_scores, want_scores), name  # masked in place alike
        shifted = FAST.index_topk(scores.clone(), visible, k, 64)[0]  # (the attention's rows: entry 0 at row 64)
        assert torch.equal(shifted, torch.where(got[0] >= 0, got[0] + 64, -1)), name
        window = torch.randint(-1, 64, (*scores.shape[:2], 64), generator=gen)  # (and the window's slots first)
        after = FAST.index_topk(scores.clone(), visible, k, 64, window)
        assert torch.equal(after[0], torch.cat((window, shifted), dim=-1)) and torch.equal(after[1], got[1]), name


@pytest.mark.parametrize("k", [1, 64, 270, 299, 300])
def test_index_topk_over_rows_seeing_few_and_many_entries(k):
    """Rows that see at most 256 entries rank them by counting, rows that see more keep the heap (over the seen
    entries only when k fits among them): both equal the reference, ties and hidden entries included."""
    gen = torch.Generator().manual_seed(k)
    shape = (2, 9, 300)
    for name, scores in {"few values": torch.randint(-2, 3, shape, generator=gen).float(),
                         "distinct": torch.randn(shape, generator=gen)}.items():
        visible = torch.randint(0, 301, shape[:2], generator=gen)
        visible[0, :3] = torch.tensor([0, 256, 257])  # no entry; the last row counted; the first row on the heap
        got_scores, want_scores = scores.clone(), scores.clone()
        got, want = FAST.index_topk(got_scores, visible, k), REF.index_topk(want_scores, visible, k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name
        assert torch.equal(got_scores, want_scores), name


# ---------------------------------------------------------------------------------------------- GEMMs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n, k", [(256, 128), (200, 320), (96, 64), (64, 1024), (40, 202)])
def test_quantised_linears_agree_with_the_reference(dtype, m, n, k):
    x = _awkward((m, k), seed=m + k).to(dtype) if m == 3 else _rand(m, k, seed=m + k).to(dtype)
    rel = 1e-5 if dtype == torch.float32 else 2**-8
    w8, s8 = quantize_fp8_weight(_rand(n, k, seed=n, scale=0.05))
    _close(FAST.linear(x, w8, s8), REF.linear(x, w8, s8), rel)
    if k % 32 == 0:
        w4, s4 = quantize_fp4_weight(_rand(n, k, seed=n + 1, scale=0.05))
        _close(FAST.linear(x, w4, s4), REF.linear(x, w4, s4), rel)


def test_a_rows_result_does_not_depend_on_its_batch():
    w, s = quantize_fp8_weight(_rand(192, 256, seed=1, scale=0.05))
    x = _rand(6, 256, seed=2)
    whole = FAST.linear(x, w, s)
    assert all(torch.equal(FAST.linear(x[i : i + 1], w, s), whole[i : i + 1]) for i in range(6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_large_gemms_are_one_blas_gemm_of_the_dequantised_operands(fmt, dtype):
    """Past NATIVE_MACS a quantised linear is BLAS's: activations quantised and dequantised, the weight with its
    scales multiplied in, one GEMM. The reference's products in another order: within the tests' tolerances, and
    (fp32 rows) within a few fp32 roundings of the block-by-block sum."""
    quant = quantize_fp4_weight if fmt == "fp4" else quantize_fp8_weight
    w, s = quant(_rand(1024, 1024, seed=1, scale=0.05))
    x = _rand(8, 1024, seed=2).to(dtype)
    assert x.numel() * w.shape[0] > native.NATIVE_MACS
    got, want = FAST.linear(x, w, s), REF.linear(x, w, s)
    _close(got, want, 1e-6 if dtype == torch.float32 else 2**-8)
    assert not torch.equal(got, CpuBackend().linear(x, w, s)) or dtype == torch.bfloat16  # not the block sums


def test_gradients_stay_on_the_cpu_backend():
    w, s = quantize_fp8_weight(_rand(1024, 1024, seed=1, scale=0.05))
    x = _rand(8, 1024, seed=2).requires_grad_()
    got = FAST.linear(x, w, s)
    assert got.requires_grad and torch.equal(got, CpuBackend().linear(x, w, s))
    mixes = _rand(2, 24, seed=3).requires_grad_()
    pre, _, _ = FAST.hc_split_sinkhorn(mixes, torch.ones(3), torch.zeros(24), 4, 3, 1e-6)
    assert pre.requires_grad


def _experts(n, d, inter, fmt, seed=0, dtype=torch.float32):
    out = []
    for e in range(n):
        if fmt == "float":  # plain numerics: the weights in the activations' dtype, no scales
            w1, w3, w2 = (_rand(*shape, seed=seed + 3 * e + i, scale=0.1).to(dtype)
                          for i, shape in enumerate(((inter, d), (inter, d), (d, inter))))
            out.append(ExpertWeights(w1, None, w3, None, w2, None))
            continue
        quant = quantize_fp4_weight if fmt == "fp4" else quantize_fp8_weight
        w1 = quant(_rand(inter, d, seed=seed + 3 * e, scale=0.1))
        w3 = quant(_rand(inter, d, seed=seed + 3 * e + 1, scale=0.1))
        w2 = quant(_rand(d, inter, seed=seed + 3 * e + 2, scale=0.1))
        out.append(ExpertWeights(w1[0], w1[1], w3[0], w3[1], w2[0], w2[1]))
    return out


class _CountingLib:
    """The native library with a count of the calls by function name."""

    def __init__(self, lib):
        self.lib, self.calls = lib, collections.Counter()

    def __getattr__(self, name):
        fn = getattr(self.lib, name)
        return lambda *a: self.calls.update([name]) or fn(*a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["fp4", "fp8", "float"])
@pytest.mark.parametrize("tokens, k", [(1, 2), (5, 2), (8, 3)])
def test_routed_and_shared_experts_agree_with_the_reference(monkeypatch, dtype, fmt, tokens, k):
    """A decode's experts run in C, quantised or float (their GEMVs in their own order: the tolerances)."""
    lib = _CountingLib(FAST.lib)
    monkeypatch.setattr(FAST, "lib", lib)
    experts = _experts(8, 128, 96, fmt, dtype=dtype)
    gen = torch.Generator().manual_seed(tokens)
    x = (_rand(tokens, 128, seed=tokens) * 4).to(dtype)
    ids = torch.stack([torch.randperm(8, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    rel = 1e-5 if dtype == torch.float32 else 2**-7
    which = sorted(set(ids.flatten().tolist()))
    got = FAST.routed_experts(x, weights, ids, experts, which, 7.0)
    _close(got, REF.routed_experts(x, weights, ids, experts, which, 7.0), rel)
    held = which[: len(which) // 2]  # expert parallelism: only the experts held here are added
    _close(FAST.routed_experts(x, weights, ids, [e if i in held else None for i, e in enumerate(experts)], held,
                               7.0), REF.routed_experts(x, weights, ids, experts, held, 7.0), rel)
    _close(FAST.swiglu(x, experts[0], 7.0), REF.swiglu(x, experts[0], 7.0), rel)
    _close(FAST.swiglu(x, experts[1], 7.0, weights[:, :1]), REF.swiglu(x, experts[1], 7.0, weights[:, :1]), rel)
    alone = FAST.swiglu(x, experts[0], 7.0)  # the shared expert's output added to the routed sum, rounded
    assert torch.equal(FAST.swiglu(x, experts[0], 7.0, None, got), (got + alone.float()).to(dtype))
    routed = "dsv4_panel_experts" if fmt == "float" and dtype == torch.float32 else "dsv4_routed_experts"
    assert lib.calls == {routed: 2, "dsv4_swiglu": 4}


def test_a_prefills_fp32_shared_expert_runs_its_activation_in_c(monkeypatch):
    """Past a decode's rows, a float fp32 expert (the shared one) is BLAS's three GEMMs around one C activation
    (`dsv4_swiglu_act`: the clamps, SiLU with the vector exponential, the routing weight): within 1e-5 of the
    reference, with and without routing weights, gates past the limit and far below zero included."""
    lib = _CountingLib(FAST.lib)
    monkeypatch.setattr(FAST, "lib", lib)
    expert = _experts(1, 128, 96, "float")[0]
    x = _rand(300, 128, seed=4) * 20
    weights = torch.rand(300, 1, generator=torch.Generator().manual_seed(4))
    _close(FAST.swiglu(x, expert, 7.0), REF.swiglu(x, expert, 7.0), 1e-5)
    _close(FAST.swiglu(x, expert, 7.0, weights), REF.swiglu(x, expert, 7.0, weights), 1e-5)
    assert lib.calls == {"dsv4_swiglu_act": 2}
    gate = REF.linear(x, expert.w1)
    assert (gate > 7.0).any() and (gate < -20.0).any()  # both clamps' ranges reached


@pytest.mark.parametrize("tokens", [1, 7, 200])
def test_plain_float_experts_run_in_panels_whatever_the_rows(monkeypatch, tokens):
    """Plain fp32 experts run in one C call over their panels at any number of rows (a decode's, a prefill's):
    within fp32 rounding of the reference, with the experts held elsewhere left out, a repeated id added in slot
    order, and each token's result the same bits alone as in its batch."""
    lib = _CountingLib(FAST.lib)
    monkeypatch.setattr(FAST, "lib", lib)
    experts = _experts(8, 128, 96, "float")
    gen = torch.Generator().manual_seed(tokens)
    x = _rand(tokens, 128, seed=tokens) * 4
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(tokens)])
    ids[0, 1] = ids[0, 0]  # a repeated id
    weights = torch.rand(tokens, 2, generator=gen)
    which = sorted(set(ids.flatten().tolist()))
    with torch.inference_mode():
        got = FAST.routed_experts(x, weights, ids, experts, which, 7.0)
        _close(got, REF.routed_experts(x, weights, ids, experts, which, 7.0), 1e-5)
        held = which[1::2]
        _close(FAST.routed_experts(x, weights, ids, [e if i in held else None for i, e in enumerate(experts)], held,
                                   7.0), REF.routed_experts(x, weights, ids, experts, held, 7.0), 1e-5)
        for t in {0, tokens // 2, tokens - 1}:
            alone = FAST.routed_experts(x[t:t + 1], weights[t:t + 1], ids[t:t + 1], experts, which, 7.0)
            assert torch.equal(alone[0], got[t])
    assert set(lib.calls) == {"dsv4_panel_experts"}


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
def test_small_float_linears_are_the_references_bit_for_bit(x_dtype, w_dtype):
    """A float weight of x's dtype short of a vocabulary goes straight to F.linear (the reference's product);
    other dtype pairs keep the cast the reference makes. Same bits either way, with and without gradients."""
    x = _rand(3, 5, 96, seed=1).to(x_dtype)
    weight = _rand(200, 96, seed=2, scale=0.1).to(w_dtype)
    got = FAST.linear(x, weight)
    want = REF.linear(x, weight)
    assert got.dtype == want.dtype == x_dtype and torch.equal(got, want)
    trained = weight.clone().requires_grad_()
    FAST.linear(x, trained).float().sum().backward()
    assert trained.grad is not None and trained.grad.shape == weight.shape


def test_float_experts_stored_as_strided_views_are_read_as_their_values():
    """The C chain reads a float expert's rows from memory: an expert whose weights are strided views (stored
    transposed), and not the first one the call looks at, still gives the reference's result."""
    experts = _experts(4, 128, 96, "float")
    strided = [w.T.contiguous().T for w in (experts[2].w1, experts[2].w3, experts[2].w2)]
    assert not any(w.is_contiguous() for w in strided)
    experts[2] = ExpertWeights(strided[0], None, strided[1], None, strided[2], None)
    x = _rand(3, 128, seed=9)
    ids = torch.tensor([[0, 2], [2, 3], [1, 2]])
    weights = torch.rand(3, 2, generator=torch.Generator().manual_seed(1))
    _close(FAST.routed_experts(x, weights, ids, experts, [0, 1, 2, 3], 7.0),
           REF.routed_experts(x, weights, ids, experts, [0, 1, 2, 3], 7.0), 1e-5)
    _close(FAST.swiglu(x, experts[2], 7.0), REF.swiglu(x, experts[2], 7.0), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_a_prefills_quantised_experts_run_in_c_over_folded_panels(monkeypatch, dtype, fmt):
    """Past NATIVE_MACS quantised routed experts run in one C call over their weights folded (block scales
    multiplied in) and kept in panels (`dsv4_panel_experts`: act_quant's quantisation and the roundings to x's
    dtype in C), a token's result the same bits in any batch; where the decoded-weight cache cannot keep the
    panels, as three batched GEMMs over every expert's stacked folded weights (the "cpu" backend's padded layout).
    Both agree with the reference's per-expert block GEMMs."""
    experts = _experts(8, 256, 128, fmt)
    gen = torch.Generator().manual_seed(0)
    x = (_rand(200, 256, seed=5) * 4).to(dtype)
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(200)])
    weights = torch.rand(200, 2, generator=gen)
    which = list(range(8))
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    want = REF.routed_experts(x, weights, ids, experts, which, 7.0)
    lib = _CountingLib(FAST.lib)
    monkeypatch.setattr(FAST, "lib", lib)
    got = FAST.routed_experts(x, weights, ids, experts, which, 7.0)
    assert lib.calls == {"dsv4_panel_experts": 1}
    _close(got, want, tol)
    late = FAST.routed_experts(x[80:], weights[80:], ids[80:], experts, which, 7.0)  # other groups of eight
    assert torch.equal(late, got[80:])
    keeps = FAST.decoded.keeps
    monkeypatch.setattr(FAST.decoded, "keeps", lambda w, kind, size: kind != "folded_panels" and keeps(w, kind, size))
    kinds = []
    padded = FAST._padded_swiglu
    monkeypatch.setattr(FAST, "_padded_swiglu", lambda *a: kinds.append(a[-1]) or padded(*a))
    _close(FAST.routed_experts(x, weights, ids, experts, which, 7.0), want, tol)
    assert kinds == ["folded"]
    _close(FAST.swiglu(x, experts[3], 7.0), REF.swiglu(x, experts[3], 7.0), tol)


# ---------------------------------------------------------------------------------------------- build and choice


def test_the_library_is_built_once_and_found_again(tmp_path, monkeypatch):
    monkeypatch.setenv(build.CACHE_ENV_VAR, str(tmp_path))
    path = build.build()
    assert path.parent == tmp_path and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert build.build() == path and path.stat().st_mtime_ns == stamp  # found by its key, not rebuilt
    lib = ctypes.CDLL(str(path))
    assert all(hasattr(lib, name) for name in build.SIGNATURES)


def test_without_a_compiler_auto_stays_on_the_cpu_backend(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(build.NativeUnavailable, match="no C compiler"):
        build.compiler()
    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setattr(build, "_warned", False)
    assert not build.available()
    assert kernels.resolve_backend_name("auto", "cpu") == "cpu"


def test_a_failed_build_names_the_compiler_error(monkeypatch, tmp_path):
    bad = tmp_path / "kernels.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(build, "SOURCE", bad)
    monkeypatch.setenv(build.CACHE_ENV_VAR, str(tmp_path / "cache"))
    with pytest.raises(build.NativeUnavailable, match="failed"):
        build.build()
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built is left to be loaded
    assert not list((tmp_path / "cache").glob("*.no-openmp"))  # the source failed, not OpenMP: asked again next time


def test_auto_picks_native_on_the_cpu():
    assert kernels.resolve_backend_name("auto", "cpu") == "native"
    assert kernels.get_backend("auto").backend_for(torch.device("cpu")) is kernels.get_backend("native")


# ---------------------------------------------------------------------------------------------- model level


@pytest.mark.parametrize("numerics", ["plain", "exact"])
def test_the_small_preset_gives_the_reference_logits_and_greedy_tokens(numerics):
    got, want, tokens, reference_tokens = small_preset_case(numerics, "native")
    err = ((got - want).abs().amax(dim=-1) / want.abs().amax(dim=-1)).max().item()
    assert err <= (1e-5 if numerics == "plain" else 2**-8), err  # exact: the official-parity tolerance
    assert tokens == reference_tokens


# ---------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("slots", [5, 64, 150])
def test_sparse_attention_over_dense_and_paged_rows_agrees_with_the_reference(slots):
    from dsv4.kernels.paged import PagedRows

    gen = torch.Generator().manual_seed(slots)
    q = torch.randn(3, 2, 4, 32, generator=gen)
    dense = torch.randn(3, 30, 32, generator=gen)
    pool = torch.randn(12, 16, 32, generator=gen)
    paged = PagedRows(pool, torch.tensor([[3, 1, 7, 0], [2, 5, 9, 4], [11, 10, 8, 6]]), 50, None, torch.float32)
    idx = torch.randint(-1, 80, (3, 2, slots), generator=gen)
    idx[1, 0] = -1  # a query with no used slot: the sink alone, so 0
    sink = torch.randn(4, generator=gen)
    got = FAST.sparse_attn(q, [dense, paged], idx, sink, 0.2)
    _close(got, REF.sparse_attn(q, [dense, paged], idx, sink, 0.2), 1e-6)
    assert torch.equal(got[1, 0], torch.zeros_like(got[1, 0]))
    dense_idx = idx.clamp(max=29)  # one dense tensor as the rows, as a plain forward passes them
    _close(FAST.sparse_attn(q, dense, dense_idx, sink, 0.2), REF.sparse_attn(q, dense, dense_idx, sink, 0.2), 1e-6)


@pytest.mark.parametrize("case", ["band", "scattered"])
def test_prefill_attention_in_c_agrees_with_the_reference(case, monkeypatch):
    """A prefill chunk over fp32 rows in one C call (`dsv4_chunk_attn`: blocks of 16 queries over the rows they
    name, both products on the panel kernels), for 150 queries (ten blocks, the last short) of two sequences.
    "band": a band of 16 window rows each plus compressed entries at the end (a few of the 203 rows, renumbered),
    two entries named twice; "scattered": slots over all of 43 rows (every row kept). Both with unused slots, a
    query with none (exactly 0), logits spread over hundreds (the floored range) and row counts that are not
    multiples of eight."""
    gen = torch.Generator().manual_seed(0)
    b, s, h, d = 2, 150, 8, 64  # past NATIVE_MACS: a decode's C attention would take fewer queries
    if case == "band":
        n = 203
        window = (torch.arange(s).view(1, s, 1) + 16 - torch.arange(16).view(1, 1, 16)).expand(b, s, 16)
        entries = torch.arange(n - 9, n).view(1, 1, 9).expand(b, s, 9)
        idx = torch.cat((window, entries, entries[..., :2]), dim=-1).clone()
    else:
        n = 43
        idx = torch.randint(0, n, (b, s, 48), generator=gen)
    idx[:, ::7, 3] = -1
    idx[1, 5] = -1
    q = torch.randn(b, s, h, d, generator=gen) * 30
    rows = torch.randn(b, n, d, generator=gen)
    sink = torch.randn(h, generator=gen)
    lib = _CountingLib(FAST.lib)
    monkeypatch.setattr(FAST, "lib", lib)
    got = FAST.sparse_attn(q, rows, idx, sink, d**-0.5)
    assert lib.calls == {"dsv4_chunk_attn": 1}
    _close(got, REF.sparse_attn(q, rows, idx, sink, d**-0.5), 1e-5)
    # the same rows as a dense run and pages (the compressed entries' form): read in place, the same result
    from dsv4.kernels.paged import PagedRows

    split, per_page = n - 9 if case == "band" else 20, 4
    tail = rows[:, split:]
    pages = -(-tail.shape[1] // per_page)
    pool = torch.zeros(2 * pages + 1, per_page, d)
    table = torch.stack([torch.arange(pages) * 2 + 1 + i % 2 for i in range(b)])  # interleaved pages, page 0 unused
    for i in range(b):
        padded = torch.cat((tail[i], tail.new_zeros(pages * per_page - tail.shape[1], d)))
        pool[table[i]] = padded.view(pages, per_page, d)
    runs = [rows[:, :split], PagedRows(pool, table, tail.shape[1], None, torch.float32)]
    assert torch.equal(FAST.sparse_attn(q, runs, idx, sink, d**-0.5), got)
    assert lib.calls == {"dsv4_chunk_attn": 2}
    assert torch.equal(got[1, 5], torch.zeros_like(got[1, 5]))
    idx[0, 0, 0] = n
    with pytest.raises(IndexError, match=f"past the {n} rows"):
        FAST.sparse_attn(q, rows, idx, sink, d**-0.5)


@pytest.mark.parametrize("k", [5, 64, 130, 192])
def test_attention_blocks_over_bf16_rows_in_c_are_the_cpu_backends_bit_for_bit(k, monkeypatch):
    """The 64-slot blocks' bookkeeping of attention over bf16 rows in two C calls (scaled, masked and padded logits,
    running maxima, shifts; block sums in torch's order, probabilities rounded to bf16 where the value products read
    them) equals the "cpu" backend's torch ops bit for bit: masked slots, a query with none, whole masked blocks,
    a NaN, logits far apart, and slot counts with and without a partial last block."""
    gen = torch.Generator().manual_seed(k)
    b, s, h = 2, 3, 4
    logits = torch.randn(b, s, h, k, generator=gen) * 40
    idx = torch.randint(0, 500, (b, s, k), generator=gen)
    idx[:, :, ::3] = -1
    idx[0, 1] = -1  # a query with no slot
    if k > 64:
        idx[1, 2, :64] = -1  # a whole masked first block
    logits[1, 0, 2, k // 2] = float("nan")
    cpu = CpuBackend()
    lib = _CountingLib(FAST.lib)
    monkeypatch.setattr(FAST, "lib", lib)
    want = cpu._block_exponents(logits.clone(), idx, 0.125)
    p = torch.exp(want[0])
    pairs = [*zip(want, FAST._block_exponents(logits.clone(), idx, 0.125), strict=True),
             *zip(cpu._block_probs(p, torch.bfloat16, k), FAST._block_probs(p, torch.bfloat16, k), strict=True)]
    assert lib.calls == {"dsv4_attn_block_exponents": 1, "dsv4_attn_block_probs": 1}
    for w, g in pairs:
        assert (w is None) == (g is None)
        if w is not None:  # NaN where the reference has NaN, every other value's bits
            assert torch.equal(w.isnan(), g.isnan()) and torch.equal(w.nan_to_num(), g.nan_to_num())


def test_sparse_attention_over_bf16_rows_is_the_cpu_backends_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    q, rows = torch.randn(2, 1, 4, 32, generator=gen).bfloat16(), torch.randn(2, 90, 32, generator=gen).bfloat16()
    idx, sink = torch.randint(-1, 90, (2, 1, 80), generator=gen), torch.randn(4, generator=gen)
    assert torch.equal(FAST.sparse_attn(q, rows, idx, sink, 0.2), CpuBackend().sparse_attn(q, rows, idx, sink, 0.2))


def _nan_equal(got: torch.Tensor, want: torch.Tensor) -> bool:
    """NaN where want has NaN, every other value's bits (+0 and -0 apart)."""
    return (got.dtype == want.dtype and torch.equal(got.isnan(), want.isnan())
            and torch.equal(got.nan_to_num().view(torch.int16 if got.dtype == torch.bfloat16 else torch.int32),
                            want.nan_to_num().view(torch.int16 if want.dtype == torch.bfloat16 else torch.int32)))


@pytest.mark.parametrize("k", [5, 64, 130, 192])
@pytest.mark.parametrize("queries", ["decode", "chunk"])
def test_attention_over_bf16_rows_in_c_is_the_references_bit_for_bit(queries, k, monkeypatch):
    """Exact numerics' attention (bf16 queries and rows) in two C calls around torch's exponential
    (`dsv4_rounded_attn_args` / `_out`), against the reference's bits: a decode's queries (one per batch row, each
    scoring its own slots) and a prefill chunk's (blocks of 16 scoring the rows they name together), rows in a
    dense run and pages; slot counts with and without a partial last block (its logits torch's); unused slots, a
    query with none (the sink alone: 0), a whole unused first block, a NaN query, logits hundreds apart (exponents
    below -104 given as 0, and between -104 and -87, MKL's subnormal results)."""
    from dsv4.kernels.paged import PagedRows

    gen = torch.Generator().manual_seed(k)
    b, s, h, d = (3, 1, 4, 32) if queries == "decode" else (2, 40, 8, 64)
    q = (torch.randn(b, s, h, d, generator=gen) * 4).bfloat16()
    q[b - 1, s - 1, 1, 3] = float("nan")
    dense = (torch.randn(b, 30, d, generator=gen) * 4).bfloat16()
    pool = (torch.randn(12, 16, d, generator=gen) * 4).bfloat16()
    table = torch.tensor([[3, 1, 7, 0], [2, 5, 9, 4], [11, 10, 8, 6]])[:b]
    runs = [dense, PagedRows(pool, table, 50, None, torch.bfloat16)]
    idx = torch.randint(0, 80, (b, s, k), generator=gen)
    idx[torch.rand(idx.shape, generator=gen) < 0.3] = -1
    idx[1, 0] = -1  # a query with no used slot
    if k > 64:
        idx[0, s - 1, :64] = -1  # a whole unused first block
    sink = torch.randn(h, generator=gen)
    assert FAST._rounded_orders(h, d), "this BLAS sums the logits or the value products out of order"
    lib = _CountingLib(FAST.lib)
    monkeypatch.setattr(FAST, "lib", lib)
    got = FAST.sparse_attn(q, runs, idx, sink, d**-0.5)
    assert lib.calls == {"dsv4_rounded_attn_args": 1, "dsv4_rounded_attn_out": 1}
    want = REF.sparse_attn(q, runs, idx, sink, d**-0.5)
    assert _nan_equal(got, want)
    assert torch.equal(got[1, 0], torch.zeros_like(got[1, 0]))
    assert got.isnan().any()  # the NaN query's head
    idx[0, 0, 0] = 80
    with pytest.raises(IndexError, match="past the 80 rows"):
        FAST.sparse_attn(q, runs, idx, sink, d**-0.5)


def test_attention_over_bf16_rows_keeps_the_references_nan_from_a_row_0_that_is_not_finite():
    """The reference multiplies an unused slot's probability (0) by row 0 of the batch row (its clamped gather):
    where that row holds an infinity, that channel's sums are NaN, and the C kernels keep them so too."""
    gen = torch.Generator().manual_seed(0)
    q, rows = torch.randn(2, 1, 2, 32, generator=gen).bfloat16(), torch.randn(2, 40, 32, generator=gen).bfloat16()
    rows[1, 0, 5] = float("inf")
    idx = torch.randint(1, 40, (2, 1, 70), generator=gen)
    idx[:, :, 10] = -1
    sink = torch.randn(2, generator=gen)
    want = REF.sparse_attn(q, rows, idx, sink, 0.2)
    assert want[1, ..., 5].isnan().all() and want.isnan().sum() == want[1, ..., 5].numel()  # its channel 5 only
    assert _nan_equal(FAST.sparse_attn(q, rows, idx, sink, 0.2), want)


def test_torchs_exponential_is_zero_below_the_attention_kernels_cutoff():
    """`dsv4_rounded_attn_args` gives an exponent below -104 (kernels.c's EXP_ZERO) as 0 without torch's exp, which
    must then be 0: every float from -104 down to -110 (e^-104 is below 2^-150, half the least subnormal), a few
    far below, -inf; and -103.5 is not (the cutoff is not loose by much)."""
    top, bottom = torch.tensor([-104.0, -110.0]).view(torch.int32).tolist()
    below = torch.arange(top, bottom + 1, dtype=torch.int32).view(torch.float32)  # every float in [-110, -104]
    below = torch.cat((below, torch.tensor([-200.0, -1e30, -3.4e38, float("-inf")])))
    assert torch.equal(torch.exp(below), torch.zeros_like(below))
    assert torch.exp(torch.tensor(-103.5)) > 0


@pytest.mark.parametrize("unlike", ["einsum", "exp"])
def test_the_rounded_attention_self_check_finds_a_blas_that_sums_out_of_order(monkeypatch, unlike):
    """`_rounded_orders` compares the C kernels' fp32 outputs with the reference's on random bf16 values: where the
    reference's einsums sum in another order (here: float64), or torch's exp rounds an element by where it sits
    (here: a tensor's last element a step up, as a scalar tail loop might), it finds them out, and attention over
    bf16 rows keeps the "cpu" backend's torch ops, still the reference's bits."""
    be = native.NativeBackend()
    if unlike == "einsum":
        einsum = torch.einsum
        monkeypatch.setattr(torch, "einsum", lambda eq, *ops: einsum(eq, *(o.double() for o in ops)).float())
    else:
        exp = torch.exp

        def tail_exp(x, *args, **kwargs):
            out = exp(x, *args, **kwargs)
            last = out.view(-1)[-1:]
            last.copy_(last.nextafter(torch.full_like(last, float("inf"))))
            return out

        monkeypatch.setattr(torch, "exp", tail_exp)
    assert not be._rounded_orders(4, 32) and be._rounded_checked == {(4, 32): False}
    gen = torch.Generator().manual_seed(1)
    q, rows = torch.randn(1, 1, 4, 32, generator=gen).bfloat16(), torch.randn(1, 30, 32, generator=gen).bfloat16()
    idx, sink = torch.randint(-1, 30, (1, 1, 70), generator=gen), torch.randn(4, generator=gen)
    monkeypatch.setattr(be, "_rounded_call", lambda *a: pytest.fail("ran the C kernels the check rejected"))
    got = be.sparse_attn(q, rows, idx, sink, 0.125)
    if unlike == "einsum":  # (the fake exp rounds by tensor shape, which the two paths do not share)
        assert torch.equal(got, REF.sparse_attn(q, rows, idx, sink, 0.125))


def test_head_norm_trains_after_inference_made_its_unit_weight():
    """The unit weight `head_norm` keeps per width, first made under inference mode (a generation), serves a later
    training step too (autograd saves it for the backward; an inference tensor it refuses)."""
    be = native.NativeBackend()
    with torch.inference_mode():
        be.head_norm(torch.randn(3, 40), 1e-6)
    x, w = torch.randn(3, 40, requires_grad=True), torch.randn(3, 40)
    (be.head_norm(x, 1e-6) * w).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    (REF.head_norm(ref, 1e-6) * w).sum().backward()
    _close(x.grad, ref.grad, 1e-5)


@pytest.mark.parametrize("d", [64, 128, 72])
@pytest.mark.parametrize("backend", ["cpu", "native"])
def test_a_chunk_over_bf16_rows_is_the_references_bit_for_bit(backend, d, monkeypatch):
    """A short context's prefill chunk over bf16 rows in exact numerics: where the backend found its logits to be
    the gathered einsum's (`_scores_every_slot`), a block of queries scores the rows it names with one GEMM and
    (native) the value products read the rows in place, in C. Against the reference's bits: a window band with
    compressed entries at the end, an entry named twice, unused slots, a query with none, a second batch row whose
    slots stop short of the rows, blocks of queries that name some of the rows, two whole 64-slot blocks and
    a partial one."""
    be = CpuBackend() if backend == "cpu" else native.NativeBackend()
    gen = torch.Generator().manual_seed(d)
    b, s, h, n = 2, 150, 8, 280
    window = (torch.arange(s).view(1, s, 1) + 99 - torch.arange(100).view(1, 1, 100)).expand(b, s, 100)
    entries = torch.arange(n - 28, n).view(1, 1, 28).expand(b, s, 28)
    idx = torch.cat((window, entries, entries[..., :2]), dim=-1).clone()  # 130 slots
    idx[:, ::7, 3] = -1
    idx[1, 5] = -1
    idx[1, :, 100:] = idx[1, :, :30]  # batch row 1 names no compressed entry
    q = (torch.randn(b, s, h, d, generator=gen) * 3).bfloat16()
    rows = torch.randn(b, n, d, generator=gen).bfloat16()
    sink = torch.randn(h, generator=gen)
    monkeypatch.setattr(cpu_kernels, "GATHER_BYTES", 1 << 20)  # blocks of 10-30 queries: most score fewer rows
    monkeypatch.setattr(native, "GATHER_BYTES", 1 << 20)  # native: the chunk in two slices
    scored = []
    monkeypatch.setattr(be, "_scored_blocks", lambda *a: scored.append(1) or type(be)._scored_blocks(be, *a))
    in_c = backend == "native" and d % 16 == 0  # native's C kernels (a width of whole vectors; else the cpu path)
    if in_c:
        assert be._rounded_orders(h, d), f"this BLAS sums a dot product of {d} terms out of order"
        lib = _CountingLib(be.lib)
        monkeypatch.setattr(be, "lib", lib)
    got = be.sparse_attn(q, rows, idx, sink, d**-0.5)
    # a property of the BLAS the pinned torch wheel bundles (MKL), on the CPUs CI runs on: were it lost, chunks
    # would fall back to the gathered rows (still these bits, only slower), and this test says so
    assert be._scores_every_slot(d), f"this BLAS sums a dot product of {d} terms out of order"
    assert scored == ([] if in_c else [1])
    if in_c:
        assert lib.calls["dsv4_rounded_attn_out"] == 2
    assert torch.equal(got, REF.sparse_attn(q, rows, idx, sink, d**-0.5))
    assert torch.equal(got[1, 5], torch.zeros_like(got[1, 5]))


def test_the_logit_self_check_finds_a_blas_that_splits_its_dot_products(monkeypatch):
    """`_scores_every_slot` compares the backend's logits with the gathered einsum's bits: a GEMM whose dot
    products are summed in another order is found out, and the chunk falls back to the gathered rows."""
    be = native.NativeBackend()
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: bmm(a.double(), b.double()).float())
    assert not be._scores_every_slot(64)
    assert not be._scores_every_slot(64) and set(be._scored_widths) == {64}
    gen = torch.Generator().manual_seed(1)
    q, rows = torch.randn(1, 20, 2, 64, generator=gen).bfloat16(), torch.randn(1, 30, 64, generator=gen).bfloat16()
    idx, sink = torch.randint(-1, 30, (1, 20, 70), generator=gen), torch.randn(2, generator=gen)
    monkeypatch.setattr(be, "_scored_blocks", lambda *a: pytest.fail("scored a width the check rejected"))
    assert torch.equal(be.sparse_attn(q, rows, idx, sink, 0.125), REF.sparse_attn(q, rows, idx, sink, 0.125))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_the_reference_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    for shape, cos_shape in (((2, 3, 4, 32), (2, 3, 1, 8)), ((2, 3, 32), (2, 3, 8)), ((1, 1, 16), (1, 1, 8))):
        x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
        angles = torch.randn(*cos_shape, generator=gen) * 100
        cos, sin = torch.cos(angles), torch.sin(angles)
        for inverse in (False, True):
            want = REF.rope(x, cos, sin, inverse)
            assert torch.equal(FAST.rope(x, cos, sin, inverse), want), (shape, inverse)
            for backend in (FAST, REF):  # in place: the same bits, in x itself (its other dims untouched)
                own = x.clone()
                got = backend.rope(own, cos, sin, inverse, inplace=True)
                assert got.data_ptr() == own.data_ptr() and torch.equal(got, want), (shape, inverse, backend)
    x = torch.randn(2, 3, 32, generator=gen).requires_grad_()  # a gradient wanted: the reference's, differentiable
    assert FAST.rope(x, cos[..., :8].expand(2, 3, 8), sin[..., :8].expand(2, 3, 8)).requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 8, 70])
def test_hc_post_equals_the_reference_bit_for_bit(dtype, tokens):
    gen = torch.Generator().manual_seed(tokens)
    out = torch.randn(1, tokens, 96, generator=gen).to(dtype)
    x = torch.randn(1, tokens, 4, 96, generator=gen).to(dtype)
    post, comb = torch.rand(1, tokens, 4, generator=gen) * 2, torch.rand(1, tokens, 4, 4, generator=gen)
    assert torch.equal(FAST.hc_post(out, x, post, comb), REF.hc_post(out, x, post, comb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hc_post_in_place_writes_the_references_bits_over_x(dtype):
    """`inplace`: each token's new streams are computed from all of its old ones before any is stored, so writing
    over x gives the same bits; a strided x is copied first (the caller's tensor keeps its values)."""
    gen = torch.Generator().manual_seed(3)
    out = torch.randn(2, 37, 96, generator=gen).to(dtype)
    x = torch.randn(2, 37, 4, 96, generator=gen).to(dtype)
    post, comb = torch.rand(2, 37, 4, generator=gen) * 2, torch.rand(2, 37, 4, 4, generator=gen)
    want = REF.hc_post(out, x, post, comb)
    own = x.clone()
    got = FAST.hc_post(out, own, post, comb, inplace=True)
    assert got.data_ptr() == own.data_ptr() and torch.equal(got, want)
    wide = torch.randn(2, 37, 4, 2 * 96, generator=gen).to(dtype)
    strided = wide[..., :96]
    strided.copy_(x)
    before = wide.clone()
    assert torch.equal(FAST.hc_post(out, strided, post, comb, inplace=True), want)
    assert torch.equal(wide, before)
    assert torch.equal(REF.hc_post(out, x.clone(), post, comb, inplace=True), want)


def test_the_model_writes_over_only_the_streams_it_owns(monkeypatch):
    """A forward without gradients writes each layer's new streams over the last layer's (its own), never over the
    streams a caller hands the MTP block, and gives the bits of a forward that allocates every time."""
    from dsv4.config import preset
    from dsv4.model import Transformer, init_weights, transformer

    model = init_weights(Transformer(preset("tiny")), seed=2)
    tokens = torch.randint(0, model.args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(4))
    written = []
    hc_post = transformer.hc_post

    def recording(out, x, post, comb, inplace=False):
        written.append(inplace)
        return hc_post(out, x, post, comb, inplace)

    with kernels.use_backend("native"), torch.inference_mode():
        monkeypatch.setattr(transformer, "hc_post", recording)
        streams = model.forward_streams(tokens, model.new_cache(2, 32))
        handed = streams.clone()
        mtp = model.mtp_streams(streams, tokens, model.new_cache(2, 32))
        assert torch.equal(streams, handed) and all(written) and len(written) == 2 * (model.args.n_layers + 1)
        monkeypatch.setattr(transformer, "hc_post", lambda out, x, post, comb, inplace=False: hc_post(out, x, post,
                                                                                                       comb))
        assert torch.equal(model.forward_streams(tokens, model.new_cache(2, 32)), streams)
        assert torch.equal(model.mtp_streams(streams, tokens, model.new_cache(2, 32)), mtp)


def test_hc_post_gradients_agree_with_the_reference():
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 70, 96, generator=gen), torch.randn(2, 70, 4, 96, generator=gen),
              torch.rand(2, 70, 4, generator=gen) * 2, torch.rand(2, 70, 4, 4, generator=gen))
    weight = torch.randn(2, 70, 4, 96, generator=gen)
    results = {}
    for name, backend in (("native", FAST), ("reference", REF)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        new = backend.hc_post(*leaves)
        (new * weight).sum().backward()
        results[name] = (new, [t.grad for t in leaves])
    assert torch.equal(results["native"][0], results["reference"][0])
    for got, want in zip(results["native"][1], results["reference"][1], strict=True):
        _close(got, want, 1e-5)


# ---------------------------------------------------------------------------------------------- threads


def _split_cases():
    """name -> (op, its arguments), the work past the kernels' split threshold (their rows shared between
    threads)."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32, scale=3.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    def simulations(x):
        return FAST.fp8_simulate(x, 128), FAST.fp4_simulate(x, 32)

    def rope(x, angles):
        return FAST.rope(x, torch.cos(angles), torch.sin(angles))

    def streams(x, pre, fn):
        return FAST.hc_collapse(x, pre), FAST.hc_mixes(x, fn, 1e-6)

    def experts(x, weights, ids, chosen):
        return FAST.routed_experts(x, weights, ids, chosen, list(range(8)), 7.0), FAST.swiglu(x, chosen[0], 7.0)

    cases = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = r(300, 256, dtype=dtype)
        cases[f"fp8/fp4 simulation {dtype}"] = (simulations, (x,))
        cases[f"hadamard {dtype}"] = (FAST.hadamard, (x,))
        cases[f"rms_norm {dtype}"] = (FAST.rms_norm, (x, r(256), 1e-6))
        cases[f"rope {dtype}"] = (rope, (r(2, 300, 4, 64, dtype=dtype), r(2, 300, 1, 16, scale=50)))
        cases[f"hc_post {dtype}"] = (FAST.hc_post, (r(1, 200, 96, dtype=dtype), r(1, 200, 4, 96, dtype=dtype),
                                                    r(1, 200, 4).abs(), r(1, 200, 4, 4).abs()))
        cases[f"hc_collapse and hc_mixes {dtype}"] = (streams, (r(1, 200, 4, 96, dtype=dtype), r(1, 200, 4).abs(),
                                                                r(24, 384)))
        cases[f"decode attention {dtype}"] = (FAST.sparse_attn, (
            r(8, 1, 8, 64, dtype=dtype), r(8, 150, 64, dtype=dtype), torch.randint(-1, 150, (8, 1, 150), generator=gen),
            r(8), 0.125))
        cases[f"chunk attention {dtype}"] = (FAST.sparse_attn, (
            r(2, 100, 4, 64, dtype=dtype), r(2, 300, 64, dtype=dtype),
            torch.randint(-1, 300, (2, 100, 150), generator=gen), r(4), 0.125))
    cases["head_norm"] = (FAST.head_norm, (r(1, 300, 4, 64), 1e-6))
    cases["head_norm and rope"] = (FAST.head_norm, (r(1, 300, 4, 64), 1e-6, r(1, 300, 1, 16), r(1, 300, 1, 16)))
    cases["compressor pooling"] = (FAST.gated_pool, (r(500, 128), r(500, 128), torch.randint(-1, 500, (200, 8),
                                                                                               generator=gen)))
    cases["indexer top-k"] = (FAST.index_topk, (r(2, 300, 64), torch.randint(0, 65, (2, 300), generator=gen), 20))
    cases["router"] = (FAST.moe_gate, (r(300, 256), r(16, 256, scale=0.05), r(16, scale=0.1), None, "sqrtsoftplus", 2,
                                       1.5))
    cases["mHC read"] = (FAST.hc_pre, (r(1, 200, 4, 96), r(24, 384, scale=0.05), r(3).abs(), r(24), 4, 20, 1e-6, 1e-6))
    cases["quantised linear"] = (FAST.linear, (r(8, 256), *quantize_fp8_weight(r(256, 256, scale=0.05))))
    for fmt in ("fp4", "float"):
        ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(8)])
        cases[f"{fmt} experts"] = (experts, (r(8, 128), torch.rand(8, 2, generator=gen), ids,
                                             _experts(8, 128, 96, fmt)))
    cases["vocabulary head"] = (FAST.linear, (r(13, 64), r(cpu_kernels.VOCAB_ROWS + 7, 64, scale=0.1)))
    cases["greedy head"] = (FAST.greedy_head, (r(13, 64), r(cpu_kernels.VOCAB_ROWS + 7, 64, scale=0.1)))
    return cases


@pytest.mark.parametrize("case", list(_split_cases()))
def test_rows_split_between_threads_give_the_one_thread_bits(case):
    """The kernels share torch's OpenMP threads (one runtime in the process, checked at load) above a few
    thousand elements of work: each thread computes whole rows in the one-thread order, so the bits are the same
    on any number of threads (and the one-thread results are the reference's, the tests above)."""
    if torch.get_num_threads() < 2:
        pytest.skip("one CPU thread here: nothing is split")
    assert FAST.lib.splits_rows, f"the kernels do not share torch's OpenMP runtime: {build.openmp_runtimes()}"
    op, args = _split_cases()[case]
    before = torch.get_num_threads()
    results = []
    with torch.inference_mode():
        for threads in (1, before):
            torch.set_num_threads(threads)
            try:
                out = op(*args)
            finally:
                torch.set_num_threads(before)
            results.append(out if isinstance(out, tuple) else (out,))
    for one, split in zip(*results, strict=True):
        assert one.dtype == split.dtype and torch.equal(one.view(-1).view(torch.uint8),
                                                        split.view(-1).view(torch.uint8)), case


def test_the_openmp_runtimes_are_read_from_the_process_maps():
    """The load-time check counts the OpenMP runtimes mapped (torch's bundled libgomp, a system one, LLVM's): two
    mean the kernels would spin a second pool of threads, and they then stay on one thread."""
    line = "7f00-7f10 r-xp 00000000 08:01 42 {}"
    torchs, systems = "/venv/torch/lib/libgomp.so.1", "/usr/lib/x86_64-linux-gnu/libgomp.so.1"
    maps = "\n".join(line.format(p) for p in (torchs, torchs, "/usr/lib/libm.so.6", systems, "/opt/libomp.so"))
    assert build.openmp_runtimes(maps) == {torchs, systems, "/opt/libomp.so"}
    assert build.openmp_runtimes("7f00-7f10 rw-p 00000000 00:00 0 \n") == set()
    assert len(build.openmp_runtimes()) == 1  # here: torch's runtime only, the kernels' loops resolved to it


def test_a_compiler_without_openmp_builds_the_one_thread_kernels(monkeypatch, tmp_path):
    """A compiler that refuses -fopenmp (a clang without libomp) builds the kernels without it, once: the refusal is
    remembered beside the cache, and that library's loops never split (same results, one thread)."""
    real = build.compiler()
    calls = tmp_path / "calls"
    fake = tmp_path / "cc"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncase " $* " in *" -fopenmp "*) '
                    f'echo "unsupported option -fopenmp" >&2; exit 1;; esac\nexec {real} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv(build.CACHE_ENV_VAR, str(tmp_path / "cache"))
    path = build.build(str(fake))
    assert path == build.library_path(str(fake), build.FLAGS) and path.is_file()
    assert calls.read_text().count("-fopenmp") == 1 and len(calls.read_text().splitlines()) == 2
    assert build.build(str(fake)) == path and len(calls.read_text().splitlines()) == 2  # asked once
    lib = build._open(path)
    assert not lib.splits_rows
    assert FAST.lib.splits_rows  # the library the backend loaded here was built with OpenMP


def test_a_decodes_rows_through_the_vocabulary_head_are_the_references_within_fp32_rounding(monkeypatch):
    """The head over a decode's (or a verify step's) few rows multiplies its weight kept in panels of 32 outputs
    in C: every row count's tile path (8, 4, 2, 1 rows at a time), a vocabulary that is not a multiple of 32, rows
    as [B, S, K]; past `PANEL_ROWS` rows, or with gradients wanted, the "cpu" backend's product."""
    lib = _CountingLib(FAST.lib)
    monkeypatch.setattr(FAST, "lib", lib)
    gen = torch.Generator().manual_seed(0)
    n, k = cpu_kernels.VOCAB_ROWS + 7, 96
    head = torch.randn(n, k, generator=gen) * 0.1
    for rows in (1, 2, 3, 7, 13, native.PANEL_ROWS, native.PANEL_ROWS + 1):
        x = torch.randn(rows, 1, k, generator=gen) * 4
        calls = lib.calls["dsv4_panel_gemm"]
        got, want = FAST.linear(x, head), REF.linear(x, head)
        assert lib.calls["dsv4_panel_gemm"] == calls + (rows <= native.PANEL_ROWS), rows
        err = ((got - want).abs().amax(dim=-1) / want.abs().amax(dim=-1)).max().item()
        assert got.shape == want.shape and err <= 1e-5, (rows, err)
    x = torch.randn(2, k, generator=gen, requires_grad=True)
    calls = lib.calls["dsv4_panel_gemm"]
    FAST.linear(x, head).sum().backward()
    assert lib.calls["dsv4_panel_gemm"] == calls and x.grad is not None
    tight = native.NativeBackend(cache_mb=1)  # the panels (12.6 MB) do not fit: no copy is made for one call
    monkeypatch.setattr(tight, "lib", lib)
    _close(tight.linear(x.detach(), head), REF.linear(x.detach(), head), 1e-5)
    assert lib.calls["dsv4_panel_gemm"] == calls and tight.decoded.used_bytes == 0


def _near_ties(head: torch.Tensor, x: torch.Tensor, pairs, gen: torch.Generator) -> torch.Tensor:
    """`head` with rows (a, b) of each pair made x's two largest logits, b above a by about 1e-6 of them while
    their int8 codes differ by a step here and there (a random nudge of a code step's size): the screen's
    estimates cannot order them (about half the pairs come out the wrong way round), the bound must keep both."""
    head = head.clone()
    unit = x / x.norm()
    for a, b in pairs:
        base = torch.randn(head.shape[1], generator=gen) * 0.1
        base += (8 - base @ unit) * unit  # logit 8 |x|, far above every random row's
        nudge = torch.randn(head.shape[1], generator=gen) * (base.abs().max() / 127)
        nudge -= (nudge @ unit) * unit  # orthogonal to x: no change of the exact logit
        head[a], head[b] = base, base + nudge + 1e-6 * 8 * unit
    return head


def _row_error_ties(head: torch.Tensor, a: int, b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A row x [1, K] and `head` with rows a and b made x's two largest logits, b's the larger by about 1%, both
    rows exactly their int8 codes (a power-of-two scale: nothing for the weight's error to bound), while x's own
    codes p (x = t (p + f), t = 2^-5, |f| < 1/2: x^ = t p) order them the other way round by 20 code units: only
    the bound on x's error, |x - x^|_2 |w|_2, keeps b in the running."""
    k = head.shape[1]
    codes = torch.randint(-3, 4, (k,), generator=gen).double()
    frac = (torch.rand(k, generator=gen, dtype=torch.float64) - 0.5) * 0.9
    codes[0], frac[0] = 127, 0.0  # max |x| = 127 t: the kernel's scale is t
    codes[1:21], frac[1:21] = 1, 0.0  # where the pair's difference d is tuned: no error there
    d = torch.round(frac * 20 / 0.45)
    d[:21] = 0
    fix = -(codes @ d + 20)  # p . d = -20 exactly, spread over the twenty ones
    d[1:21] = torch.div(fix + torch.arange(20), 20, rounding_mode="floor")
    x = (codes + frac) * 2.0 ** -5
    assert codes @ d == -20 and float(x @ d) > 0  # x^ . d < 0 < x . d
    base = codes * 10
    base[0] = 127
    head = head.clone()
    head[a], head[b] = (base * 2.0 ** -5).float(), ((base + d) * 2.0 ** -5).float()
    return x.float().unsqueeze(0), head


@pytest.fixture(scope="module")
def portable_lib(tmp_path_factory):
    """The kernels built without AVX-512 VNNI: the greedy screen's integer sums in fp32 blocks instead of
    `vpdpbusd` (where the machine has no VNNI, the default build is this one too)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"-mno-avx512vnni is an x86 flag; this machine is {platform.machine()}")
    path = tmp_path_factory.mktemp("portable") / "dsv4_kernels_portable.so"
    return build._open(build._compile(build.compiler(), (*build.FLAGS, "-mno-avx512vnni"), path))


@pytest.mark.parametrize("kernels_built", ["default", "portable"])
def test_the_greedy_heads_screen_picks_the_panels_first_maximum(monkeypatch, request, kernels_built):
    """`greedy_head` over a decode's rows screens the vocabulary with int8 codes of the head and of the rows (exact
    integer sums: VNNI's or fp32 blocks') and computes exactly only the panels its error bound leaves in the
    running: the first maximum of the panels' own logits (`linear`), through every tile path, among exact ties (the
    lowest id, in one panel and across panels) and near ties the codes cannot order, for K a multiple of four and
    not. Rows the screen cannot settle (zero, NaN, infinite, so large the sums could overflow, a vocabulary too flat
    to narrow) take whole logits; so does a head with a non-finite element (no screen built) and a call that wants
    gradients."""
    built = FAST.lib if kernels_built == "default" else request.getfixturevalue("portable_lib")
    lib = _CountingLib(built)
    monkeypatch.setattr(FAST, "lib", lib)
    gen = torch.Generator().manual_seed(0)
    n, k = cpu_kernels.VOCAB_ROWS + 7, 96
    head = torch.randn(n, k, generator=gen) * 0.1

    def check(x, w, screened):
        calls = lib.calls["dsv4_head_greedy"]
        got, want = FAST.greedy_head(x, w), FAST.linear(x, w).max(dim=-1).indices
        assert got.dtype == torch.long and torch.equal(got, want), (got, want)
        assert lib.calls["dsv4_head_greedy"] == calls + screened

    for rows in (1, 2, 3, 7, 13, native.PANEL_ROWS):
        x = torch.randn(rows, 1, k, generator=gen) * 4
        check(x, head, 1)
        assert torch.equal(FAST.greedy_head(x, head), REF.greedy_head(x, head)), rows  # the oracle's tokens
    check(torch.randn(native.PANEL_ROWS + 1, k, generator=gen), head, 0)  # a prefill's rows: its logits
    tied = head.clone()
    tied[[41, 40, 5000, n - 1]] = tied[700].clone()  # 40 and 41 share a panel; n - 1 is in the short last one
    check(torch.stack([tied[700] * 3, -tied[700]]), tied, 1)
    # (not the reference's: BLAS rounds equal rows differently by where they fall, and picked the last one)
    assert FAST.greedy_head(tied[700] * 3, tied).item() == 40
    x = torch.randn(16, k, generator=gen)
    for i in range(16):  # a pair per row, the winner first or second, in one panel or apart
        a, b = [(100 + i, 30_000 + 37 * i), (30_000 + 37 * i, 100 + i), (64 + 2 * i, 65 + 2 * i)][i % 3]
        check(x[i:i + 1], _near_ties(head, x[i], [(a, b)], gen), 1)
    odd = torch.randn(5, k, generator=gen)
    odd[0], odd[1, 3], odd[2, 5], odd[3] = 0.0, float("nan"), float("inf"), odd[3] * 1e36
    check(odd, head, 1)
    check(torch.randn(2, k, generator=gen), head[:1].expand(n, k).contiguous(), 1)  # every logit ties
    broken = head.clone()
    broken[9, 9] = float("nan")
    check(torch.randn(2, k, generator=gen), broken, 0)
    wanted = torch.randn(2, k, generator=gen, requires_grad=True)
    check(wanted, head, 0)
    for a, b in [(200, 9_000), (9_000, 200), (64, 65), (n - 2, 33)]:
        check(*_row_error_ties(head, a, b, gen), 1)
    exact_x = torch.randint(-127, 128, (3, k), generator=gen).float() / 8  # x = x^: only the weight's error
    exact_x[:, 0] = 127 / 8
    for i in range(3):
        check(exact_x[i:i + 1], _near_ties(head, exact_x[i], [(300 + i, 20_000 + i)], gen), 1)
    ragged = torch.randn(n, k - 3, generator=gen) * 0.1  # K = 93: the codes' last group of four padded
    check(torch.randn(9, k - 3, generator=gen) * 4, ragged, 1)
    x = torch.randn(6, k - 3, generator=gen)
    check(x[:1], _near_ties(ragged, x[0], [(3, 20_000)], gen), 1)


@pytest.mark.parametrize("numerics", ["plain", "exact"])
def test_engine_greedy_tokens_through_the_screened_head_are_the_references(monkeypatch, numerics):
    """A vocabulary past `VOCAB_ROWS` (the screen's threshold): the engine's greedy decodes on the native backend,
    their tokens from `dsv4_head_greedy`, give the reference backend's tokens (plain fp32 and exact bf16 with FP8 /
    FP4 weights, the head fp32 in both)."""
    from test_cpu_backend import _greedy

    from dsv4.config import preset
    from dsv4.formats import to_official_formats
    from dsv4.model import Transformer, init_weights

    args = preset("tiny").replace(vocab_size=cpu_kernels.VOCAB_ROWS + 1000)
    dtype = torch.float32 if numerics == "plain" else torch.bfloat16
    model = init_weights(Transformer(args, dtype=dtype, numerics=numerics), seed=3).eval()
    if numerics == "exact":
        to_official_formats(model)
    prompts = torch.randint(0, args.vocab_size, (3, 40), generator=torch.Generator().manual_seed(3)).tolist()
    lib = _CountingLib(kernels.get_backend("native").lib)
    monkeypatch.setattr(kernels.get_backend("native"), "lib", lib)
    tokens = _greedy(model, prompts, "native")
    assert lib.calls["dsv4_head_greedy"] >= 24  # every decode step's tokens (the prompts' ends too)
    assert tokens == _greedy(model, prompts, "reference")
