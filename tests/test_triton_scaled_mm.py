"""torch's block-scaled FP8 GEMM path (`dsv4/kernels/triton/scaled_mm.py`), checked without a GPU: `F.scaled_mm`
is replaced by an emulation that asserts the layout torch documents for its 1x128 / 128x128 recipes and computes
the two-level block product, so the tests pin what the path hands torch (padding, transposes, scale layouts), its
result against the reference GEMM, when it is taken, and that its probe turns it off when torch's kernel fails or
disagrees. Whether torch's CUDA kernel computes the same is what the probe checks on the GPU itself
(`benchmarks/bench_gpu.py ops` prints its error and speed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from dsv4.kernels.reference import ReferenceBackend  # noqa: E402
from dsv4.kernels.triton import scaled_mm  # noqa: E402
from dsv4.quant import quantize_fp4_weight, quantize_fp8_weight  # noqa: E402

REF = ReferenceBackend()


def _emulated(a, b, scale_a, recipe_a, scale_b, recipe_b, output_dtype=torch.bfloat16, **_):
    """F.scaled_mm for (BlockWise1x128, BlockWise128x128), asserting torch's layout for them."""
    assert recipe_a == F.ScalingType.BlockWise1x128 and recipe_b == F.ScalingType.BlockWise128x128
    m, k = a.shape
    n = b.shape[1]
    kb = k // 128
    assert a.dtype == b.dtype == torch.float8_e4m3fn and a.is_contiguous() and m % 4 == 0 and k % 128 == 0
    assert b.shape[0] == k and b.stride(0) == 1 and n % 128 == 0  # column-major [K, N]
    assert scale_a.dtype == torch.float32 and scale_a.shape == (m, kb) and scale_a.stride(0) == 1
    assert scale_b.dtype == torch.float32 and scale_b.shape[0] % 4 == 0 and scale_b.shape[0] >= kb
    assert scale_b.shape[1] == n // 128 and scale_b.stride(0) == 1
    acc = torch.zeros(m, n, dtype=torch.float32)
    for j in range(kb):
        cols = slice(128 * j, 128 * (j + 1))
        block = a[:, cols].float() @ b[cols].float()
        acc += block * (scale_a[:, j : j + 1] * scale_b[j].repeat_interleave(128)[None, :])
    return acc.to(output_dtype)


@pytest.fixture
def on_hopper(monkeypatch):
    """This CPU taken for a Hopper GPU whose torch runs the emulation; the probe's verdicts forgotten."""
    monkeypatch.setattr(F, "scaled_mm", _emulated)
    monkeypatch.setattr(scaled_mm, "_hopper", lambda device: True)
    monkeypatch.setattr(scaled_mm, "_verdicts", {})


def _operands(m: int, k: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xq, xs = REF.act_quant((torch.randn(m, k, generator=g) * 2).to(torch.bfloat16))
    w, ws = quantize_fp8_weight(torch.randn(n, k, generator=g) * 0.05)
    return xq, xs, w, ws


@pytest.mark.parametrize(("m", "k", "n"), [(128, 128, 128), (131, 640, 256), (200, 1024, 384), (5, 512, 128)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_the_layout_handed_to_torch_gives_the_references_gemm(on_hopper, m, k, n, out_dtype):
    """Rows not a multiple of 4 (padded, then cut), K/128 odd (the weight scales padded to a multiple of 4)."""
    xq, xs, w, ws = _operands(m, k, n, seed=m + k)
    got = scaled_mm.fp8_gemm(xq.view(1, m, k), xs.view(1, m, -1), w, ws, out_dtype)
    want = REF.fp8_gemm(xq, xs, w, ws, out_dtype).view(1, m, n)
    assert got.shape == want.shape and got.dtype == out_dtype
    if out_dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    else:
        step = want.float().abs().clamp_min(1e-30) * 2**-7  # one bf16 step
        assert bool(((got.float() - want.float()).abs() <= step).all())


def test_what_the_path_takes(on_hopper, monkeypatch):
    xq, xs, w, ws = _operands(128, 256, 128, seed=1)
    assert scaled_mm.takes(xq, xs, w, ws, torch.bfloat16)
    assert scaled_mm.takes(xq, xs, w, ws, torch.float32)
    assert not scaled_mm.takes(xq[:127], xs[:127], w, ws, torch.bfloat16)  # a decode's few rows: the Triton kernel
    assert not scaled_mm.takes(xq, xs, w, ws, torch.float16)
    w4, ws4 = quantize_fp4_weight(torch.randn(128, 256))
    assert not scaled_mm.takes(xq, xs, w4, ws4, torch.bfloat16)
    xq2, xs2, w2, ws2 = _operands(128, 200, 128, seed=2)  # K not a multiple of 128
    assert not scaled_mm.takes(xq2, xs2, w2, ws2, torch.bfloat16)
    xq3, xs3, w3, ws3 = _operands(128, 256, 200, seed=3)  # N not a multiple of 128
    assert not scaled_mm.takes(xq3, xs3, w3, ws3, torch.bfloat16)
    monkeypatch.setenv("DSV4_SCALED_MM", "0")
    assert not scaled_mm.takes(xq, xs, w, ws, torch.bfloat16)


def test_not_on_other_devices(monkeypatch):
    monkeypatch.setattr(scaled_mm, "_verdicts", {})
    xq, xs, w, ws = _operands(128, 256, 128, seed=4)
    assert not scaled_mm.takes(xq, xs, w, ws, torch.bfloat16)  # a CPU is no Hopper GPU
    assert scaled_mm._verdicts == {}  # (and no probe ran)


def test_the_probe_passes_torchs_kernel_once_and_keeps_its_verdict(on_hopper, monkeypatch):
    calls = []
    monkeypatch.setattr(F, "scaled_mm", lambda *a, **kw: (calls.append(1), _emulated(*a, **kw))[1])
    xq, xs, w, ws = _operands(128, 256, 128, seed=5)
    assert scaled_mm.takes(xq, xs, w, ws, torch.bfloat16) and calls == [1]
    assert scaled_mm.takes(xq, xs, w, ws, torch.bfloat16) and calls == [1]


@pytest.mark.parametrize("fault", ["raises", "misreads"])
def test_the_probe_turns_the_path_off_when_torchs_kernel_fails_or_disagrees(on_hopper, monkeypatch, fault):
    def faulty(a, b, scale_a, recipe_a, scale_b, recipe_b, output_dtype=torch.bfloat16, **kw):
        if fault == "raises":
            raise RuntimeError("Invalid scaling configuration")
        # the activation scales read with rows and blocks swapped, as a wrong stride would
        return _emulated(a, b, scale_a.flip(0).t().contiguous().t(), recipe_a, scale_b, recipe_b, output_dtype)

    monkeypatch.setattr(F, "scaled_mm", faulty)
    xq, xs, w, ws = _operands(128, 256, 128, seed=6)
    with pytest.warns(UserWarning, match="the Triton kernel runs instead"):
        assert not scaled_mm.takes(xq, xs, w, ws, torch.bfloat16)
    assert not scaled_mm.takes(xq, xs, w, ws, torch.bfloat16)  # the verdict is kept: no second warning
