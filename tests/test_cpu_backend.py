"""The fast "cpu" kernel backend against the reference oracle, op by op and end to end.

Where the cpu backend keeps the reference's rounding order the results must be equal bit for bit: quantisation
(elementwise, on every machine), and the block-scaled GEMMs, the quantised experts, Sinkhorn and attention over
bf16 rows, whose bits also depend on which BLAS and reduction kernels the machine's torch build picks, so they
are compared bit for bit on the machine kind the regression pins were written on (`test_regression_pins.py`,
where this was established) and within fp32 rounding on any other (checked, not skipped). Where the backend
sums fp32 products in another order (float experts as one batched GEMM, fp32 attention as one softmax) they
must agree within 1e-5 of the largest value. The model-level pins run on both backends too."""

from __future__ import annotations

import pytest
import torch

from dsv4 import kernels
from dsv4.config import preset
from dsv4.engine import Engine, SamplingParams
from dsv4.formats import to_official_formats
from dsv4.kernels.cpu import CpuBackend, DecodedWeights
from dsv4.kernels.reference import ReferenceBackend
from dsv4.model import Transformer, init_weights
from dsv4.quant import quantize_fp4_weight, quantize_fp8_weight

REF = ReferenceBackend()


def _same_machine_kind() -> bool:
    """The machine is of the kind the pins were first written on, where the bit equality was established (on an
    AMD CPU at the same capability level the batched block GEMM and the reference's differ in the last bit for
    some row counts)."""
    from test_regression_pins import PINS, kind_of_this_machine

    return kind_of_this_machine(torch.load(PINS, weights_only=True)) == 0


SAME_KIND = _same_machine_kind()


def assert_same(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """Bit for bit on the pins' machine kind; elsewhere within `rtol` of the largest value."""
    if SAME_KIND:
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=rtol * want.float().abs().max().item())


@pytest.fixture
def fast():
    return CpuBackend()


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _awkward(shape, seed=0):
    """Values that probe the rounding rules: wide magnitudes, exact powers of two, zeros, ties, tiny blocks."""
    x = _rand(*shape, seed=seed) * torch.exp2(torch.randint(-20, 20, shape, generator=torch.Generator()
                                                            .manual_seed(seed + 1)).float())
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[1::11] = 2.0 ** torch.randint(-10, 10, flat[1::11].shape).float()
    flat[2::13] = 0.25  # an FP4 tie after scaling in some blocks
    flat[3::17] = -0.0
    x[..., :32] *= 1e-9  # blocks below the amax floors
    return x


# ---------------------------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [128, 256, 200, 64])
def test_block_quantisers_equal_the_reference_bit_for_bit(fast, dtype, k):
    x = _awkward((5, 3, k)).to(dtype)
    for block in (128, 64):
        q, s = fast.act_quant(x, block)
        rq, rs = REF.act_quant(x, block)
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    for block in (64, 128):
        assert torch.equal(fast.fp8_simulate(x, block), REF.fp8_simulate(x, block))
    for block in (32, 16):
        got, want = fast.fp4_simulate(x, block), REF.fp4_simulate(x, block)
        assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


def test_the_fp4_rounding_hits_every_grid_point_and_tie(fast):
    """Values scaled into [-6, 6] at steps of 1/16: every e2m1 code, every midpoint (ties to even), saturation."""
    grid = torch.arange(-6 * 16, 6 * 16 + 1, dtype=torch.float32) / 16
    x = torch.cat((grid, torch.full((31,), 6.0))).view(-1, 32)  # one block per row, amax 6 -> scale 1
    assert torch.equal(fast.fp4_simulate(x), REF.fp4_simulate(x))


# ---------------------------------------------------------------------------------------------- GEMMs


@pytest.mark.parametrize("m", [1, 2, 7, 33])
@pytest.mark.parametrize("n, k", [(256, 128), (384, 256), (128, 512), (200, 320), (64, 4096)])
def test_fp8_and_fp4_gemms_equal_the_reference_bit_for_bit(fast, m, n, k):
    x = _rand(m, k, seed=m + k)
    xq, xs = REF.act_quant(x)
    w8, s8 = quantize_fp8_weight(_rand(n, k, seed=n, scale=0.05))
    assert_same(fast.fp8_gemm(xq, xs, w8, s8, torch.float32), REF.fp8_gemm(xq, xs, w8, s8, torch.float32))
    if k % 32 == 0:
        w4, s4 = quantize_fp4_weight(_rand(n, k, seed=n + 1, scale=0.05))
        got = fast.fp4_gemm(xq, xs, w4, s4, torch.bfloat16)
        assert_same(got, REF.fp4_gemm(xq, xs, w4, s4, torch.bfloat16), rtol=2**-8)


