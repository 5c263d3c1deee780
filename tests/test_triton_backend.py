"""The Triton backend against the reference: its GEMM kernels op by op, the dispatcher's choice, and the demo model
end to end (logits and greedy tokens). On a machine without a GPU the kernels run on CPU tensors through Triton's
interpreter (`tests/conftest.py` sets TRITON_INTERPRET=1 before triton is imported)."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from dsv4 import kernels
from dsv4.kernels.reference import ReferenceBackend
from dsv4.quant import quantize_fp4_weight, quantize_fp8_weight

pytest.importorskip("triton", reason="the Triton backend's tests need the triton package (the dev extra installs it)")

from dsv4.kernels.triton import TritonBackend, gemm  # noqa: E402

REF = ReferenceBackend()
ON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bf16_step(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 mantissa bits): the tolerance for a result rounded to bf16 once,
    whose fp32 accumulator may differ from the reference's in its last bits (a different addition order)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().float().clamp_min(2.0**-126))) - 7)


def _operands(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 4
    x[:, : min(k, 7)] *= 100  # blocks with a large amax next to small values
    w = torch.randn(n, k, generator=g) * 0.05
    xq, xs = REF.act_quant(x)
    return xq.to(ON_DEVICE), xs.to(ON_DEVICE), w


@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (3, 200, 300), (40, 256, 384), (17, 130, 64)])
def test_fp8_gemm_matches_the_reference_two_level_accumulation(m, n, k):
    xq, xs, w = _operands(m, n, k, seed=m + n + k)
    wq, ws = (t.to(ON_DEVICE) for t in quantize_fp8_weight(w))
    got = gemm.fp8_gemm(xq, xs, wq, ws, torch.float32).cpu()
    want = REF.fp8_gemm(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu(), torch.float32)
    assert got.shape == want.shape == (m, n)
    # each K block's products are exact in fp32; only the order of the additions inside a block may differ
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    got16 = gemm.fp8_gemm(xq, xs, wq, ws, torch.bfloat16).cpu().float()
    want16 = REF.fp8_gemm(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu(), torch.bfloat16).float()
    assert bool(((got16 - want16).abs() <= _bf16_step(want16)).all())


@pytest.mark.parametrize("m,n1,n2,k", [(1, 1024, 512, 256), (3, 200, 64, 300), (17, 96, 130, 128)])
@pytest.mark.parametrize("processors", [1, 132], ids=["one_program_wide", "h200_wide"])
def test_two_fp8_gemms_of_one_input_in_one_launch(m, n1, n2, k, processors, monkeypatch):
    """`fp8_gemm_pair`: each weight's product equal to `fp8_gemm`'s bit for bit where the tiles are as wide (the
    same tile, one launch), and to the reference's two-level accumulation; the linears op takes it for two FP8
    weights handed act_quant(x), the wq_a and wkv of a decode step (V4's 1,024 and 512 columns first)."""
    monkeypatch.setattr(gemm, "processors", lambda device: processors)  # (the tile widths a GPU picks)
    xq, xs, w = _operands(m, n1 + n2, k, seed=m + n1 + k)
    (w1, s1), (w2, s2) = ((t.to(ON_DEVICE) for t in quantize_fp8_weight(part)) for part in (w[:n1], w[n1:]))
    launches = []
    real = gemm._fp8_gemm_pair_kernel

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(gemm, "_fp8_gemm_pair_kernel", Counted())
    y1, y2 = gemm.fp8_gemm_pair(xq, xs, w1, s1, w2, s2, torch.float32)
    assert len(launches) == 1 and y1.shape == (m, n1) and y2.shape == (m, n2)
    row_blocks = -(-m // gemm.block_m_for(m))
    width = gemm.block_n_for(row_blocks, n1 + n2, 128, xq.device)
    equal = 0
    for got, (wq, ws), n in ((y1, (w1, s1), n1), (y2, (w2, s2), n2)):
        want = REF.fp8_gemm(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu(), torch.float32)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        if gemm.block_n_for(row_blocks, n, 128, xq.device) == width:  # the one-weight kernel's own tiles
            assert torch.equal(got, gemm.fp8_gemm(xq, xs, wq, ws, torch.float32))
            equal += 1
    assert equal or processors == 132
    x = torch.randn(m, k).to(ON_DEVICE)
    quantized = REF.act_quant(x.cpu())
    quantized = tuple(t.to(ON_DEVICE) for t in quantized)
    launches.clear()
    pair = TritonBackend().linears(x, [(w1, s1), (w2, s2)], quantized)
    assert len(launches) == 1
    for got, want in zip(pair, REF.linears(x.cpu(), [(w1.cpu(), s1.cpu()), (w2.cpu(), s2.cpu())], quantized),
                         strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (5, 96, 256), (33, 128, 64)])
@pytest.mark.parametrize("packed_dtype", [torch.int8, torch.float4_e2m1fn_x2])
def test_fp4_gemm_matches_the_reference_per_32_accumulation(m, n, k, packed_dtype):
    xq, xs, w = _operands(m, n, k, seed=3 * m + n + k)
    wq, ws = quantize_fp4_weight(w)
    wq = wq.view(packed_dtype)
    got = gemm.fp4_gemm(xq, xs, wq.to(ON_DEVICE), ws.to(ON_DEVICE), torch.float32).cpu()
    want = REF.fp4_gemm(xq.cpu(), xs.cpu(), wq, ws, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # and the kernel really reads the weight: a different weight gives a different product
    other, other_s = quantize_fp4_weight(w.flip(0))
    moved = gemm.fp4_gemm(xq, xs, other.view(packed_dtype).to(ON_DEVICE), other_s.to(ON_DEVICE), torch.float32)
    assert not torch.allclose(moved.cpu(), want)


def test_gemm_covers_only_what_the_kernels_take():
    xq, xs, w = _operands(2, 64, 128, seed=0)
    wq, ws = quantize_fp8_weight(w)
    assert gemm.covers(xq, xs, wq.to(ON_DEVICE), ws.to(ON_DEVICE), torch.bfloat16)
    assert not gemm.covers(xq, xs, wq.to(ON_DEVICE), ws.to(ON_DEVICE), torch.int32)
    assert not gemm.covers(xq.float(), xs, wq.to(ON_DEVICE), ws.to(ON_DEVICE), torch.bfloat16)
    w4, s4 = quantize_fp4_weight(torch.randn(64, 96))  # K = 96 is a multiple of 32 but the activation has 128
    assert not gemm.covers(xq, xs, w4.to(ON_DEVICE), s4.to(ON_DEVICE), torch.bfloat16)


def test_linear_through_the_backend_uses_the_kernels(monkeypatch):
    backend = TritonBackend()
    x = (torch.randn(3, 5, 256) * 2).to(ON_DEVICE)
    wq, ws = (t.to(ON_DEVICE) for t in quantize_fp8_weight(torch.randn(192, 256) * 0.05))
    calls = []
    real = gemm.fp8_gemm

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(gemm, "fp8_gemm", counted)
    got = backend.linear(x, wq, ws).cpu()
    want = REF.linear(x.cpu(), wq.cpu(), ws.cpu())
    assert len(calls) == 1 and got.shape == (3, 5, 192)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_cpu_tensors_without_the_interpreter_get_the_reference(monkeypatch):
    if ON_DEVICE == "cuda":
        pytest.skip("on a GPU machine the kernels run on CUDA tensors; this checks the CPU fallback")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    called = []
    monkeypatch.setattr(gemm, "fp8_gemm", lambda *a: called.append(a))
    xq, xs, w = _operands(2, 64, 128, seed=1)
    wq, ws = quantize_fp8_weight(w)
    got = TritonBackend().fp8_gemm(xq, xs, wq, ws, torch.float32)
    assert called == [] and torch.equal(got, REF.fp8_gemm(xq, xs, wq, ws, torch.float32))


def test_auto_picks_triton_on_cuda_when_the_package_is_installed(monkeypatch):
    assert kernels.resolve_backend_name("auto", "cuda") == "triton"
    assert kernels.resolve_backend_name("auto", "cpu") == "native"
    assert type(kernels.get_backend("triton")) is TritonBackend
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert kernels.resolve_backend_name("auto", "cuda") == "reference"


def _expert_table(n_experts: int, dim: int, inter: int, fmt: str, seed: int):
    from dsv4.kernels import ExpertWeights

    g = torch.Generator().manual_seed(seed)
    quantize = quantize_fp8_weight if fmt == "fp8" else quantize_fp4_weight
    table = []
    for _ in range(n_experts):
        w1, s1 = quantize(torch.randn(inter, dim, generator=g) * 0.1)
        w3, s3 = quantize(torch.randn(inter, dim, generator=g) * 0.1)
        w2, s2 = quantize(torch.randn(dim, inter, generator=g) * 0.1)
        table.append(ExpertWeights(*(t.to(ON_DEVICE) for t in (w1, s1, w3, s3, w2, s2))))
    return table


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_routed_experts_match_the_reference_loop(fmt, dtype):
    n_experts, dim, inter, tokens, k = 8, 256, 128, 21, 3
    table = _expert_table(n_experts, dim, inter, fmt, seed=1)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(tokens, dim, generator=g) * 2).to(dtype)
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(tokens)])
    ids[:, 0] = torch.where(torch.arange(tokens) < 12, 5, ids[:, 0])  # one expert with many rows (two row tiles)
    ids[:12, 1:] = torch.where(ids[:12, 1:] == 5, 0, ids[:12, 1:])
    weights = torch.rand(tokens, k, generator=g)
    which = sorted(set(ids.flatten().tolist()))
    backend = TritonBackend()
    got = backend.routed_experts(x.to(ON_DEVICE), weights.to(ON_DEVICE), ids.to(ON_DEVICE), table, which, 7.0).cpu()
    cpu_table = [type(w)(*(t.cpu() for t in vars(w).values())) for w in table]
    want = REF.routed_experts(x, weights, ids, cpu_table, which, 7.0)
    assert got.dtype == torch.float32 and got.shape == (tokens, dim)
    _assert_experts_close(got, want, dtype)
    # expert parallelism: the experts held elsewhere are None and their rows add nothing
    mine = which[::2]
    partial_table = [w if e in mine else None for e, w in enumerate(table)]
    got = backend.routed_experts(x.to(ON_DEVICE), weights.to(ON_DEVICE), ids.to(ON_DEVICE), partial_table, mine,
                                 7.0).cpu()
    want = REF.routed_experts(x, weights, ids, [w if e in mine else None for e, w in enumerate(cpu_table)], mine, 7.0)
    assert not torch.equal(want, torch.zeros_like(want))
    assert float((got - want).norm() / want.norm()) <= (1e-2 if dtype == torch.bfloat16 else 1e-6)


