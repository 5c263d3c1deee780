"""The Triton mHC reads and writes of the streams (`dsv4/kernels/triton/mhc.py`: `hc_pre`, `hc_collapse`,
`hc_post`) against the reference.

The collapse and the write-back are the reference's arithmetic term for term (products rounded, the h terms added
in order), so they are compared bit for bit, on both of the reference's paths (under and over its term-by-term
threshold of tokens). `hc_pre`'s product with the mixing map sums in the dot's order, so its coefficients are held
to fp32 rounding and its collapsed input to one step of its dtype; its split of the h*d values depends on h*d
alone, so a token's results do not depend on the batch around it (bit for bit).

On a machine without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest.py) on CPU tensors; with one, on CUDA tensors against the reference on CPU copies.
"""

from __future__ import annotations

import pytest
import torch
from test_triton_rows import _on, _rand, _steps

pytest.importorskip("triton")

from dsv4.kernels.reference import HC_TERMWISE_TOKENS, ReferenceBackend  # noqa: E402
from dsv4.kernels.triton import mhc  # noqa: E402

REF = ReferenceBackend()


def _map(h: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fn [(2+h)*h, h*d], scale [3], base [(2+h)*h] at the trained model's magnitudes."""
    m = (2 + h) * h
    return _rand(m, h * d, seed=seed, scale=0.02), _rand(3, seed=seed + 1).abs() + 0.5, _rand(m, seed=seed + 2) * 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lead", "h", "d"), [((1, 1), 4, 512), ((2, 5), 4, 300), ((1, 3), 3, 1100), ((2, 1), 2, 64)])
def test_hc_pre_matches_the_reference(dtype, lead, h, d):
    """h*d from 128 to 3,300 values (one to four partial products, a partial last chunk), h padded (3) or not."""
    x = _rand(*lead, h, d, seed=d, dtype=dtype)
    fn, scale, base = _map(h, d, seed=h)
    got = [t.cpu() for t in mhc.hc_pre(_on(x), _on(fn), _on(scale), _on(base), h, 20, 1e-6, 1e-6)]
    want = REF.hc_pre(x, fn, scale, base, h, 20, 1e-6, 1e-6)
    for g, w, name in zip(got, want, ("u", "post", "comb"), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
    torch.testing.assert_close(got[1], want[1], rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=2e-6, atol=1e-6)
    if dtype == torch.float32:  # (u sums h terms of |x| ~ 3: a cancelling sum keeps their absolute error)
        torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=5e-6)
    else:
        assert _steps(got[0], want[0]) <= 1


def test_a_tokens_hc_pre_does_not_depend_on_its_batch():
    x = _rand(1, 37, 4, 300, seed=20, dtype=torch.bfloat16)
    fn, scale, base = _map(4, 300, seed=21)
    batch = mhc.hc_pre(_on(x), _on(fn), _on(scale), _on(base), 4, 20, 1e-6, 1e-6)
    for i in (0, 17, 36):
        alone = mhc.hc_pre(_on(x[:, i : i + 1]), _on(fn), _on(scale), _on(base), 4, 20, 1e-6, 1e-6)
        for a, b in zip(alone, batch, strict=True):
            assert torch.equal(a.cpu(), b.cpu()[:, i : i + 1])


@pytest.mark.parametrize("h", [4, 3])
def test_hc_pre_collapses_in_the_sinkhorn_launch_whatever_the_tiling(h, monkeypatch):
    """The Sinkhorn and the collapse are one launch: under a GPU's tiling (256 columns of one token a program) the
    programs past the first column block compute the tokens' pre again for their own columns; the result is the
    interpreter's tiling's (one program over whole rows, where only the first block's path runs), bit for bit. Two
    launches in all."""
    x = _rand(1, 3, h, 600, seed=h, dtype=torch.bfloat16)
    fn, scale, base = _map(h, 600, seed=5)
    whole = mhc.hc_pre(_on(x), _on(fn), _on(scale), _on(base), h, 20, 1e-6, 1e-6)
    launches = []
    kernels = (mhc._mixes_partials_kernel, mhc._sinkhorn_collapse_kernel)
    for kernel in kernels:
        monkeypatch.setattr(kernel, "run", lambda *a, _run=kernel.run, _k=kernel, **kw: (launches.append(_k),
                                                                                         _run(*a, **kw))[1])
    monkeypatch.setattr(mhc, "interpreting", lambda: False)
    tiled = mhc.hc_pre(_on(x), _on(fn), _on(scale), _on(base), h, 20, 1e-6, 1e-6)
    assert launches == list(kernels)
    for a, b in zip(whole, tiled, strict=True):
        assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "gpu_tiles"), [(1, False), (5, False), (HC_TERMWISE_TOKENS + 3, False), (1, True),
                                                   (5, True)])