def test_decoded_weights_are_kept_refreshed_and_bounded():
    w, s = quantize_fp8_weight(_rand(256, 256, scale=0.1))
    cache = DecodedWeights(limit_bytes=1 << 20)
    values, _ = cache.get(w, s, "fp8")
    assert cache.get(w, s, "fp8")[0] is values and cache.used_bytes > 0  # decoded once
    w.view(torch.uint8)[0, 0] ^= 0x10  # an in-place change moves the version: decoded again
    again, _ = cache.get(w, s, "fp8")
    assert again is not values and again[0, 0] == w[0, 0].float()
    del w, values, again
    assert cache.used_bytes == 0  # freed with the weight
    small = DecodedWeights(limit_bytes=1000)  # too small to keep anything: decoded per call, same values
    w, s = quantize_fp8_weight(_rand(64, 64))
    assert torch.equal(small.get(w, s, "fp8")[0], w.float()) and small.used_bytes == 0


# ---------------------------------------------------------------------------------------------- experts


def _experts(n, d, inter, quantised, seed=0):
    out = []
    for e in range(n):
        ws = [_rand(*shape, seed=seed + 3 * e + i, scale=0.1) for i, shape in enumerate(((inter, d), (inter, d),
                                                                                           (d, inter)))]
        if quantised:
            (w1, s1), (w3, s3), (w2, s2) = quantize_fp4_weight(ws[0]), quantize_fp4_weight(ws[1]), \
                quantize_fp8_weight(ws[2])
        else:
            (w1, s1), (w3, s3), (w2, s2) = (ws[0], None), (ws[1], None), (ws[2], None)
        out.append(kernels.ExpertWeights(w1, s1, w3, s3, w2, s2))
    return out


@pytest.mark.parametrize("quantised", [True, False])
@pytest.mark.parametrize("tokens, k", [(1, 2), (5, 2), (40, 6), (300, 3)])
def test_routed_experts_equal_the_reference(fast, quantised, tokens, k):
    n_experts, d = 8, 128
    experts = _experts(n_experts, d, 64, quantised)
    x = _rand(tokens, d, seed=tokens)
    gen = torch.Generator().manual_seed(k)
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    which = sorted(set(ids.flatten().tolist()))
    with torch.no_grad():
        got = fast.routed_experts(x, weights, ids, experts, which, 10.0)
        want = REF.routed_experts(x, weights, ids, experts, which, 10.0)
        if quantised:
            assert_same(got, want, rtol=2**-8)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
        # experts held by another rank (None) are skipped, the rows routed to them add nothing
        held = which[::2]
        partial = [e if i in held else None for i, e in enumerate(experts)]
        got = fast.routed_experts(x, weights, ids, partial, held, 10.0)
        want = REF.routed_experts(x, weights, ids, experts, held, 10.0)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_routed_experts_keep_gradients_for_training(fast):
    experts = _experts(4, 32, 16, quantised=False)
    for e in experts:
        for w in (e.w1, e.w2, e.w3):
            w.requires_grad_(True)
    x = _rand(6, 32).requires_grad_(True)
    ids = torch.tensor([[0, 1]] * 6)
    fast.routed_experts(x, torch.ones(6, 2), ids, experts, [0, 1, 3], 10.0).sum().backward()
    assert x.grad is not None and experts[0].w1.grad is not None
    assert experts[3].w1.grad is not None and not experts[3].w1.grad.any()  # ran on no rows, still in the graph