def _assert_experts_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    else:
        # bf16 activations: a last-bit difference of a gate or up value (a tensor core's addition order) can move the
        # hidden activation's FP8 rounding by a whole step, which w2 spreads over the row; so most values agree to a
        # bf16 step or two and the whole stays within 1% (in the interpreter, whose dots add in torch's order, all)
        beyond = (got - want).abs() > 2 * _bf16_step(want)
        assert float(beyond.float().mean()) <= 0.02
        assert float((got - want).norm() / want.norm()) <= 1e-2


class _Table(list):
    """An expert table the backend can keep a plan for (a plain list cannot be weakly referenced)."""


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("schedule", ["kernel", "torch"])
def test_device_scheduled_routed_experts_match_the_reference_loop(fmt, dtype, schedule, monkeypatch):
    """`which` None (every expert the ids name, the tiles laid out on the device over a grid that is an upper
    bound): the reference's sums, with an expert of 70 rows (two 64-row tiles), experts no token chose, and the
    grid's spare tiles doing nothing; the schedule laid out by its kernel or (for many rows) by torch's sort."""
    from dsv4.kernels.triton import experts

    if schedule == "torch":
        monkeypatch.setattr(experts, "SCHEDULE_ROWS", 0)
    n_experts, dim, inter, tokens, k = 8, 256, 128, 80, 2
    table = _Table(_expert_table(n_experts, dim, inter, fmt, seed=4))
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(tokens, dim, generator=g) * 2).to(dtype)
    ids = torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(tokens)])  # experts 6 and 7: no rows
    ids[:70, 0] = 5
    ids[:70, 1] = torch.where(ids[:70, 1] == 5, 0, ids[:70, 1])
    weights = torch.rand(tokens, k, generator=g)
    backend = TritonBackend()
    x_dev, ids_dev = x.to(ON_DEVICE), ids.to(ON_DEVICE)
    assert backend.routes_on_device(x_dev, table)
    got = backend.routed_experts(x_dev, weights.to(ON_DEVICE), ids_dev, table, None, 7.0).cpu()
    cpu_table = [type(w)(*(t.cpu() for t in vars(w).values())) for w in table]
    want = REF.routed_experts(x, weights, ids, cpu_table, None, 7.0)
    assert got.dtype == torch.float32 and got.shape == (tokens, dim)
    _assert_experts_close(got, want, dtype)


