"""Tests for dsv4.quant: power-of-two scales, e8m0, e2m1 rounding/packing, FP8/FP4 weight formats."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4 import quant
from dsv4.quant import (
    dequantize_fp4_weight,
    dequantize_fp8_weight,
    e2m1_decode,
    e2m1_encode,
    e8m0_to_float,
    fp4_to_fp8_weight,
    pack_fp4,
    pow2_scale,
    quantize_fp4_weight,
    quantize_fp8_weight,
    scale_to_e8m0,
    unpack_fp4,
)

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _is_pow2(t: torch.Tensor) -> bool:
    m, _ = torch.frexp(t.double())
    return bool((m == 0.5).all())


def _e4m3_half_ulp(v: torch.Tensor) -> torch.Tensor:
    """Half the spacing of e4m3 values around |v| (normal: 3 mantissa bits, subnormal step 2**-9), fp64."""
    a = v.double().abs()
    exp = torch.floor(torch.log2(a.clamp(min=2.0**-6))).clamp(min=-6)
    return 0.5 * torch.pow(2.0, exp - 3)


# ---------------------------------------------------------------------------------------------- scales


def test_pow2_scale_exact_cases():
    amax = torch.tensor([448.0, 449.0, 224.0, 224.5, 448.0 / 8, 1.0, 0.0, 3.0e38])
    expected = [1.0, 2.0, 0.5, 1.0, 1 / 8, 2.0**-8, 2.0**-127, 2.0**120]
    assert pow2_scale(amax, 448.0).tolist() == expected
    assert pow2_scale(torch.tensor([6.0, 6.5, 3.0, 1e-30]), 6.0).tolist() == [1.0, 2.0, 0.5, 2.0**-102]


def test_pow2_scale_matches_log2_formula_on_random_values():
    g = torch.Generator().manual_seed(0)
    amax = torch.exp(torch.randn(2000, generator=g) * 20).float()
    s = pow2_scale(amax, 448.0)
    assert s.dtype == torch.float32 and _is_pow2(s)
    expected = [2.0 ** math.ceil(math.log2(a / 448.0)) for a in amax.double().tolist()]
    assert s.double().tolist() == expected
    ratio = amax.double() / s.double()
    assert bool(((ratio > 224) & (ratio <= 448)).all())


def test_pow2_scale_clamps_to_e8m0_range():
    tiny = torch.tensor([2.0**-149, 1e-45 * 2])  # fp32 subnormals: true exponent below -127
    assert pow2_scale(tiny, 1.0).tolist() == [2.0**-127, 2.0**-127]


def test_e8m0_roundtrip_all_bytes():
    raw = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = e8m0_to_float(raw.view(torch.float8_e8m0fnu))
    assert values.dtype == torch.float32
    assert values[:255].double().tolist() == [math.ldexp(1.0, b - 127) for b in range(255)]
    assert math.isnan(values[255].item())
    # Back to bytes, and agreement with torch's own cast on exact powers of two.
    assert torch.equal(scale_to_e8m0(values[:255]).view(torch.uint8), raw[:255])
    assert torch.equal(values[:255].to(torch.float8_e8m0fnu).view(torch.uint8), raw[:255])


# ---------------------------------------------------------------------------------------------- e2m1


def test_e2m1_code_table():
    expected = GRID + [-v for v in GRID]
    assert e2m1_decode(torch.arange(16, dtype=torch.uint8)).tolist() == expected


def test_e2m1_grid_points_round_trip():
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(e2m1_encode(e2m1_decode(codes)), codes)  # -0.0 keeps its sign bit (code 8)


@pytest.mark.parametrize(
    ("value", "rounded"),
    [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)],
)
def test_e2m1_ties_to_even(value: float, rounded: float):
    x = torch.tensor([value, -value])
    assert e2m1_decode(e2m1_encode(x)).tolist() == [rounded, -rounded]


def test_e2m1_saturates_and_rounds_to_nearest():
    x = torch.tensor([6.1, 7.0, 1e30, -9.0, 0.24, 0.26, 5.01, 4.99, 2.49])
    assert e2m1_decode(e2m1_encode(x)).tolist() == [6.0, 6.0, 6.0, -6.0, 0.0, 0.5, 6.0, 4.0, 2.0]


def test_e2m1_matches_brute_force_nearest():
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(5000, generator=g) * 16 - 8).tolist() + [v + d for v in GRID for d in (-1e-6, 1e-6)]
    got = e2m1_decode(e2m1_encode(torch.tensor(x))).tolist()
    for v, r in zip(x, got, strict=True):
        a = min(abs(v), 6.0)
        dist = [abs(a - gv) for gv in GRID]
        best = min(dist)
        candidates = [i for i, d in enumerate(dist) if d == best]
        index = next((i for i in candidates if i % 2 == 0), candidates[0])
        assert r == math.copysign(GRID[index], v), v


def test_pack_fp4_nibble_order():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x0, 0x8, 0x7]], dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.dtype == torch.int8 and packed.shape == (1, 3)
    assert packed.view(torch.uint8).tolist() == [[0x21, 0x0F, 0x78]]
    assert torch.equal(unpack_fp4(packed), codes)


def test_pack_unpack_round_trip_and_input_views():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (3, 5, 64), generator=g).to(torch.uint8)
    packed = pack_fp4(codes)
    assert packed.shape == (3, 5, 32)
    assert torch.equal(unpack_fp4(packed), codes)
    assert torch.equal(unpack_fp4(packed.view(torch.uint8)), codes)
    assert torch.equal(unpack_fp4(packed.view(torch.float4_e2m1fn_x2)), codes)
    with pytest.raises(ValueError):
        pack_fp4(codes[..., :3])


# ---------------------------------------------------------------------------------------------- FP8 weights


def _varied_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random weight whose 128x128 tiles have very different magnitudes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    row_mag = torch.pow(10.0, torch.arange(rows) // 128 - 1.0).unsqueeze(1)
    col_mag = torch.pow(4.0, (torch.arange(cols) // 128).float()).unsqueeze(0)
    return w * row_mag * col_mag


def test_fp8_weight_error_bounded_by_half_ulp():
    w = _varied_weight(300, 200, seed=3)
    q, s = quantize_fp8_weight(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (300, 200)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (3, 2)
    scale = s.view(torch.uint8).double().sub(127).exp2()  # independent e8m0 decode
    full = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    deq = dequantize_fp8_weight(q, s)
    assert deq.dtype == torch.float32
    err = (deq.double() - w.double()).abs()
    assert bool((err <= _e4m3_half_ulp(w.double() / full) * full).all())
    # The tile maximum lands in (224, 448] after scaling: the scale is the smallest power of two that fits.
    for i in range(3):
        for j in range(2):
            tile = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            ratio = tile.abs().max().double() / scale[i, j]
            assert 224 < ratio <= 448


def test_fp8_weight_zero_tile_is_finite():
    w = torch.randn(130, 260)
    w[:128, 128:256] = 0
    q, s = quantize_fp8_weight(w)
    deq = dequantize_fp8_weight(q, s)
    assert torch.isfinite(deq).all()
    assert bool((deq[:128, 128:256] == 0).all())
    assert torch.isfinite(e8m0_to_float(s)).all()


# ---------------------------------------------------------------------------------------------- FP4 weights


def _grid_weight(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight that is exactly e2m1 value x power-of-two per 32-group, each group containing a ±6."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, cols), generator=g)
    codes[:, ::32] = 7 + 8 * torch.randint(0, 2, (rows, cols // 32), generator=g)  # ±6 sets the group max
    values = torch.tensor(GRID + [-v for v in GRID])[codes]
    exps = torch.randint(-12, 6, (rows, cols // 32), generator=g)
    return values * torch.pow(2.0, exps.float()).repeat_interleave(32, 1), exps


def test_fp4_weight_round_trip_exact_on_grid():
    w, exps = _grid_weight(40, 96, seed=4)
    packed, s = quantize_fp4_weight(w)
    assert packed.dtype == torch.int8 and packed.shape == (40, 48)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (40, 3)
    assert torch.equal(s.view(torch.uint8).long() - 127, exps)
    assert torch.equal(dequantize_fp4_weight(packed, s), w)


def test_fp4_weight_random_error_bound():
    w = torch.randn(16, 64) * 3
    packed, s = quantize_fp4_weight(w)
    # rounding happens at the scale of the group's amax, 2**ceil(log2(amax / 6))
    amax = w.abs().view(16, 2, 32).amax(-1)
    rounding_scale = torch.exp2(torch.ceil(torch.log2(amax / 6))).repeat_interleave(32, 1)
    err = (dequantize_fp4_weight(packed, s) - w).abs()
    scaled = w.abs() / rounding_scale
    # Grid spacing is 0.5 below 2, 1 below 4 and 2 above: the error is at most half of it.
    bound = torch.where(scaled <= 2, 0.25, torch.where(scaled <= 4, 0.5, 1.0)) * rounding_scale
    assert bool((err <= bound).all())
    # canonical storage: every group's largest code is 4 or 6 (a 3 would be stored as 6 at half the scale)
    codes = e2m1_decode(unpack_fp4(packed)).abs().view(16, 2, 32).amax(-1)
    assert bool(((codes == 4) | (codes == 6)).all())


def test_weight_quantisers_are_idempotent():
    """quantize(dequantize(q, s)) == (q, s): what makes plain <-> official conversions bit-exact."""
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(256, 320, generator=g) * 10.0 ** (4 * torch.rand(1, generator=g) - 2)
        q8, s8 = quantize_fp8_weight(w)
        r8, t8 = quantize_fp8_weight(dequantize_fp8_weight(q8, s8))
        assert torch.equal(q8.view(torch.uint8), r8.view(torch.uint8))
        assert torch.equal(s8.view(torch.uint8), t8.view(torch.uint8))
        q4, s4 = quantize_fp4_weight(w)
        r4, t4 = quantize_fp4_weight(dequantize_fp4_weight(q4, s4))
        assert torch.equal(q4, r4) and torch.equal(s4.view(torch.uint8), t4.view(torch.uint8))


def test_fp4_weight_zero_group_uses_amax_floor():
    w = torch.zeros(2, 64)
    w[1, 32] = 2.0**-128  # below the floor: flushed to zero under the floored scale 2**-126
    packed, s = quantize_fp4_weight(w)
    assert s.view(torch.uint8).tolist() == [[1, 1], [1, 1]]  # byte 1 = 2**-126
    assert bool((dequantize_fp4_weight(packed, s) == 0).all())


def test_fp4_weight_requires_multiple_of_32():
    with pytest.raises(ValueError, match=r"\(4, 40\)"):
        quantize_fp4_weight(torch.randn(4, 40))


def test_fp4_to_fp8_is_lossless_and_uses_tile_max_scale():
    rows, cols = 200, 320  # partial tiles in both dimensions
    g = torch.Generator().manual_seed(5)
    packed = torch.randint(-128, 128, (rows, cols // 2), generator=g).to(torch.int8)
    exps = torch.randint(-10, 4, (rows, cols // 32), generator=g)  # spread 2**13 < 2**14
    s4 = (exps + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    q8, s8 = fp4_to_fp8_weight(packed, s4)
    assert q8.dtype == torch.float8_e4m3fn and q8.shape == (rows, cols)
    assert s8.dtype == torch.float8_e8m0fnu and s8.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            tile_max = exps[i * 128 : (i + 1) * 128, j * 4 : (j + 1) * 4].max().item()
            assert s8.view(torch.uint8)[i, j].item() - 127 == tile_max - 6
    assert q8.float().abs().max().item() <= 384
    a, b = dequantize_fp4_weight(packed, s4), dequantize_fp8_weight(q8, s8)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_module_constants():
    assert (quant.FP8_MAX, quant.FP4_MAX, quant.FP8_BLOCK, quant.FP4_BLOCK) == (448.0, 6.0, 128, 32)
