"""The Triton row ops (`dsv4/kernels/triton/rows.py`: `rms_norm`, `head_norm` with the rotation fused, `rope`)
against the reference.

The rotation is the reference's arithmetic product for product, so `rope` is compared bit for bit, and the fused
head norm + rope must equal the kernel's own head norm followed by the reference's rope, bit for bit. The norms
sum their squares in a reduction tree where torch's CPU sum keeps several running sums, and torch's CPU bf16
rsqrt is not correctly rounded (it even differs between its vectorised and scalar loops), so the norms are held
to fp32 rounding (fp32) or to one step of the output dtype (bf16 / fp16; two for the head norm, whose reference
rounds its rsqrt in bf16).

On a machine without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest.py) on CPU tensors; with one, on CUDA tensors against the reference on CPU copies.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.kernels.reference import ReferenceBackend  # noqa: E402
from dsv4.kernels.triton import rows  # noqa: E402

REF = ReferenceBackend()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _rand(*shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _steps(got: torch.Tensor, want: torch.Tensor) -> int:
    """The largest distance in representable values of the dtype between two tensors of finite values."""
    a, b = (t.detach().cpu().contiguous().view(_INT[t.dtype]).to(torch.int64) for t in (got, want))
    # sign-magnitude to a monotone integer line, so -0.0 and +0.0 are next to each other
    a, b = (torch.where(t < 0, -(t & ~(-1 << (8 * got.element_size() - 1))), t) for t in (a, b))
    return int((a - b).abs().max()) if a.numel() else 0


def _on(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEVICE)


@pytest.fixture(params=[False, True], ids=["interpreter_tiles", "gpu_tiles"])
def tiles(request, monkeypatch):
    """The row kernels' tiling: the interpreter's (many rows a program) or a GPU's (4,096 elements a program)."""
    if request.param:
        monkeypatch.setattr(rows, "interpreting", lambda: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 96), (2, 300), (4, 1, 1000), (9, 7, 1024)])
def test_rms_norm_matches_the_reference(dtype, shape, tiles):
    x = _rand(*shape, seed=shape[-1], dtype=dtype, scale=3.0)
    weight = _rand(shape[-1], seed=1).abs() + 0.5
    got = rows.rms_norm(_on(x), _on(weight), 1e-6).cpu()
    want = REF.rms_norm(x, weight, 1e-6)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    else:
        assert _steps(got, want) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 96), (2, 300), (4, 1, 1000), (9, 7, 1024), (2, 2, 3200)])