@pytest.mark.parametrize(("tokens", "k", "n_experts"), [(1, 6, 256), (5, 6, 64), (64, 6, 256), (170, 6, 384),
                                                         (40, 2, 8), (7, 1, 4)])
def test_the_schedule_kernel_lays_out_what_torch_does(tokens, k, n_experts):
    """The one-program schedule's sorted rows and tiles equal torch's sort and scans exactly: uniform routings
    and a skewed one (most rows on one expert: tiles of block_m rows and a partial one), every block size."""
    from dsv4.kernels.triton import experts
    from dsv4.kernels.triton.gemm import block_m_for

    g = torch.Generator().manual_seed(tokens * k)
    skewed = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(tokens)])
    skewed[: tokens * 3 // 4, 0] = n_experts - 1
    skewed[: tokens * 3 // 4, 1:] = torch.where(skewed[: tokens * 3 // 4, 1:] == n_experts - 1, 0,
                                                skewed[: tokens * 3 // 4, 1:])
    for ids in (torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(tokens)]), skewed):
        n, block_m = tokens * k, block_m_for(tokens)
        n_tiles = -(-n // block_m) + min(n_experts, n)
        keep, tiles = experts._kernel_schedule(ids.to(ON_DEVICE), n_experts, block_m, n_tiles)
        want_keep, want_tiles = experts._torch_schedule(ids, n_experts, block_m, n_tiles)
        assert torch.equal(keep.cpu().long(), want_keep)
        assert torch.equal(tiles.cpu(), want_tiles)


@pytest.mark.parametrize("k", [1, 2, 6])
def test_the_combine_kernel_adds_as_add_routed_rows(k):
    """Each token's k outputs added in increasing expert id (ties: slot order), bit for bit."""
    from dsv4.kernels.experts import RoutedRows, add_routed_rows
    from dsv4.kernels.triton import experts

    g = torch.Generator().manual_seed(k)
    tokens, d = 9, 300
    ids = torch.randint(0, 5, (tokens, k), generator=g)  # repeats: ties between slots
    slots = (torch.randn(tokens * k, d, generator=g) * torch.logspace(-3, 3, d)).bfloat16()
    want = add_routed_rows(slots, RoutedRows(torch.arange(tokens * k), [], [], k), ids)
    got = experts._combine(slots.to(ON_DEVICE), ids.to(ON_DEVICE)).cpu()
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("fmt", ["fp8", "fp4", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_one_expert_through_the_grouped_kernels_matches_the_reference(fmt, dtype, weighted):
    """`swiglu` (the shared expert's op, and an expert run alone) over 1, 5 and 70 rows (two 64-row tiles): the
    reference's values, with and without routing weights; its pointers and row order are made once."""
    from dsv4.kernels import ExpertWeights

    if fmt == "float":
        g = torch.Generator().manual_seed(9)
        expert = ExpertWeights(*(torch.randn(*shape, generator=g).mul(0.1).to(dtype).to(ON_DEVICE) if i % 2 == 0
                                 else None for i, shape in enumerate(((128, 256), 0, (128, 256), 0, (256, 128), 0))))
    else:
        expert = _expert_table(1, 256, 128, fmt, seed=9)[0]
    backend = TritonBackend()
    for n in (1, 5, 70):
        g = torch.Generator().manual_seed(n)
        x = (torch.randn(n, 256, generator=g) * 2).to(dtype)
        weights = torch.rand(n, 1, generator=g) if weighted else None
        got = backend.swiglu(x.to(ON_DEVICE), expert, 7.0, None if weights is None else weights.to(ON_DEVICE))
        cpu = type(expert)(*(None if t is None else t.cpu() for t in vars(expert).values()))
        want = REF.swiglu(x, cpu, 7.0, weights)
        assert got.dtype == dtype and got.shape == want.shape
        _assert_experts_close(got.cpu().float(), want.float(), dtype)
    assert len(backend.expert_pointers._singles) == 1
    if fmt == "float":  # a trained expert's gradient: the reference's differentiable path
        trained = type(expert)(*(None if t is None else t.detach().clone().requires_grad_() for t in
                                 vars(expert).values()))
        backend.swiglu(x.to(ON_DEVICE), trained, 7.0).float().sum().backward()
        assert trained.w1.grad is not None and trained.w2.grad is not None


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_shared_experts_add_is_its_output_rounded_then_added_and_rounded(fmt, dtype):
    """`swiglu(..., add)` (the MoE layer's output: the routed sum plus the shared expert's) equals the kernel's own
    output, rounded to the dtype, added to `add` in fp32 and rounded again, bit for bit, over one and 70 rows; and
    the reference's `add` is that arithmetic around its own output."""
    expert = _expert_table(1, 256, 128, fmt, seed=4)[0]
    backend = TritonBackend()
    for n in (1, 70):
        g = torch.Generator().manual_seed(n)
        x = (torch.randn(n, 256, generator=g) * 2).to(dtype).to(ON_DEVICE)
        add = (torch.randn(n, 256, generator=g) * 3).to(ON_DEVICE)
        alone = backend.swiglu(x, expert, 7.0)
        got = backend.swiglu(x, expert, 7.0, None, add)
        assert got.dtype == dtype and torch.equal(got, (add + alone.float()).to(dtype))
    cpu = type(expert)(*(None if t is None else t.cpu() for t in vars(expert).values()))
    x, add = x.cpu(), add.cpu()
    assert torch.equal(REF.swiglu(x, cpu, 7.0, None, add), (add + REF.swiglu(x, cpu, 7.0).float()).to(dtype))


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_experts_and_linears_read_a_quantisation_they_are_given(fmt, dtype):
    """Given act_quant of other rows (what `rms_norm_quant` hands over), the GEMMs read it and not x: each op
    equals itself run on those other rows, bit for bit, in the Triton kernels (the shared expert's add included,
    the routed experts scheduled on the host and on the device) and in the reference."""
    table = _Table(_expert_table(6, 256, 128, fmt, seed=7))
    g = torch.Generator().manual_seed(8)
    x, other = ((torch.randn(9, 256, generator=g) * 2).to(dtype).to(ON_DEVICE) for _ in range(2))
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(9)]).to(ON_DEVICE)
    weights, add = torch.rand(9, 2, generator=g).to(ON_DEVICE), torch.randn(9, 256, generator=g).to(ON_DEVICE)
    backend = TritonBackend()
    for ref in (backend, REF):
        quantized = ref.act_quant(other)
        which = sorted(set(ids.flatten().tolist()))
        assert torch.equal(ref.swiglu(x, table[0], 7.0, None, add, quantized),
                           ref.swiglu(other, table[0], 7.0, None, add))
        assert torch.equal(ref.routed_experts(x, weights, ids, table, which, 7.0, quantized),
                           ref.routed_experts(other, weights, ids, table, which, 7.0))
        w, scale = table[1].w1, table[1].s1
        assert torch.equal(ref.linear(x, w, scale, quantized), ref.linear(other, w, scale))
        assert not torch.equal(ref.linear(x, w, scale), ref.linear(other, w, scale))
    assert backend.routes_on_device(x, table)
    quantized = backend.act_quant(other)
    assert torch.equal(backend.routed_experts(x, weights, ids, table, None, 7.0, quantized),
                       backend.routed_experts(other, weights, ids, table, None, 7.0))


def test_the_device_schedules_plan_follows_its_table():
    """A plan is kept per table and checked against its end experts: a new last expert is run with its own weights,
    and tables the kernels do not take whole (an expert held elsewhere, float weights of another dtype than the
    activations', two formats) are routed on the host."""
    from dsv4.kernels import ExpertWeights

    table = _Table(_expert_table(4, 128, 64, "fp8", seed=6))
    x = torch.randn(5, 128).to(ON_DEVICE)
    ids = torch.tensor([[3, 0], [3, 1], [2, 3], [3, 0], [1, 2]]).to(ON_DEVICE)
    weights = torch.rand(5, 2).to(ON_DEVICE)
    backend = TritonBackend()
    before = backend.routed_experts(x, weights, ids, table, None, 7.0)
    table[3] = _expert_table(1, 128, 64, "fp8", seed=7)[0]  # a new expert 3 (new tensors)
    after = backend.routed_experts(x, weights, ids, table, None, 7.0)
    want = REF.routed_experts(x, weights, ids, table, None, 7.0)
    assert not torch.allclose(before, want, rtol=1e-2)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))

    assert not backend.routes_on_device(x, _Table([*table[:3], None]))
    assert not backend.routes_on_device(x, _Table([*table[:3], *_expert_table(1, 128, 64, "fp4", seed=8)]))
    floats = _Table(ExpertWeights(torch.randn(64, 128), None, torch.randn(64, 128), None, torch.randn(128, 64), None)
                    for _ in range(2))
    assert backend.routes_on_device(x, floats) and not backend.routes_on_device(x.bfloat16(), floats)
    assert not backend.routes_on_device(x.double(), table)
    assert REF.routes_on_device(x, table) is False


