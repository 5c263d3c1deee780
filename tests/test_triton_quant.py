"""The Triton block quantisers and Sinkhorn (`dsv4/kernels/triton/quant.py`, `sinkhorn.py`) against the reference.

The quantisers must equal the reference bit for bit (codes, scales and simulated values compared as integer bit
patterns, so -0.0 counts), on inputs that probe every rounding rule: ties of the e4m3 and e2m1 grids, block
maxima at and next to elem_max * 2**e (the largest code, or the next scale), zeros and negative zeros, all-zero
blocks, fp32 extremes and subnormals, partial last blocks, bf16 / fp16 inputs, blocks wider than one program's tile.

Sinkhorn follows the reference op for op and in its order of additions; only ``exp`` is another implementation's
(numpy's under the interpreter, the GPU's ``ex2`` on CUDA), so it is compared with rtol 1e-6 (atol 1e-7), and,
under the interpreter, bit for bit against the reference's op sequence run with numpy's exp.

On a machine without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest.py) on CPU tensors; with one, on CUDA tensors against the reference on CPU copies.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from dsv4.kernels.reference import ReferenceBackend  # noqa: E402
from dsv4.kernels.triton import quant, sinkhorn  # noqa: E402

REF = ReferenceBackend()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
_INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
           torch.float8_e4m3fn: torch.uint8, torch.uint8: torch.uint8}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of t on the CPU (so -0.0 != 0.0 and NaN payloads count)."""
    return t.detach().cpu().contiguous().view(_INT_OF[t.dtype])


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    same = _bits(got) == _bits(want)
    if not bool(same.all()):
        where = (~same).nonzero()[:5].tolist()
        got_v = [got.cpu()[tuple(i)].item() for i in where]
        want_v = [want[tuple(i)].item() for i in where]
        raise AssertionError(f"{int((~same).sum())} elements differ, first at {where}: got {got_v}, want {want_v}")


# ---------------------------------------------------------------------------------------------- inputs


def _e4m3_grid() -> torch.Tensor:
    """The 127 non-negative finite e4m3 values, increasing."""
    return torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def _ties(grid: torch.Tensor) -> torch.Tensor:
    """Midpoints of a grid and their fp32 neighbours, both signs."""
    mid = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1), grid])
    return torch.cat([near, -near])