@pytest.mark.parametrize("h", [4, 3])
def test_hc_collapse_and_post_equal_the_reference_bit_for_bit(dtype, tokens, h, gpu_tiles, monkeypatch):
    """Under the interpreter's tiling (whole rows of many tokens a program) and a GPU's (256 columns of one token:
    a program a token and block, which the interpreter runs one by one, so on a few tokens)."""
    if gpu_tiles:
        monkeypatch.setattr(mhc, "interpreting", lambda: False)
    d = 300
    x = _rand(1, tokens, h, d, seed=tokens, dtype=dtype)
    out = _rand(1, tokens, d, seed=tokens + 1, dtype=dtype)
    pre = _rand(1, tokens, h, seed=2).sigmoid()
    post = 2 * _rand(1, tokens, h, seed=3).sigmoid()
    comb = _rand(1, tokens, h, h, seed=4).softmax(-1)
    got = mhc.hc_collapse(_on(x), _on(pre)).cpu()
    assert got.dtype == dtype and torch.equal(got, REF.hc_collapse(x, pre))
    got = mhc.hc_post(_on(out), _on(x), _on(post), _on(comb)).cpu()
    assert got.dtype == dtype and torch.equal(got, REF.hc_post(out, x, post, comb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "h", "d"), [(1, 4, 512), (5, 4, 384), (3, 3, 200), (2, 4, 4096)])