# ---------------------------------------------------------------------------------------------- attention, mHC


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [5, 64, 100, 200])
def test_sparse_attention_equals_the_reference(fast, dtype, slots):
    b, s, h, d, n = 2, 3, 4, 32, 150
    q = _rand(b, s, h, d, seed=1).to(dtype)
    window = _rand(b, 40, d, seed=2).to(dtype)
    entries = _rand(b, n, d, seed=3).to(dtype)
    # the entries left in pages: 16 rows per page, pages shuffled in the pool
    per_page, pages = 16, -(-n // 16)
    order = torch.randperm(b * pages, generator=torch.Generator().manual_seed(4))
    pool = torch.zeros(b * pages, per_page, d, dtype=dtype)
    padded = torch.nn.functional.pad(entries, (0, 0, 0, pages * per_page - n)).view(b, pages, per_page, d)
    table = order.view(b, pages)
    pool[table.flatten()] = padded.flatten(0, 1)
    paged = kernels.PagedRows(pool, table, n, None, dtype)
    gen = torch.Generator().manual_seed(slots)
    idx = torch.randint(0, 40 + n, (b, s, slots), generator=gen)
    idx[torch.rand(b, s, slots, generator=gen) < 0.2] = -1
    idx[0, 0] = -1  # a query with no rows at all returns 0
    sink = _rand(h, seed=5)
    want = REF.sparse_attn(q, [window, paged], idx, sink, d**-0.5)
    got = fast.sparse_attn(q, [window, paged], idx, sink, d**-0.5)
    if dtype == torch.bfloat16:
        assert_same(got, want, rtol=2**-8)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not got[0, 0].any()


@pytest.mark.parametrize("queries, slots", [(1, 5), (1, 100), (1, 130), (20, 40), (20, 131), (3, 67), (1, 192)])
def test_attention_over_bf16_rows_is_the_references_bit_for_bit(queries, slots):
    """Exact numerics' attention over bf16 rows on the "cpu" backend (native's fallback where its C kernels do not
    apply) gives the reference's bits, seen in fp32 (queries in fp32 holding bf16 values): the last partial 64-slot
    block's logits from an einsum over its own slots (BLAS sums a few in another order) and its sum over its own
    slots (not 64 padded ones), for decodes and chunks that score every row or gather their slots."""
    gen = torch.Generator().manual_seed(queries * 1000 + slots)
    n = 30 if queries * slots >= 600 else 300
    q = torch.randn(2, queries, 8, 128, generator=gen).bfloat16().float()
    rows = torch.randn(2, n, 128, generator=gen).bfloat16()
    idx = torch.randint(-1, n, (2, queries, slots), generator=gen)
    sink = torch.randn(8, generator=gen)
    assert torch.equal(CpuBackend().sparse_attn(q, rows, idx, sink, 128**-0.5),
                       REF.sparse_attn(q, rows, idx, sink, 128**-0.5))


def test_sinkhorn_equals_the_reference_bit_for_bit(fast):
    for shape in ((1, 1), (3, 7), (2, 300), (1, 16), (1, 15)):  # both layouts, on both sides of the switch
        mixes = _rand(*shape, 24, seed=shape[1])
        scale, base = _rand(3, seed=1), _rand(24, seed=2)
        with torch.no_grad():
            for got, want in zip(fast.hc_split_sinkhorn(mixes, scale, base, 4, 20, 1e-6),
                                 REF.hc_split_sinkhorn(mixes, scale, base, 4, 20, 1e-6), strict=True):
                assert_same(got, want)


# ---------------------------------------------------------------------------------------------- end to end


def _greedy(model, prompts, backend, **options):
    engine = Engine(model, max_batch=len(prompts), max_seq_len=160, prefill_chunk=64, kernel_backend=backend,
                    **options)
    assert engine.stats().kernel_backend == backend
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    out = {i: [] for i in ids}
    while engine.has_unfinished():
        for u in engine.step():
            out[u.request_id] += u.new_token_ids
    return [out[i] for i in ids]


def small_preset_case(numerics: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """The `small` preset (random weights; exact: bf16 with FP8 / FP4 weights) on `backend` and on the reference:
    their logits [2, 150, V] over a 100-token chunk, one decode and a 49-token chunk, and their greedy tokens
    through the engine (exact: with FP8 pages and MTP speculation on the way)."""
    args = preset("small").replace(vocab_size=4096, max_seq_len=512)
    dtype = torch.float32 if numerics == "plain" else torch.bfloat16
    model = init_weights(Transformer(args, dtype=dtype, numerics=numerics), seed=0).eval()
    if numerics == "exact":
        to_official_formats(model)
    tokens = torch.randint(0, args.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {}
        for name in ("reference", backend):
            with kernels.use_backend(name):
                cache = model.new_cache(2, 160)
                logits[name] = torch.cat([model(tokens[:, :100], cache), model(tokens[:, 100:101], cache),
                                          model(tokens[:, 101:], cache)], dim=1)
    prompts = tokens[:, :60].tolist() + [tokens[0, :7].tolist()]
    opts = {} if numerics == "plain" else {"kv_format": "fp8", "num_speculative": 1}
    return (logits[backend], logits["reference"], _greedy(model, prompts, backend, **opts),
            _greedy(model, prompts, "reference", **opts))


@pytest.mark.parametrize("numerics", ["plain", "exact"])
def test_the_small_preset_gives_the_reference_logits_and_greedy_tokens(numerics):
    got, want, tokens, reference_tokens = small_preset_case(numerics, "cpu")
    if numerics == "exact":  # elsewhere: the official-parity tolerance, one bf16 step of the largest logit
        assert_same(got, want, rtol=2**-8)
    else:
        err = (got - want).abs().max() / want.abs().max()
        assert err <= 1e-5, err
    assert tokens == reference_tokens


def test_a_vocabulary_projection_multiplies_a_kept_transposed_copy(fast):
    from dsv4.kernels.cpu import VOCAB_ROWS

    w = _rand(VOCAB_ROWS + 5, 64, seed=1)
    x = _rand(3, 64, seed=2)
    with torch.no_grad():
        got = fast.linear(x, w)
    want = REF.linear(x, w)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert fast.decoded.used_bytes == w.numel() * 4  # the copy is kept
    w.requires_grad_(True)
    fast.linear(x, w).sum().backward()  # training multiplies the parameter itself
    assert w.grad is not None


def test_a_prefill_blocks_attention_scores_only_the_rows_its_slots_name(fast, monkeypatch):
    """A block of a prefill's queries names a band of window rows and the compressed entries: the dense GEMM runs
    over those rows only (renumbered), with the reference's result and gradients; repeated and unused slots too."""
    from dsv4.kernels import cpu

    b, s, h, d, n = 2, 24, 4, 32, 200
    start = torch.arange(s).view(1, s, 1) + 60  # a 16-row window band per query, rows 60 .. 99
    window = (start - torch.arange(16).view(1, 1, 16)).expand(b, s, 16)
    entries = torch.arange(190, 198).view(1, 1, 8).expand(b, s, 8)  # the compressed entries, at the end
    idx = torch.cat((window, entries, entries[..., :2]), dim=-1).clone()  # two named twice
    idx[:, :3, :5] = -1
    kept = []
    used_rows = cpu._used_rows
    monkeypatch.setattr(cpu, "_used_rows", lambda rows, slots: kept.append(used_rows(rows, slots)[0].shape[1])
                        or used_rows(rows, slots))
    grads = {}
    for name, backend in (("reference", REF), ("cpu", fast)):
        q = _rand(b, s, h, d, seed=1).requires_grad_(True)
        kv = _rand(b, n, d, seed=2).requires_grad_(True)
        sink = _rand(h, seed=3).requires_grad_(True)
        out = backend.sparse_attn(q, kv, idx, sink, d**-0.5)
        (out * _rand(*out.shape, seed=5)).sum().backward()
        grads[name] = (out.detach(), q.grad, kv.grad, sink.grad)
    assert kept and kept[0] < 50  # 40 window rows, 8 entries, row 0 of the unused slots: not 200
    for want, got in zip(grads["reference"], grads["cpu"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_a_long_chunk_attends_in_query_blocks_with_far_and_masked_logits_exact(fast, monkeypatch):
    """A chunk longer than DENSE_QUERY_BLOCK attends block by block, each over its own band of rows; logits far below
    their query's maximum (exp's slow, denormal range, clamped) and masked slots weigh what the reference gives
    them, and a query with no slot at all returns 0."""
    from dsv4.kernels import cpu

    b, s, h, d, n, w = 2, 150, 4, 32, 180, 24
    assert s > 2 * cpu.DENSE_QUERY_BLOCK
    band = (torch.arange(s).view(1, s, 1) + 20 - torch.arange(w).view(1, 1, w)).expand(b, s, w).clone()
    band[:, ::7, 3] = -1
    band[1, 5] = -1  # a query whose every slot is unused
    blocks = []
    used_rows = cpu._used_rows
    monkeypatch.setattr(cpu, "_used_rows", lambda rows, slots: blocks.append(slots.shape[1]) or used_rows(rows, slots))
    grads = {}
    for name, backend in (("reference", REF), ("cpu", fast)):
        q = (_rand(b, s, h, d, seed=1) * 30).requires_grad_(True)  # logits spread over hundreds: exp(-87) and below
        kv = _rand(b, n, d, seed=2).requires_grad_(True)
        sink = _rand(h, seed=3).requires_grad_(True)
        out = backend.sparse_attn(q, kv, band, sink, d**-0.5)
        (out * _rand(*out.shape, seed=5)).sum().backward()
        grads[name] = (out.detach(), q.grad, kv.grad, sink.grad)
    assert blocks == [cpu.DENSE_QUERY_BLOCK, cpu.DENSE_QUERY_BLOCK, s - 2 * cpu.DENSE_QUERY_BLOCK]
    assert not grads["cpu"][0][1, 5].any()
    for want, got in zip(grads["reference"], grads["cpu"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("s", [1, 40])  # rows read by index (decode), every row scored by one GEMM (prefill)
def test_sparse_attention_gradients_match_the_reference(fast, s):
    b, h, d, n, k = 2, 4, 32, 60, 48
    grads = {}
    for name, backend in (("reference", REF), ("cpu", fast)):
        q = _rand(b, s, h, d, seed=1).requires_grad_(True)
        kv = _rand(b, n, d, seed=2).requires_grad_(True)
        sink = _rand(h, seed=3).requires_grad_(True)
        idx = torch.randint(0, n, (b, s, k), generator=torch.Generator().manual_seed(4))
        idx[:, :, ::5] = -1
        out = backend.sparse_attn(q, kv, idx, sink, d**-0.5)
        (out * _rand(*out.shape, seed=5)).sum().backward()
        grads[name] = (out.detach(), q.grad, kv.grad, sink.grad)
    for want, got in zip(grads["reference"], grads["cpu"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