def _fill_blocks(k: int, block: int, first: float, pool: torch.Tensor) -> torch.Tensor:
    """One row of k values: every block starts with `first` (which sets its scale), then cycles through pool."""
    row = pool.repeat(-(-k // len(pool)) + 1)[:k].clone()
    row[::block] = first
    return row


def _cases(k: int, block: int, seed: int = 0) -> torch.Tensor:
    """fp32 rows [R, k] probing the quantisers' rounding rules (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(4):  # random values over wide magnitudes, with zeros, negative zeros and powers of two
        x = torch.randn(k, generator=g) * 2.0 ** torch.randint(-24, 24, (1,), generator=g).float()
        x = x * torch.exp2(torch.randint(-8, 8, (k,), generator=g).float())
        x[::13] = 0.0
        x[5::17] = -0.0
        x[3::11] = torch.exp2(torch.randint(-10, 10, x[3::11].shape, generator=g).float())
        rows.append(x)
    rows.append(torch.zeros(k))  # all-zero blocks
    rows.append(torch.full((k,), -0.0))
    tiny = torch.tensor([1e-38, -3e-39, 1e-42, -1e-45, 0.0, -0.0, 2.0**-126, 2.0**-149])
    rows.append(tiny[torch.randint(0, len(tiny), (k,), generator=g)])  # subnormal-only blocks: the amax floors
    huge = torch.tensor([3e38, -1.7e38, 1.0, -2.0**100, 1e-30, 0.0, 2.0**127, -1e20])
    rows.append(huge[torch.randint(0, len(huge), (k,), generator=g)])
    # e4m3 ties under scale 1 (block amax 447 -> ratio < 1), e2m1 ties under scale 1 (amax 5.5)
    for first, grid in ((447.0, _e4m3_grid()), (5.5, torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]))):
        pool = _ties(grid)
        pool = pool[pool.abs() <= first]
        rows.append(_fill_blocks(k, block, first, pool[torch.randperm(len(pool), generator=g)]))
    # ratios at and one to three ulps above a power of two: amax = 448 * 2**e and 6 * 2**e, nudged (the largest
    # value lands on elem_max exactly, or the scale doubles)
    for elem_max in (448.0, 6.0):
        amax = elem_max * torch.exp2(torch.randint(-20, 20, (k,), generator=g).float())
        amax = amax * (1 + torch.randint(0, 4, (k,), generator=g).float() * 2.0**-23)
        row = torch.randn(k, generator=g) * amax / 8
        row[::block] = amax[::block] * torch.where(torch.rand(row[::block].shape, generator=g) < 0.5, 1.0, -1.0)
        rows.append(row)
    return torch.stack(rows)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype, finite (fp16 inputs are clamped to its range first)."""
    if dtype == torch.float16:
        x = x.clamp(-60000.0, 60000.0)
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------- quantisers


# values near the top of fp32's (fp16's) range simulate through FP4 to inf, in the reference too
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_quantisers_bit_exact(dtype, block):
    k = 2 * block + block // 2 + 3  # a partial last block
    x = _as(_cases(k, block, seed=block), dtype)
    assert bool(x.isfinite().all())
    xd = x.to(DEVICE)
    q, s = quant.act_quant(xd, block)
    rq, rs = REF.act_quant(x, block)
    assert_bit_equal(q, rq)
    assert_bit_equal(s, rs)
    assert_bit_equal(quant.fp8_simulate(xd, block), REF.fp8_simulate(x, block))
    c, cs = quant.fp4_quant(xd, block)
    rc, rcs = REF.fp4_quant(x, block)
    assert_bit_equal(c, rc)
    assert_bit_equal(cs, rcs)
    assert_bit_equal(quant.fp4_simulate(xd, block), REF.fp4_simulate(x, block))


def test_quantisers_known_codes():
    """Independent of the reference: known codes at the grids' ties and at saturation."""
    e4m3 = torch.tensor([447.0, 0.5 * (1 + 1.125), 0.5 * (1.125 + 1.25), 432.0, 2.0**-10, 3 * 2.0**-10, -0.0, -1e-30])
    q, s = quant.act_quant(e4m3.to(DEVICE), 8)
    assert s.item() == 1.0
    want = torch.tensor([448.0, 1.0, 1.25, 448.0, 0.0, 2.0**-8, -0.0, -0.0])  # ties to the even mantissa
    assert_bit_equal(q.float().cpu(), want)
    e2m1 = torch.tensor([5.5, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.9, 0.0, -1e-30, 2.9, 1.3, -0.0, 6.0])
    c, s = quant.fp4_quant(e2m1.to(DEVICE), 16)
    assert s.item() == 1.0
    assert c.cpu().tolist() == [7, 0, 2, 2, 4, 4, 6, 6, 8, 15, 0, 8, 5, 3, 8, 7]
    # an amax of exactly elem_max * 2**e gets the scale 2**e (the ratio's rounding stays at the power of two), one
    # ulp more the next scale up
    for elem_max, fn, want_codes in ((448.0, quant.act_quant, [0x7E, 0x76]), (6.0, quant.fp4_quant, [7, 5])):
        exact = torch.tensor(elem_max * 2.0**-3)
        for x, scale, code in ((exact, 2.0**-3, want_codes[0]), (torch.nextafter(exact, exact * 2), 2.0**-2,
                                                                   want_codes[1])):
            c, s = fn(torch.stack([x, -x / 3]).to(DEVICE), 2)
            assert s.item() == scale and c.view(torch.uint8)[0].item() == code

@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_quantisers_shapes_and_layouts(monkeypatch):
    """1-D, 3-D, K < block, K = 1, strided rows, a transposed input, no rows, and blocks wider than a tile."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 160, generator=g) * torch.exp2(torch.randint(-8, 8, (6, 160), generator=g).float())
    cases = [(base[0], 64), (base.view(2, 3, 160), 32), (base[:, :20], 128), (base[:, :1], 32),
             (base[:, 7:150], 64), (base[:, :48].t(), 4), (base[:0], 64)]
    for x, block in cases:
        xd = x.to(DEVICE)
        q, s = quant.act_quant(xd, block)
        rq, rs = REF.act_quant(x, block)
        assert_bit_equal(q, rq)
        assert_bit_equal(s, rs)
        c, cs = quant.fp4_quant(xd, block)
        rc, rcs = REF.fp4_quant(x, block)
        assert_bit_equal(c, rc)
        assert_bit_equal(cs, rcs)
    # a block wider than a program's tile is read in chunks (the path of blocks over 4096 columns)
    monkeypatch.setattr(quant, "_MAX_TILE", 64)
    x = _cases(300, 128, seed=3)[4:]
    xd = x.to(DEVICE)
    for block in (128, 256):
        q, s = quant.act_quant(xd, block)
        rq, rs = REF.act_quant(x, block)
        assert_bit_equal(q, rq)
        assert_bit_equal(s, rs)
        assert_bit_equal(quant.fp4_simulate(xd.bfloat16(), block), REF.fp4_simulate(x.bfloat16(), block))


def test_quant_covers():
    x = torch.randn(3, 64)
    assert quant.covers(x, 64) and quant.covers(x.bfloat16(), 128) and quant.covers(x.half(), 1)
    assert not quant.covers(x.double(), 64)
    assert not quant.covers(x, 48)  # not a power of two
    assert not quant.covers(x, 0)
    assert not quant.covers(torch.randn(3, 0), 64)
    assert not quant.covers(torch.randn(()), 64)
    w = x.clone().requires_grad_()
    assert not quant.covers(w, 64)
    with torch.no_grad():
        assert quant.covers(w, 64)
    with pytest.raises(ValueError):
        quant.act_quant(x.double(), 64)


# ---------------------------------------------------------------------------------------------- Sinkhorn

H = 4
WIDTH = (2 + H) * H


def _mhc_inputs(shape, magnitude, seed, h=H, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    width = (2 + h) * h
    mixes = (torch.randn(*shape, width, generator=g) * magnitude).to(dtype)
    scale = torch.rand(3, generator=g) * 2 + 0.5
    base = torch.randn(width, generator=g) * 0.5
    return mixes, scale, base


def _run_sinkhorn(mixes, scale, base, h, iters, eps):
    got = sinkhorn.hc_split_sinkhorn(mixes.to(DEVICE), scale.to(DEVICE), base.to(DEVICE), h, iters, eps)
    return [t.cpu() for t in got]


def _np_exp(t: torch.Tensor) -> torch.Tensor:
    with np.errstate(over="ignore"):
        return torch.from_numpy(np.exp(t.numpy()))


def _reference_numpy_exp(mixes, scale, base, h, iters, eps):
    """`ReferenceBackend.hc_split_sinkhorn`'s op sequence (fp32) with numpy's exp, the interpreter's."""
    m = mixes.float()
    sig = lambda z: 1.0 / (1.0 + _np_exp(-z))  # noqa: E731
    pre = sig(m[..., :h] * scale[0] + base[:h]) + eps
    post = 2.0 * sig(m[..., h : 2 * h] * scale[1] + base[h : 2 * h])
    logits = (m[..., 2 * h :] * scale[2] + base[2 * h :]).unflatten(-1, (h, h))
    comb = _np_exp(logits - logits.amax(dim=-1, keepdim=True))
    comb = comb / comb.sum(dim=-1, keepdim=True) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("shape", [(1,), (7,), (300,), (2, 5)])
@pytest.mark.parametrize("magnitude", [0.1, 1.0, 10.0])
def test_sinkhorn_matches_reference(shape, magnitude):
    mixes, scale, base = _mhc_inputs(shape, magnitude, seed=len(shape) * 100 + shape[-1])
    got = _run_sinkhorn(mixes, scale, base, H, 20, 1e-6)
    want = REF.hc_split_sinkhorn(mixes, scale, base, H, 20, 1e-6)
    for g, w, n in zip(got, want, ("pre", "post", "comb"), strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape, n
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    if INTERPRETING:  # everything but exp is the reference's arithmetic: bit for bit with the same exp
        for g, w in zip(got, _reference_numpy_exp(mixes, scale, base, H, 20, 1e-6), strict=True):
            assert_bit_equal(g, w)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("h,iters,dtype", [(4, 1, torch.float32), (4, 20, torch.bfloat16), (3, 5, torch.float32),
                                           (2, 20, torch.float32)])
def test_sinkhorn_variants(h, iters, dtype):
    """One iteration, bf16 mixes, and an h that is padded to a power of two (3) or smaller (2)."""
    mixes, scale, base = _mhc_inputs((3, 11), 1.0, seed=h * 10 + iters, h=h, dtype=dtype)
    got = _run_sinkhorn(mixes, scale, base, h, iters, 1e-6)
    want = REF.hc_split_sinkhorn(mixes, scale, base, h, iters, 1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    if INTERPRETING:
        for g, w in zip(got, _reference_numpy_exp(mixes, scale, base, h, iters, 1e-6), strict=True):
            assert_bit_equal(g, w)


def test_sinkhorn_covers():
    mixes = torch.randn(5, WIDTH)
    assert sinkhorn.covers(mixes, H, 20) and sinkhorn.covers(mixes.bfloat16(), H, 1)
    assert sinkhorn.covers(torch.randn(2, 3, 15), 3, 20)
    assert not sinkhorn.covers(mixes, H, 0)
    assert not sinkhorn.covers(mixes, 3, 20)  # wrong width
    assert not sinkhorn.covers(mixes.double(), H, 20)
    assert not sinkhorn.covers(mixes.half(), H, 20)
    assert not sinkhorn.covers(torch.randn(2, (2 + 32) * 32), 32, 20)  # h above 16
    w = mixes.clone().requires_grad_()
    assert not sinkhorn.covers(w, H, 20)
    with torch.no_grad():
        assert sinkhorn.covers(w, H, 20)
    assert not sinkhorn.covers(mixes, H, 20, scale=torch.ones(3, requires_grad=True))
    assert not sinkhorn.covers(mixes, H, 20, base=torch.zeros(WIDTH, dtype=torch.float64))
    with pytest.raises(ValueError):
        sinkhorn.hc_split_sinkhorn(mixes, torch.ones(3), torch.zeros(WIDTH), H, 0, 1e-6)
    empty = sinkhorn.hc_split_sinkhorn(torch.randn(0, WIDTH), torch.ones(3), torch.zeros(WIDTH), H, 20, 1e-6)
    assert [tuple(t.shape) for t in empty] == [(0, H), (0, H), (0, H, H)]