def test_routed_experts_covers_one_format_a_table():
    from dsv4.kernels import ExpertWeights
    from dsv4.kernels.triton import experts

    table = _expert_table(4, 128, 64, "fp8", seed=3)
    x = torch.randn(3, 128).to(ON_DEVICE)
    assert experts.covers(x, table, [0, 2])
    assert not experts.covers(x, table, [])
    assert not experts.covers(x.double(), table, [0])
    assert not experts.covers(x, [None, *table[1:]], [0, 1])

    def floats(dtype=torch.float32, inter=64, scale=None):
        return ExpertWeights(torch.randn(inter, 128, dtype=dtype), scale, torch.randn(inter, 128, dtype=dtype), None,
                             torch.randn(128, inter, dtype=dtype), None)

    assert experts.covers(x, [floats(), floats()], [0, 1])
    assert experts.covers(x.bfloat16(), [floats(torch.bfloat16)], [0])
    assert not experts.covers(x, [floats(torch.bfloat16)], [0])  # the weights' dtype must be the activations'
    assert not experts.covers(x, [floats(), floats(inter=32)], [0, 1])  # one shape
    assert not experts.covers(x, [floats(), table[1]], [0, 1])  # one format
    assert not experts.covers(x, [table[0], floats()], [0, 1])
    assert not experts.covers(x, [floats(scale=torch.ones(1))], [0])  # a scaled float weight: not a format here

    # the kernels load the weights as 16-byte aligned: a weight that is a view at another offset is the reference's
    def off_by(t: torch.Tensor, elements: int) -> torch.Tensor:
        store = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)
        view = store[elements:].view(t.shape)
        view.copy_(t)
        return view

    odd = dataclasses.replace(table[1], w1=off_by(table[1].w1, 1))
    assert odd.w1.is_contiguous() and odd.w1.data_ptr() % 16 and torch.equal(odd.w1.float(), table[1].w1.float())
    assert experts.covers(x, [table[0], table[1]], [0, 1])
    assert not experts.covers(x, [table[0], odd], [0, 1])
    assert not experts.covers(x, [table[0], dataclasses.replace(table[1], w2=off_by(table[1].w2, 8))], [0, 1])
    assert experts.covers(x, [table[0], dataclasses.replace(table[1], w1=off_by(table[1].w1, 16))], [0, 1])
    unaligned = floats()
    assert not experts.covers(x, [dataclasses.replace(unaligned, w3=off_by(unaligned.w3, 2))], [0])