def test_rms_norm_quant_is_the_norm_then_act_quant_in_one_launch(dtype, shape, tiles):
    """The normed rows bit for bit the kernel's `rms_norm`, and their quantisation bit for bit the reference's
    act_quant of them: rows narrower than a block of 128, partial last blocks, several blocks; scales of a wide
    range (rows scaled from 2**-20 to 2**20; fp16 from 2**-6 to 2**6)."""
    x = _rand(*shape, seed=shape[-1] + 1, dtype=torch.float32, scale=3.0)
    if len(shape) > 2:
        reach = 6 if dtype == torch.float16 else 20
        x = x * torch.exp2(torch.linspace(-reach, reach, x.shape[-2])).unsqueeze(-1)
    x = x.to(dtype)
    weight = _rand(shape[-1], seed=2).abs() + 0.5
    y, (q, scale) = rows.rms_norm_quant(_on(x), _on(weight), 1e-6)
    assert torch.equal(y.cpu(), rows.rms_norm(_on(x), _on(weight), 1e-6).cpu())
    want_q, want_scale = REF.act_quant(y.cpu())
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == want_scale.shape
    assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(scale.cpu(), want_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_norm_matches_the_reference(dtype):
    q = _rand(2, 3, 8, 64, seed=3, dtype=dtype, scale=2.0)
    got = rows.head_norm(_on(q), 1e-6).cpu()
    want = REF.head_norm(q, 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    else:
        assert _steps(got, want) <= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_head_norm_with_rope_is_the_norm_then_the_references_rotation(dtype, inplace, tiles):
    """Queries [B,S,H,D] with one rotation a token ([B,S,1,half]: broadcast over the heads), 8 of 64 dims
    rotated; `inplace` writes over the queries."""
    q = _rand(2, 3, 80, 64, seed=4, dtype=dtype, scale=2.0)  # (80 heads: several programs of a GPU's tiling)
    cos, sin = _rand(2, 3, 1, 8, seed=5), _rand(2, 3, 1, 8, seed=6)
    normed = rows.head_norm(_on(q), 1e-6).cpu()
    target = _on(q.clone())
    got = rows.head_norm(target, 1e-6, _on(cos), _on(sin), inplace=inplace)
    assert (got.data_ptr() == target.data_ptr()) == inplace
    assert torch.equal(got.cpu(), REF.rope(normed, cos, sin))
    if dtype == torch.float32:
        torch.testing.assert_close(got.cpu(), REF.head_norm(q, 1e-6, cos, sin), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_rope_equals_the_reference_bit_for_bit(dtype, inverse, inplace, tiles):
    """Keys [B,S,D] with a rotation a token, and queries [B,S,H,D] read through a view with a row stride wider
    than D (the heads of a larger tensor)."""
    kv = _rand(2, 7, 48, seed=7, dtype=dtype)
    cos, sin = _rand(2, 7, 8, seed=8), _rand(2, 7, 8, seed=9)
    wide = _rand(2, 3, 4, 80, seed=10, dtype=dtype)
    q = wide[..., :64]
    qcos, qsin = _rand(2, 3, 1, 16, seed=11), _rand(2, 3, 1, 16, seed=12)
    for x, c, s in ((kv, cos, sin), (q, qcos, qsin)):
        want = REF.rope(x, c, s, inverse)
        target = _on(x.clone() if x.is_contiguous() else wide.clone()[..., :64])
        got = rows.rope(target, _on(c), _on(s), inverse, inplace)
        assert (got.data_ptr() == target.data_ptr()) == inplace
        assert got.dtype == dtype and torch.equal(got.cpu(), want)


def test_rope_in_place_leaves_the_rest_of_the_row():
    """In place, only the rotated dims are written: the columns past the queries' view keep their values."""
    wide = _rand(2, 3, 4, 80, seed=13)
    q = _on(wide.clone())[..., :64]
    cos, sin = _rand(2, 3, 1, 16, seed=14), _rand(2, 3, 1, 16, seed=15)
    rows.rope(q, _on(cos), _on(sin), inplace=True)
    full = q._base if q._base is not None else q
    assert torch.equal(full.cpu()[..., 64:], wide[..., 64:])
    assert torch.equal(full.cpu()[..., :32], wide[..., :32])
    assert not torch.equal(full.cpu()[..., 32:64], wide[..., 32:64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 128), (2, 3, 4, 128), (5, 2), (7, 64), (2, 4096)])
def test_hadamard_equals_the_reference_bit_for_bit(dtype, shape, tiles):
    """The butterfly passes in the reference's order and arithmetic: the indexer's 128 dims, a row per program or
    several, the smallest and the widest n."""
    x = _rand(*shape, seed=shape[-1], dtype=dtype)
    got = rows.hadamard(_on(x)).cpu()
    assert got.dtype == dtype and torch.equal(got, REF.hadamard(x))
    strided = _rand(3, 2 * shape[-1], seed=1, dtype=dtype)[:, ::2]  # (copied to unit stride first)
    assert torch.equal(rows.hadamard(_on(strided)).cpu(), REF.hadamard(strided))


def _composed(x, weight, cos, sin, qat):
    """`norm_rope_qat` as the row kernels' and the quantisers' separate launches (the fused kernel's arithmetic)."""
    from dsv4.kernels.triton import quant

    y = x if weight is None else rows.rms_norm(x, weight, 1e-6)
    y = rows.rope(y, cos, sin)
    if qat == "fp8_nope":
        nope = x.shape[-1] - 2 * cos.shape[-1]
        return torch.cat((quant.fp8_simulate(y[..., :nope]), y[..., nope:]), dim=-1) if nope else y
    if qat.startswith("hadamard"):
        y = rows.hadamard(y)
        return quant.fp4_simulate(y) if qat == "hadamard_fp4" else y
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qat", ["none", "fp8_nope", "hadamard", "hadamard_fp4"])
@pytest.mark.parametrize("case", ["keys", "entries", "queries", "narrow"])
def test_norm_rope_qat_is_the_separate_kernels_in_one_launch(dtype, qat, case, tiles):
    """The fused row pipeline equals the separate kernels' (norm, rotation, Hadamard, FP8 / FP4 round trip) bit for
    bit, and the reference to the norm's tolerance (bf16: equal here; FP8 can move a row a quantisation step
    where the norm moved one bf16 step, so fp32 rows are compared to the norm's fp32 rounding before any QAT).
    Cases: attention keys [B,S,512] with 64 rotated dims (eight FP8 blocks of nope, the last one partial), the
    compressor's entries [B,M,128], the indexer's queries [B,S,H,128] with a rotation a token broadcast over the
    heads and no norm, and rows narrower than an FP8 block."""
    shape, trig = {"keys": ((2, 3, 512), (2, 3, 32)), "entries": ((3, 2, 128), (3, 2, 16)),
                   "queries": ((2, 3, 40, 128), (2, 3, 1, 32)), "narrow": ((9, 32), (9, 8))}[case]
    x = _rand(*shape, seed=shape[-1] + trig[-1], dtype=dtype, scale=3.0)
    weight = None if case == "queries" else _rand(shape[-1], seed=2).abs() + 0.5
    cos, sin = _rand(*trig, seed=3).cos(), _rand(*trig, seed=3).sin()
    got = rows.norm_rope_qat(_on(x), _on(weight), 1e-6, _on(cos), _on(sin), qat)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got.cpu(), _composed(_on(x), _on(weight), _on(cos), _on(sin), qat).cpu())
    want = REF.norm_rope_qat(x, weight, 1e-6, cos, sin, qat)
    if weight is None:  # no norm: every stage is bit-exact
        assert torch.equal(got.cpu(), want)
    elif dtype == torch.bfloat16:
        assert _steps(got, want) <= 1
    elif qat in ("none", "hadamard"):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    else:
        before = REF.norm_rope_qat(x, weight, 1e-6, cos, sin, "none")
        torch.testing.assert_close(rows.norm_rope_qat(_on(x), _on(weight), 1e-6, _on(cos), _on(sin), "none").cpu(),
                                   before, rtol=1e-5, atol=1e-5)


def test_norm_rope_qat_rounds_each_stage_to_the_dtype():
    """bf16 rows whose reference stages round (the norm's output, the rotation, the Hadamard) agree to the bit with
    the reference here: a kernel that carried fp32 between the stages would not."""
    x = _rand(4, 6, 128, seed=21, dtype=torch.bfloat16, scale=5.0)
    weight = _rand(128, seed=22).abs() + 0.5
    cos, sin = _rand(4, 6, 16, seed=23).cos(), _rand(4, 6, 16, seed=23).sin()
    for qat in ("hadamard", "hadamard_fp4", "fp8_nope"):
        got = rows.norm_rope_qat(_on(x), _on(weight), 1e-6, _on(cos), _on(sin), qat).cpu()
        unrounded = REF.hadamard(REF.rope(REF.rms_norm(x.float(), weight, 1e-6), cos, sin)).to(torch.bfloat16)
        assert _steps(got, REF.norm_rope_qat(x, weight, 1e-6, cos, sin, qat)) <= 1
        if qat == "hadamard":
            assert not torch.equal(got, unrounded)


def test_norm_rope_qat_names_a_bad_rounding():
    x, cos = torch.randn(2, 64), torch.randn(2, 8)
    with pytest.raises(ValueError, match="qat must be one of"):
        REF.norm_rope_qat(x, None, 1e-6, cos, cos, "fp8")
    assert not rows.covers_norm_rope_qat(x, None, cos, cos, "fp8")


def test_what_the_row_kernels_cover():
    x, w = torch.randn(3, 4, 64), torch.rand(64)
    cos, sin = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    assert rows.covers_rms_norm(x, w) and rows.covers_head_norm(x, cos, sin) and rows.covers_head_norm(x, None, None)
    assert rows.covers_head_norm(x, cos[:, :1], sin[:, :1])  # broadcast over a dim
    assert not rows.covers_rms_norm(x.double(), w) and not rows.covers_rms_norm(x, w.double())
    assert not rows.covers_rms_norm(x, torch.rand(32))
    assert not rows.covers_rms_norm(x.transpose(0, 2), torch.rand(3))  # no unit last stride
    assert not rows.covers_rms_norm(torch.randn(2, 20000), torch.rand(20000))  # wider than a program's registers
    assert not rows.covers_head_norm(x, cos.double(), sin.double())
    assert not rows.covers_head_norm(x, torch.randn(3, 5, 8), torch.randn(3, 5, 8))  # does not broadcast
    assert not rows.covers_head_norm(x, torch.randn(3, 4, 40), torch.randn(3, 4, 40))  # more rotated dims than x
    assert rows.covers_hadamard(x) and not rows.covers_hadamard(torch.randn(3, 96))  # not a power of two
    assert not rows.covers_hadamard(torch.randn(3, 8192)) and not rows.covers_hadamard(x.double())
    wants = x.clone().requires_grad_()
    assert not rows.covers_rms_norm(wants, w) and not rows.covers_head_norm(wants, cos, sin)
    assert not rows.covers_hadamard(wants)
    with torch.no_grad():
        assert rows.covers_rms_norm(wants, w)
    assert rows.covers_norm_rope_qat(x, w, cos, sin, "fp8_nope")
    assert rows.covers_norm_rope_qat(x, None, cos, sin, "none")
    assert not rows.covers_norm_rope_qat(torch.randn(3, 96), torch.rand(96), cos[:, 0], sin[:, 0], "none")  # not 2^k
    assert not rows.covers_norm_rope_qat(x, torch.rand(32), cos, sin, "none")
    assert not rows.covers_norm_rope_qat(wants, w, cos, sin, "none")
