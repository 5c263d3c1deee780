"""Tests for the pure-torch reference kernels against independent, naive formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv4.kernels import (
    act_quant,
    fp4_gemm,
    fp4_simulate,
    fp8_gemm,
    fp8_simulate,
    hadamard,
    hc_split_sinkhorn,
    linear,
    sparse_attn,
)
from dsv4.quant import pack_fp4, quantize_fp4_weight, quantize_fp8_weight

E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _e8m0_value(s: torch.Tensor) -> torch.Tensor:
    """Independent e8m0 decode in fp64: 2 ** (byte - 127)."""
    return torch.pow(2.0, s.view(torch.uint8).double() - 127)


def _blockwise(t: torch.Tensor, block: int, k: int) -> torch.Tensor:
    """Repeat per-block values [..., nb] to per-element [..., k]."""
    return t.repeat_interleave(block, dim=-1)[..., :k]


def _dequant_act(xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    return xq.double() * _blockwise(xs.double(), 128, xq.shape[-1])


def _dequant_fp8_w(w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    full = _e8m0_value(ws).repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return w.double() * full


def _dequant_fp4_w(packed: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Independent FP4 decode: low nibble first, code table lookup, times per-32 scale, in fp64."""
    raw = packed.view(torch.uint8).long()
    codes = torch.stack((raw & 15, raw >> 4), dim=-1).flatten(-2)
    values = torch.tensor(E2M1_VALUES, dtype=torch.float64)[codes]
    return values * _e8m0_value(ws).repeat_interleave(32, 1)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def _e4m3_representable(v: torch.Tensor) -> bool:
    return torch.equal(v.float().to(torch.float8_e4m3fn).float(), v.float())


# ---------------------------------------------------------------------------------------------- act_quant