def _float_table(n_experts: int, dim: int, inter: int, dtype: torch.dtype, seed: int) -> list:
    """Float experts (no scales) in `dtype`."""
    from dsv4.kernels import ExpertWeights

    g = torch.Generator().manual_seed(seed)

    def weight(rows, cols):
        return (torch.randn(rows, cols, generator=g) * 0.1).to(dtype).to(ON_DEVICE)

    return [ExpertWeights(weight(inter, dim), None, weight(inter, dim), None, weight(dim, inter), None)
            for _ in range(n_experts)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheduled", ["host", "device"])
def test_float_routed_experts_match_the_reference_loop(dtype, scheduled):
    """Float experts (a plain model's, in the activations' dtype) through the grouped kernels, scheduled on the host
    (`which` given) or on the device: an expert with 14 rows of 21 tokens, experts with none. fp32 agrees to fp32
    rounding; bf16 to a bf16 step of the gate or up (rounded before the clamp and SwiGLU) carried through w2."""
    n_experts, dim, inter, tokens, k = 8, 96, 80, 21, 3  # (neither a multiple of the 32-wide K blocks nor of 64)
    table = _Table(_float_table(n_experts, dim, inter, dtype, seed=4))
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(tokens, dim, generator=g) * 2).to(dtype).to(ON_DEVICE)
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(tokens)])
    ids[:, 0] = torch.where(torch.arange(tokens) < 14, 5, ids[:, 0])
    ids[:14, 1:] = torch.where(ids[:14, 1:] == 5, 0, ids[:14, 1:])
    ids = ids.to(ON_DEVICE)
    weights = torch.rand(tokens, k, generator=g).to(ON_DEVICE)
    backend = TritonBackend()
    which = None if scheduled == "device" else sorted(set(ids.flatten().tolist()))
    assert backend.routes_on_device(x, table)
    got = backend.routed_experts(x, weights, ids, table, which, 7.0)
    want = REF.routed_experts(x, weights, ids, table, which, 7.0)
    _assert_experts_close(got, want, dtype)
    zeros = _Table(_float_table(n_experts, dim, inter, dtype, seed=4))
    zeros[5] = type(zeros[5])(*(None if t is None else torch.zeros_like(t) for t in vars(zeros[5]).values()))
    assert not torch.allclose(backend.routed_experts(x, weights, ids, zeros, which, 7.0), got)  # expert 5 counts