@pytest.mark.parametrize("quantize", [True, False])
@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interpreter_tiles", "gpu_tiles"])
def test_hc_pre_norm_is_hc_pre_then_the_norm_in_its_two_launches(dtype, tokens, h, d, quantize, gpu_tiles,
                                                                 monkeypatch):
    """`hc_pre_norm`: the collapse's programs take whole rows and norm them (and quantise them) as they store them,
    two launches in all; post and comb are `hc_pre`'s, the normed rows and their e4m3 codes and scales those of
    `rms_norm_quant`'s kernel over `hc_pre`'s rows, bit for bit (the same row tiles, so the norm's sum is the
    same). Widths not a power of two nor a multiple of the quantisation block; V4's 4,096."""
    from dsv4.kernels.triton import rows

    x = _rand(1, tokens, h, d, seed=d + h, dtype=dtype)
    fn, scale, base = _map(h, d, seed=h + 1)
    weight = _rand(d, seed=3).abs() + 0.5
    args = (_on(x), _on(fn), _on(scale), _on(base), h, 20, 1e-6, 1e-6)
    if gpu_tiles:
        monkeypatch.setattr(mhc, "interpreting", lambda: False)
        monkeypatch.setattr(rows, "interpreting", lambda: False)
    u, post, comb = mhc.hc_pre(*args)
    launches = []
    kernels = (mhc._mixes_partials_kernel, mhc._sinkhorn_collapse_kernel)
    for kernel in kernels:
        monkeypatch.setattr(kernel, "run", lambda *a, _run=kernel.run, _k=kernel, **kw: (launches.append(_k),
                                                                                         _run(*a, **kw))[1])
    normed, quantized, post2, comb2 = mhc.hc_pre_norm(*args, _on(weight), 1e-5, quantize)
    assert launches == list(kernels)
    assert torch.equal(post2, post) and torch.equal(comb2, comb)
    if quantize:
        want, (codes, scales) = rows.rms_norm_quant(u, _on(weight), 1e-5)
        assert torch.equal(quantized[0].view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(quantized[1], scales) and quantized[1].shape == (1, tokens, -(-d // 128))
    else:
        want = rows.rms_norm(u, _on(weight), 1e-5)
        assert quantized is None
    assert normed.dtype == dtype and torch.equal(normed, want)
    ref_normed, ref_quantized, _, _ = REF.hc_pre_norm(x, fn, scale, base, h, 20, 1e-6, 1e-6, weight, 1e-5, quantize)
    if dtype == torch.float32:  # (hc_pre's cancelling sums' absolute error, scaled by the norm)
        torch.testing.assert_close(normed.cpu(), ref_normed, rtol=1e-5, atol=5e-5)
    else:  # (u one bf16 step from the reference's, as `hc_pre`'s test allows, then the norm's own step)
        assert _steps(normed.cpu(), ref_normed) <= 2
    assert (ref_quantized is None) == (not quantize)


def test_what_the_fused_norm_covers():
    x = torch.zeros(1, 2, 4, 64)
    fn, scale, base = _map(4, 64, seed=0)
    assert mhc.covers_pre_norm(x, fn, scale, base, 4, 20, torch.ones(64))
    assert not mhc.covers_pre_norm(x, fn, scale, base, 4, 20, torch.ones(64, dtype=torch.float64))
    assert not mhc.covers_pre_norm(x, fn, scale, base, 4, 20, torch.ones(32))  # (not the rows' width)
    assert not mhc.covers_pre_norm(x, fn, scale, base, 4, 20, torch.ones(64, requires_grad=True))
    wide = torch.zeros(1, 1, 1, 32768)  # a row wider than a program norms whole
    assert not mhc.covers_pre_norm(wide, *_map(1, 32768, seed=0), 1, 20, torch.ones(32768))


def test_what_the_mhc_kernels_cover():
    x = torch.randn(2, 3, 4, 64)
    fn, scale, base = _map(4, 64, seed=0)
    post, comb, out = torch.rand(2, 3, 4), torch.rand(2, 3, 4, 4), torch.randn(2, 3, 64)
    assert mhc.covers_pre(x, fn, scale, base, 4, 20) and mhc.covers_post(out, x, post, comb)
    assert mhc.covers_collapse(x, post)
    assert not mhc.covers_pre(x, fn, scale, base, 4, 0)
    assert not mhc.covers_pre(x, fn[:, :128], scale, base, 4, 20)  # the map's width is not h*d
    assert not mhc.covers_pre(x.double(), fn, scale, base, 4, 20)
    assert not mhc.covers_pre(x, fn, scale.double(), base, 4, 20)
    assert not mhc.covers_pre(x.transpose(-1, -2), fn, scale, base, 4, 20)
    assert not mhc.covers_post(out, x, post.double(), comb)
    assert not mhc.covers_post(out[..., :32], x, post, comb)
    assert not mhc.covers_collapse(x, post.bfloat16())
    wants = x.clone().requires_grad_()
    assert not mhc.covers_pre(wants, fn, scale, base, 4, 20) and not mhc.covers_post(out, wants, post, comb)
    with torch.no_grad():
        assert mhc.covers_pre(wants, fn, scale, base, 4, 20)


def _head_map(h: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hc head's fn [h, h*d], scale [1], base [h]."""
    return _rand(h, h * d, seed=seed, scale=0.02), _rand(1, seed=seed + 1).abs() + 0.5, _rand(h, seed=seed + 2) * 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lead", "h", "d", "gpu_tiles"), [((1, 1), 4, 512, False), ((2, 5), 4, 300, False),
                                                           ((1, 3), 3, 1100, False), ((2, 1), 4, 600, True)])
def test_hc_head_matches_the_reference(dtype, lead, h, d, gpu_tiles, monkeypatch):
    """The head's pre from the partial products (its h mixes, one scale) and the collapse, in `hc_pre`'s two
    launches: the mixes sum in the dot's order, so the result is held to `hc_pre`'s tolerance of its collapsed
    input; the same under a GPU's tiling (256 columns of one token a program, each computing its tokens' pre)."""
    x = _rand(*lead, h, d, seed=d, dtype=dtype)
    fn, scale, base = _head_map(h, d, seed=h)
    want = REF.hc_head(x, fn, scale, base, 1e-6, 1e-6)
    whole = mhc.hc_head(_on(x), _on(fn), _on(scale), _on(base), 1e-6, 1e-6).cpu()
    launches = []
    kernels = (mhc._mixes_partials_kernel, mhc._sinkhorn_collapse_kernel)
    for kernel in kernels:
        monkeypatch.setattr(kernel, "run", lambda *a, _run=kernel.run, _k=kernel, **kw: (launches.append(_k),
                                                                                         _run(*a, **kw))[1])
    if gpu_tiles:
        monkeypatch.setattr(mhc, "interpreting", lambda: False)
    got = mhc.hc_head(_on(x), _on(fn), _on(scale), _on(base), 1e-6, 1e-6).cpu()
    assert launches == list(kernels)
    assert torch.equal(got, whole)  # (a token's pre does not depend on the tiling)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == (*lead, d)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=5e-6)
    else:
        assert _steps(got, want) <= 1
    # the reference is the formula: sigmoid(mixes * scale + base) + eps weighting the streams
    pre = torch.sigmoid(REF.hc_mixes(x, fn, 1e-6) * scale + base) + 1e-6
    assert torch.equal(want, (pre.unsqueeze(-1) * x.float()).sum(dim=-2).to(dtype))


def test_what_the_hc_head_kernel_covers():
    x = torch.randn(2, 3, 4, 64)
    fn, scale, base = _head_map(4, 64, seed=0)
    assert mhc.covers_head(x, fn, scale, base) and mhc.covers_head(x.bfloat16(), fn, scale, base)
    assert not mhc.covers_head(x, fn[:, :128], scale, base)  # the map's width is not h*d
    assert not mhc.covers_head(x, _map(4, 64, seed=0)[0], scale, base)  # a block's map, not the head's
    assert not mhc.covers_head(x, fn, scale.expand(3), base)
    assert not mhc.covers_head(x, fn, scale, base[:3])
    assert not mhc.covers_head(x.double(), fn, scale, base)
    assert not mhc.covers_head(x, fn.double(), scale, base)
    assert not mhc.covers_head(x.transpose(-1, -2), fn, scale, base)
    wants = fn.clone().requires_grad_()
    assert not mhc.covers_head(x, wants, scale, base)
    with torch.no_grad():
        assert mhc.covers_head(x, wants, scale, base)