def test_act_quant_scales_and_rounding():
    x = torch.randn(3, 5, 300, generator=_gen(0))
    x = x * torch.pow(10.0, torch.arange(300) // 128 - 1.0)  # three blocks (last one partial: 44)
    q, s = act_quant(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (3, 5, 3)
    log2s = torch.log2(s.double())
    assert torch.equal(log2s, log2s.round())
    for b in range(3):
        amax = x[..., b * 128 : (b + 1) * 128].abs().amax(-1).double()
        ratio = amax / s[..., b].double()
        assert bool(((ratio > 224) & (ratio <= 448)).all())
    deq = _dequant_act(q, s)
    rel = (deq - x.double()).abs() / _blockwise(s.double(), 128, 300)
    assert rel.max().item() <= 16  # half an ulp of the top binade [256, 448) is 16


def test_act_quant_zero_rows_use_amax_floor():
    x = torch.zeros(2, 256)
    x[1, 128:] = 1.0
    q, s = act_quant(x)
    floor_scale = 2.0 ** math.ceil(math.log2(1e-4 / 448))
    assert s[0].tolist() == [floor_scale, floor_scale] and s[1, 0].item() == floor_scale
    assert s[1, 1].item() == 2.0**-8  # 1/448 -> 2**ceil(-8.8)
    assert bool((q.float()[0] == 0).all()) and torch.isfinite(q.float()).all()


def test_act_quant_partial_last_block_is_its_own_block():
    x = torch.randn(4, 130, generator=_gen(1))
    x[:, 128:] = torch.tensor([1000.0, -3.0])
    q, s = act_quant(x)
    assert s.shape == (4, 2)
    assert s[:, 1].tolist() == [4.0] * 4  # 1000/448 -> 2**ceil(1.16)
    assert q.float()[:, 128:].tolist() == [[256.0, -0.75]] * 4  # 250 rounds to the e4m3 grid (step 16)
    q_head, s_head = act_quant(x[:, :128])
    assert torch.equal(s_head[:, 0], s[:, 0]) and torch.equal(q_head.float(), q.float()[:, :128])


def test_act_quant_custom_block_size():
    x = torch.randn(2, 96, generator=_gen(2))
    x[:, 32:64] *= 100
    q, s = act_quant(x, block_size=32)
    assert s.shape == (2, 3)
    assert bool((s[:, 1] > s[:, 0] * 16).all())


# ---------------------------------------------------------------------------------------------- GEMMs


def test_fp8_gemm_matches_dequantized_fp64_matmul():
    x = torch.randn(2, 3, 320, generator=_gen(3))
    w = torch.randn(200, 320, generator=_gen(4)) * 0.05
    xq, xs = act_quant(x)
    wq, ws = quantize_fp8_weight(w)
    y = fp8_gemm(xq, xs, wq, ws, torch.float32)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 200)
    ref = _dequant_act(xq, xs) @ _dequant_fp8_w(wq, ws).T
    assert _rel_err(y, ref) <= 1e-5
    assert fp8_gemm(xq, xs, wq, ws, torch.bfloat16).dtype == torch.bfloat16


def test_fp8_gemm_applies_each_block_scale():
    # Identical activation codes in every block with scales 2**(8b), weight tiles scaled 2**(-5r - 8b):
    # every block contributes about equally, so a misapplied scale anywhere breaks the fp64 match.
    g = _gen(5)
    k, n = 384, 256
    x = torch.randn(4, 128, generator=g).repeat(1, 3)
    x = x * _blockwise(torch.pow(256.0, torch.arange(3.0)), 128, k)
    w = torch.randn(n, k, generator=g) * torch.pow(2.0, -5.0 * (torch.arange(n) // 128)).unsqueeze(1)
    w = w * _blockwise(torch.tensor([1.0, 2.0**-8, 2.0**-16]), 128, k)
    xq, xs = act_quant(x)
    wq, ws = quantize_fp8_weight(w)
    assert len(set(xs[0].tolist())) == 3 and len(set(ws.view(torch.uint8).flatten().tolist())) == 6
    y = fp8_gemm(xq, xs, wq, ws, torch.float32)
    x_ref, w_ref = _dequant_act(xq, xs), _dequant_fp8_w(wq, ws)
    ref = x_ref @ w_ref.T
    for kb in range(3):  # every block contributes: removing one breaks the match
        cols = slice(kb * 128, (kb + 1) * 128)
        partial = x_ref[:, cols] @ w_ref[:, cols].T
        assert _rel_err(ref - partial, ref) > 1e-3
    assert ((y.double() - ref).abs() <= 1e-5 * ref.abs().amax(dim=0, keepdim=True)).all()


def _random_fp4_weight(n: int, k: int, seed: int, exps: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed codes [n, k/2] and e8m0 scales [n, k/32] with exponents in [exps[0], exps[1])."""
    g = _gen(seed)
    codes = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
    exps = torch.randint(exps[0], exps[1], (n, k // 32), generator=g)
    return pack_fp4(codes), (exps + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def test_fp4_gemm_matches_dequantized_fp64_matmul():
    x = torch.randn(2, 3, 192, generator=_gen(6))  # K=192: the activation's second 128-block is partial
    packed, ws = _random_fp4_weight(70, 192, seed=7, exps=(-10, -2))
    xq, xs = act_quant(x)
    y = fp4_gemm(xq, xs, packed, ws, torch.float32)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 70)
    ref = _dequant_act(xq, xs) @ _dequant_fp4_w(packed, ws).T
    assert _rel_err(y, ref) <= 1e-5
    for view in (torch.uint8, torch.float4_e2m1fn_x2):
        assert torch.equal(fp4_gemm(xq, xs, packed.view(view), ws, torch.float32), y)


def test_fp4_gemm_applies_each_sub_block_scale():
    # Weight scales spanning 2**-8 .. 2**8 per 32-group; activations alive in one 32-group at a time, so each
    # sub-block's factor xs[k//128] * ws[n, k//32] is checked on its own.
    x = torch.randn(5, 256, generator=_gen(8)) * _blockwise(torch.tensor([1e-3, 1e2]), 128, 256)
    packed, ws = _random_fp4_weight(48, 256, seed=9, exps=(-8, 9))
    xq, xs = act_quant(x)
    w_ref = _dequant_fp4_w(packed, ws)
    for j in range(256 // 32):
        mask = torch.zeros(256)
        mask[j * 32 : (j + 1) * 32] = 1
        xq_j = (xq.float() * mask).to(torch.float8_e4m3fn)
        y = fp4_gemm(xq_j, xs, packed, ws, torch.float32)
        assert _rel_err(y, _dequant_act(xq_j, xs) @ w_ref.T) <= 1e-5, j


# ---------------------------------------------------------------------------------------------- linear


def test_linear_fp8_weight():
    x = torch.randn(3, 256, generator=_gen(10)).to(torch.bfloat16)
    wq, ws = quantize_fp8_weight(torch.randn(136, 256, generator=_gen(11)) * 0.1)
    y = linear(x, wq, ws)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 136)
    xq, xs = act_quant(x)
    ref = _dequant_act(xq, xs) @ _dequant_fp8_w(wq, ws).T
    assert _rel_err(y, ref) <= 2**-8  # bf16 output rounding
    with pytest.raises(ValueError):
        linear(x, wq)


@pytest.mark.parametrize("view", [torch.int8, torch.float4_e2m1fn_x2])
def test_linear_fp4_weight(view: torch.dtype):
    x = torch.randn(2, 4, 128, generator=_gen(12)).to(torch.bfloat16)
    packed, ws = quantize_fp4_weight(torch.randn(40, 128, generator=_gen(13)))
    y = linear(x, packed.view(view), ws)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 4, 40)
    xq, xs = act_quant(x)
    ref = _dequant_act(xq, xs) @ _dequant_fp4_w(packed, ws).T
    assert _rel_err(y, ref) <= 2**-8


def test_linear_float_weight_is_plain_and_differentiable():
    x = torch.randn(3, 16, generator=_gen(14), requires_grad=True)
    w = torch.randn(8, 16, generator=_gen(15), requires_grad=True)
    y = linear(x, w)
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), x.double() @ w.double().T, atol=1e-5)
    y.sum().backward()
    assert torch.allclose(x.grad, w.detach().sum(0).expand(3, 16))
    assert torch.allclose(w.grad, x.detach().sum(0).expand(8, 16))
    y16 = linear(x.detach(), w.detach().to(torch.bfloat16))
    assert y16.dtype == torch.float32
    assert torch.equal(y16, F.linear(x.detach().bfloat16(), w.detach().bfloat16()).float())


# ------------------------------------------------------------------------------------------ QAT simulation


def _block_scale(x: torch.Tensor, block: int, elem_max: float, floor: float) -> torch.Tensor:
    """Per-element pow-2 scale 2**ceil(log2(max(amax, floor)/elem_max)) from an fp64 formula."""
    amax = x.double().unflatten(-1, (-1, block)).abs().amax(-1).clamp(min=floor)
    return _blockwise(torch.pow(2.0, torch.ceil(torch.log2(amax / elem_max))), block, x.shape[-1])


def test_fp8_simulate_on_grid_idempotent_and_close():
    x = torch.randn(4, 448, generator=_gen(16)) * _blockwise(torch.pow(3.0, torch.arange(7.0) - 3), 64, 448)
    y = fp8_simulate(x)
    assert y.dtype == torch.float32
    s = _block_scale(x, 64, 448.0, 1e-4)
    assert _e4m3_representable(y.double() / s)
    assert bool(((y.double() - x.double()).abs() <= 16 * s).all())
    assert ((y.double() - x.double()).abs() > 0).any()  # it really rounds
    assert torch.equal(fp8_simulate(y), y)


def test_fp8_simulate_keeps_bf16():
    x = torch.randn(2, 3, 128, generator=_gen(17)).to(torch.bfloat16)
    y = fp8_simulate(x)
    assert y.dtype == torch.bfloat16
    assert _e4m3_representable(y.double() / _block_scale(x, 64, 448.0, 1e-4))
    assert torch.equal(fp8_simulate(y), y)


def test_fp4_simulate_on_grid_and_idempotent():
    x = torch.randn(3, 128, generator=_gen(18)) * _blockwise(torch.tensor([1e-3, 1.0, 50.0, 1e-30]), 32, 128)
    y = fp4_simulate(x)
    s = _block_scale(x, 32, 6.0, 6 * 2.0**-126)
    scaled = y.double() / s
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    assert bool((scaled.unsqueeze(-1) == grid).any(-1).all())
    assert torch.equal(fp4_simulate(y), y)
    assert torch.equal(fp4_simulate(y.bfloat16()), y.bfloat16())


def test_fp4_simulate_amax_floor_flushes_tiny_blocks():
    # amax is floored at 6 * 2**-126, so the scale never drops below 2**-126 and 2**-128 / 2**-126 = 0.25
    # rounds (tie to even) to 0; without the floor the scale would be 2**-127 and the value would survive.
    x = torch.zeros(32)
    x[0], x[1] = 2.0**-128, 2.0**-125
    assert fp4_simulate(x)[:2].tolist() == [0.0, 2.0**-125]


def test_fp4_simulate_hand_example():
    block = torch.tensor([6.0, 0.75, 1.25, 2.5, 5.0, -3.5, 0.2, 1.75] + [0.0] * 24)  # amax 6 -> scale 1
    expected = [6.0, 1.0, 1.0, 2.0, 4.0, -4.0, 0.0, 2.0]
    assert fp4_simulate(block)[:8].tolist() == expected
    assert (fp4_simulate(block * 2.0**-20)[:8] * 2.0**20).tolist() == expected
    bumped = torch.tensor([7.0, 6.0, 0.75] + [0.0] * 29)  # amax 7 -> scale 2: 3.5 -> 4, 3 -> 3, 0.375 -> 0.5
    assert fp4_simulate(bumped)[:3].tolist() == [8.0, 6.0, 1.0]
    assert fp4_simulate(block.bfloat16()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- Hadamard


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)  # [[H, H], [H, -H]]
    return h


@pytest.mark.parametrize("n", [1, 2, 8, 128])
def test_hadamard_matches_kronecker_matrix(n: int):
    x = torch.randn(3, 2, n, generator=_gen(19), dtype=torch.float64)
    ref = x @ _sylvester(n) / math.sqrt(n)
    assert torch.allclose(hadamard(x), ref, rtol=0, atol=1e-12)
    y32 = hadamard(x.float())
    assert y32.dtype == torch.float32 and torch.allclose(y32.double(), ref, atol=1e-5)


def test_hadamard_is_an_involution_and_keeps_dtype():
    x = torch.randn(5, 64, generator=_gen(20))
    assert torch.allclose(hadamard(hadamard(x)), x, atol=1e-5)
    assert hadamard(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(torch.randn(2, 12))


def test_hadamard_gradcheck():
    x = torch.randn(2, 16, generator=_gen(21), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hadamard, (x,))


# ---------------------------------------------------------------------------------------------- sparse_attn


def _naive_sparse_attn(q, kv, idx, sink, scale, prob_dtype=torch.float64):
    """Per-query loop in fp64: softmax over the used slots plus the sink logit, which carries no value.

    As in the official kernel (one block, as here with <= 64 slots), the unnormalised weight exp(logit - max
    logit) is rounded to ``prob_dtype`` before it weights its value row; the sum is divided by the unrounded
    denominator (sink included) at the end.
    """
    b_, s_, h_, d_ = q.shape
    out = torch.zeros(b_, s_, h_, d_, dtype=torch.float64)
    for b in range(b_):
        for s in range(s_):
            rows = [int(i) for i in idx[b, s] if i >= 0]
            for h in range(h_):
                logits = [float(q[b, s, h].double() @ kv[b, r].double()) * scale for r in rows]
                top = max(logits) if logits else float(sink[h])
                weights = [math.exp(v - top) for v in logits]
                denom = sum(weights) + math.exp(float(sink[h]) - top)
                for w, r in zip(weights, rows, strict=True):
                    p = torch.tensor(w, dtype=torch.float64).to(prob_dtype).double()
                    out[b, s, h] += p * kv[b, r].double() / denom
    return out


def _attn_inputs(dtype: torch.dtype, seed: int):
    g = _gen(seed)
    b, s, h, d, n, k = 2, 3, 4, 8, 10, 5
    q = torch.randn(b, s, h, d, generator=g, dtype=dtype)
    kv = torch.randn(b, n, d, generator=g, dtype=dtype)
    idx = torch.randint(0, n, (b, s, k), generator=g)
    idx[0, 1, 2:] = -1  # some unused slots
    idx[1, 0, 0] = -1
    idx[1, 2, :] = -1  # a fully masked query
    sink = torch.randn(h, generator=g, dtype=dtype)
    return q, kv, idx, sink, 1.0 / math.sqrt(d)


def test_sparse_attn_matches_naive():
    q, kv, idx, sink, scale = _attn_inputs(torch.float32, seed=22)
    out = sparse_attn(q, kv, idx, sink, scale)
    assert out.dtype == torch.float32 and out.shape == q.shape
    ref = _naive_sparse_attn(q, kv, idx, sink, scale)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert bool((out[1, 2] == 0).all())
    # The sink matters: a very negative sink removes it, changing the result.
    far_sink = torch.full_like(sink, -1e4)
    no_sink = sparse_attn(q, kv, idx, far_sink, scale)
    assert torch.allclose(no_sink.double(), _naive_sparse_attn(q, kv, idx, far_sink, scale), atol=1e-5)
    assert not torch.allclose(no_sink, out, atol=1e-3)


def test_sparse_attn_rounds_probabilities_to_kv_dtype():
    q, kv, idx, sink, scale = _attn_inputs(torch.float32, seed=23)
    kv = kv.bfloat16()
    out = sparse_attn(q, kv, idx, sink, scale)
    assert out.dtype == torch.float32  # output follows q
    assert torch.allclose(out.double(), _naive_sparse_attn(q, kv, idx, sink, scale, torch.bfloat16), atol=1e-5)
    assert not torch.allclose(out.double(), _naive_sparse_attn(q, kv, idx, sink, scale), atol=1e-4)
    out16 = sparse_attn(q.bfloat16(), kv, idx, sink, scale)
    assert out16.dtype == torch.bfloat16
    ref16 = _naive_sparse_attn(q.bfloat16(), kv, idx, sink, scale, torch.bfloat16)
    assert torch.allclose(out16.double(), ref16, atol=2e-2)


def test_sparse_attn_gradcheck():
    q, kv, idx, sink, scale = _attn_inputs(torch.float64, seed=24)
    q = q[:1, :2, :2].clone().requires_grad_()  # [1, 2, 2, 8]
    kv = kv[:1].clone().requires_grad_()  # [1, 10, 8]
    sink = sink[:2].clone().requires_grad_()
    idx = idx[:1, :2].clone()  # query 1 has unused slots
    idx[0, 0, 1] = -1

    def fn(q_, kv_, sink_):
        return sparse_attn(q_, kv_, idx, sink_, scale)

    assert torch.autograd.gradcheck(fn, (q, kv, sink))


# ---------------------------------------------------------------------------------------------- mHC Sinkhorn


def _naive_sinkhorn(mix, scale, base, h, iters, eps):
    """Scalar loops over one token, straight from the spec's description."""
    m, sc, bs = mix.tolist(), scale.tolist(), base.tolist()
    pre = [1 / (1 + math.exp(-(m[j] * sc[0] + bs[j]))) + eps for j in range(h)]
    post = [2 / (1 + math.exp(-(m[h + j] * sc[1] + bs[h + j]))) for j in range(h)]
    c = [[m[2 * h + h * j + k] * sc[2] + bs[2 * h + h * j + k] for k in range(h)] for j in range(h)]
    for j in range(h):
        top = max(c[j])
        e = [math.exp(v - top) for v in c[j]]
        c[j] = [v / sum(e) + eps for v in e]

    def col_norm():
        for k in range(h):
            total = sum(c[j][k] for j in range(h)) + eps
            for j in range(h):
                c[j][k] /= total

    col_norm()
    for _ in range(iters - 1):
        for j in range(h):
            total = sum(c[j]) + eps
            c[j] = [v / total for v in c[j]]
        col_norm()
    return pre, post, c


def test_hc_split_sinkhorn_matches_loops():
    h, iters, eps = 4, 20, 1e-6
    g = _gen(25)
    mixes = torch.randn(2, 3, (2 + h) * h, generator=g) * 3
    scale = torch.rand(3, generator=g) + 0.5
    base = torch.randn((2 + h) * h, generator=g)
    pre, post, comb = hc_split_sinkhorn(mixes, scale, base, h, iters, eps)
    assert pre.shape == (2, 3, h) and post.shape == (2, 3, h) and comb.shape == (2, 3, h, h)
    assert pre.dtype == post.dtype == comb.dtype == torch.float32
    for b in range(2):
        for s in range(3):
            ref_pre, ref_post, ref_comb = _naive_sinkhorn(mixes[b, s], scale, base, h, iters, eps)
            assert torch.allclose(pre[b, s].double(), torch.tensor(ref_pre, dtype=torch.float64), atol=1e-6)
            assert torch.allclose(post[b, s].double(), torch.tensor(ref_post, dtype=torch.float64), atol=1e-6)
            assert torch.allclose(comb[b, s].double(), torch.tensor(ref_comb, dtype=torch.float64), atol=1e-6)


def test_hc_split_sinkhorn_converges_to_doubly_stochastic():
    h = 4
    g = _gen(27)
    mixes = torch.randn(64, (2 + h) * h, generator=g)
    scale = torch.rand(3, generator=g) + 0.5
    base = torch.randn((2 + h) * h, generator=g)
    _, _, comb = hc_split_sinkhorn(mixes, scale, base, h, 20, 1e-6)
    assert bool((comb > 0).all())
    assert torch.allclose(comb.sum(-2), torch.ones(64, h), atol=1e-5)  # the last step normalises columns
    assert torch.allclose(comb.sum(-1), torch.ones(64, h), atol=1e-3)
    _, _, one_step = hc_split_sinkhorn(mixes, scale, base, h, 1, 1e-6)
    assert (one_step.sum(-1) - 1).abs().max() > 1e-2  # one step alone is not doubly stochastic


def test_hc_split_sinkhorn_single_iteration_and_gradcheck():
    h = 2
    g = _gen(26)
    mixes = torch.randn(3, (2 + h) * h, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(3, generator=g, dtype=torch.float64, requires_grad=True)
    base = torch.randn((2 + h) * h, generator=g, dtype=torch.float64, requires_grad=True)
    _, _, comb = hc_split_sinkhorn(mixes, scale, base, h, 1, 1e-6)
    ref = _naive_sinkhorn(mixes[0].detach(), scale.detach(), base.detach(), h, 1, 1e-6)[2]
    assert torch.allclose(comb[0].detach(), torch.tensor(ref, dtype=torch.float64), atol=1e-12)

    def fn(m, sc, bs):
        return hc_split_sinkhorn(m, sc, bs, h, 3, 1e-6)

    assert torch.autograd.gradcheck(fn, (mixes, scale, base))