def test_experts_with_a_training_recipes_forwards_run_them_under_the_triton_backend():
    """A recipe's fake-quant forwards (here FP8) replace a float model's expert linears: the device-scheduled
    kernels, which read the raw weights, must not take such a layer, also where no gradient is wanted (evaluation
    during training). The MoE's output equals the reference backend's, which calls the modules."""
    from dsv4.config import preset
    from dsv4.model import Transformer, init_weights
    from dsv4.train import apply_precision

    model = init_weights(Transformer(preset("tiny"), dtype=torch.float32), seed=0).to(ON_DEVICE)
    moe = model.layers[1].ffn
    x, tokens = torch.randn(1, 6, model.args.dim).to(ON_DEVICE), torch.arange(6).view(1, 6).to(ON_DEVICE)
    with torch.no_grad(), kernels.use_backend("triton"):
        raw = moe(x, tokens)
        apply_precision(model, "fp8")
        assert moe.replaced_forwards()
        fast = moe(x, tokens)
    with torch.no_grad(), kernels.use_backend("reference"):
        slow = moe(x, tokens)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5 * float(slow.abs().max()))
    assert not torch.allclose(raw, slow, rtol=1e-3, atol=1e-3)  # the recipe changes the result


# ---------------------------------------------------------------------------------------------- the model end to end


def test_plain_fp32_model_logits_equal_the_reference():
    """Plain fp32 numerics (no FP8 rounding downstream to magnify a last bit): the whole forward's logits agree to
    1e-5 of their scale, the issue's bar for a fast backend, and the greedy tokens are the same."""
    from dsv4.config import preset
    from dsv4.model import Transformer, init_weights

    args = preset("tiny").replace(max_seq_len=64)
    model = init_weights(Transformer(args, dtype=torch.float32), seed=0).eval().to(ON_DEVICE)
    tokens = torch.randint(0, args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0)).to(ON_DEVICE)
    with torch.inference_mode():
        with kernels.use_backend("triton"):
            fast = model(tokens).cpu()
        with kernels.use_backend("reference"):
            slow = model(tokens).cpu()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5 * float(slow.abs().max()))
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))


def test_the_demo_answers_the_same_under_the_triton_backend():
    """Exact numerics (FP8 weights and activations, FP8 KV, FP4 indexer): the demo's greedy answer to a held-out
    prompt is token for token the reference backend's, through the engine (paged cache, chunked prefill)."""
    from dsv4 import load_model
    from dsv4.chat.encoding import encode_messages
    from dsv4.chat.tokenizer import Tokenizer
    from dsv4.demo import MODEL_DIR
    from dsv4.engine import Engine, SamplingParams

    tokenizer = Tokenizer.load(MODEL_DIR)
    prompt = tokenizer.encode(encode_messages([{"role": "user", "content": "What is 17 + 25?"}],
                                              thinking_mode="chat"))
    model = load_model(MODEL_DIR, numerics="exact", device=ON_DEVICE)
    answers = {}
    for backend in ("triton", "reference"):
        engine = Engine(model, max_batch=1, max_seq_len=256, prefill_chunk=64, kernel_backend=backend)
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=8))
        tokens = []
        while engine.has_unfinished():
            for update in engine.step():
                tokens += update.new_token_ids
        answers[backend] = tokens
    assert len(answers["reference"]) == 8
    assert answers["triton"] == answers["reference"], tokenizer.decode(answers["reference"])


def test_a_decode_steps_moe_layers_and_entry_counts_read_nothing_on_the_host():
    """Engine decode steps in exact numerics (FP4 experts, triton backend) across a CSA entry's completion: no MoE
    layer reads the experts its tokens chose and no compressor its entry counts (each such read is a wait for the
    device on a GPU), nor a compressor's pooling plan, nor the indexer's top-k (the Triton kernel), nor the
    engine's split of decodes from prefill chunks. What still reads, each step: the forward's checks and the
    tokens."""
    from host_reads import count_host_reads

    from dsv4.config import preset
    from dsv4.engine import Engine, SamplingParams
    from dsv4.formats import to_official_formats
    from dsv4.model import Transformer, init_weights

    tiny = preset("tiny")  # its ratios 0, 4, 8, 4, 8 (window, CSA, HCA, ...) then the MTP block's
    args = tiny.replace(n_layers=4, compress_ratios=(*tiny.compress_ratios[:4], tiny.compress_ratios[-1]),
                        max_seq_len=64)
    model = to_official_formats(init_weights(Transformer(args, torch.bfloat16, "exact"), seed=0)).eval()
    engine = Engine(model.to(ON_DEVICE), max_batch=2, max_seq_len=64, kernel_backend="triton")
    for row in range(2):
        engine.add_request(list(range(3 + row, 20 + 2 * row)), SamplingParams(temperature=0.0, max_tokens=8,
                                                                               ignore_eos=True))
    engine.step()  # the prompts (17 and 18 tokens)
    with count_host_reads() as reads:
        for _ in range(4):  # positions 17..20 and 18..21: each row finishes a CSA entry
            engine.step()
    files = {site.split(" @ ")[1].split(":")[0] for site in reads}
    assert files == {"model/transformer.py", "engine/engine.py"}, reads
    by_file = {f: [(site.split(" @ ")[0], n) for site, n in reads.items() if f in site] for f in files}
    assert by_file["model/transformer.py"] == [("tolist", 4)], reads  # the checks, once a step
    assert by_file["engine/engine.py"] == [("tolist", 4)], reads  # the greedy tokens, once a step
