"""The Triton sparse attention (`dsv4.kernels.triton.attention`) against the reference backend's `sparse_attn`.

Without a GPU the kernel runs on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), so the shapes are small and the programs few.
"""

import pytest
import torch

pytest.importorskip("triton")

from dsv4.kernels.paged import PagedRows  # noqa: E402
from dsv4.kernels.reference import ReferenceBackend  # noqa: E402
from dsv4.kernels.triton import attention  # noqa: E402
from dsv4.kv_formats import CastCodec  # noqa: E402
from dsv4.kv_formats.fp8 import PackedCodec  # noqa: E402

REF = ReferenceBackend()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).to(DEVICE)


def _slots(b, s, k, n, unused=0.25):
    """idx [B, S, K]: random rows of n (each batch row its own), about `unused` of the slots -1, and query 1 of
    batch row 0 with no used slot at all."""
    idx = torch.randint(0, n, (b, s, k))
    idx[torch.rand(b, s, k) < unused] = -1
    idx[0, 1] = -1
    return idx.to(DEVICE)


def _paged(entries, per_page, codec, garbage):
    """`entries` [B, n, D] left in a pool of pages of `per_page` rows, stored by `codec` (None: as they are), in
    shuffled pages with spare ones between them; every stored element that is not one of the entries (spare pages,
    the last page's tail) is `garbage`, so a read of a wrong row shows up as NaN."""
    b, n, d = entries.shape
    pages = -(-n // per_page)
    padded = torch.nn.functional.pad(entries, (0, 0, 0, pages * per_page - n)).view(b * pages, per_page, d)
    stored = padded if codec is None else codec.encode(padded)
    pool = torch.full((b * pages + 3, per_page, stored.shape[-1]), garbage, dtype=stored.dtype, device=DEVICE)
    order = torch.randperm(b * pages + 3)[: b * pages].to(DEVICE)
    pool[order] = stored
    table = order.view(b, pages)
    if n % per_page:  # the rows past n in each batch row's last page
        pool[table[:, -1], n % per_page :] = garbage
    dtype = stored.dtype if codec is None else codec.compute
    return PagedRows(pool, table, n, codec, dtype)


def _check_fp32(got, want):
    # fp32: the same operations in the same order per 64-slot block, only the dots' summation order differs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _check_bf16(got, want):
    # bf16 rows: the kernel rounds the same unnormalised p (and a bf16 result) as the reference does, but another
    # summation order or exp() can move a value across a bf16 rounding boundary. One such flip costs at most one
    # bf16 step of the result's magnitude (2**-7 of the largest value) and touches one (query, head) row, so
    # besides that bound at most 1/8 of the rows may differ beyond fp32 noise: a systematic change (p rounded
    # after normalising, not rounded at all, other slot blocks than 64, truncation) moves 40-90% of them.
    # Under the interpreter the results are in fact equal to the reference (bar a rare tiny element).
    got, want = got.float(), want.float()
    top = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=2**-7 * top)
    off = ((got - want).abs() > 1e-5 * top).any(dim=-1).float().mean().item()
    assert off <= 1 / 8, f"{off:.0%} of the rows differ"


@pytest.fixture(params=["one program", "split"])
def split(request, monkeypatch):
    """Each query's slots in one program, or split across programs as on a GPU whose processors outnumber the
    queries' programs (a decode step's: `attention.split_slots`), each program's state then merged by
    `_split_combine_kernel`. Yields the merges launched (a list), so a test can check the split took place."""
    from dsv4.kernels.triton import gemm

    merges = []
    if request.param == "split":
        monkeypatch.setattr(gemm, "processors", lambda device: 64)
        monkeypatch.setattr(attention, "MIN_SPLIT_WORK", 0)  # (these tests' walks are short)
        kernel = attention._split_combine_kernel

        class Counting:
            def __getitem__(self, grid):
                merges.append(grid)
                return kernel[grid]

        monkeypatch.setattr(attention, "_split_combine_kernel", Counting())
    yield merges if request.param == "split" else None


def _check_split(merges, k):
    """Where the slots were to be split (more than one 64-slot block), they were."""
    if merges is not None:
        assert bool(merges) == (k > attention.ATTN_BLOCK)


def test_split_slots_fill_the_processors_with_whole_blocks(monkeypatch):
    """A decode step's few programs (V4-Flash at batch 1: 64 heads of 512 in 2 programs of 32, 640 slots) split
    into whole 64-slot blocks, as many splits as fill the processors; enough programs, one block, or a short walk
    (the small preset's 16 heads of 128 over 4 blocks) are not split."""
    cpu, flash, small = torch.device("cpu"), 32 * 512, 16 * 128
    assert attention.split_slots(2, 640, flash, cpu) == (640, 1)  # the interpreter: one processor
    from dsv4.kernels.triton import gemm

    monkeypatch.setattr(gemm, "processors", lambda device: 132)
    assert attention.split_slots(2, 640, flash, cpu) == (64, 10)
    assert attention.split_slots(16, 640, flash, cpu) == (128, 5)  # 9 wanted: 5 of 2 blocks
    assert attention.split_slots(40, 640, flash, cpu) == (192, 4)  # 4 splits of 3 blocks, the last 1
    assert attention.split_slots(128, 640, flash, cpu) == (640, 1)  # batch 64: the programs fill it
    assert attention.split_slots(2, 64, flash, cpu) == (64, 1)
    assert attention.split_slots(1, 256, small, cpu) == (256, 1)
    assert attention.split_slots(1, 4096, small, cpu) == (64, 64)  # a long context: its walk is long
    for programs in range(1, 70):
        for k in (65, 129, 640, 1000):
            chunk, splits = attention.split_slots(programs, k, 10**6, cpu)
            assert chunk % attention.ATTN_BLOCK == 0 or splits == 1
            assert (splits - 1) * chunk < k <= splits * chunk  # every split has slots, every slot a split


@pytest.mark.parametrize("k, n_runs", [(5, 2), (64, 1), (150, 2)])
def test_fp32_dense_runs_equal_the_reference(k, n_runs, split):
    """One or two dense runs, one slot block (whole or partial) or several, 20 heads (two head blocks), D = 40
    (padded to 64), a strided q, per batch row indices with scattered -1, a query with no used slot."""
    torch.manual_seed(k)
    b, s, h, d, n0, n1 = 2, 3, 20, 40, 30, 50
    q = _rand(b, h, s, d).transpose(1, 2)  # [B, S, H, D], not contiguous
    runs = [_rand(b, n0, d), _rand(b, n1, d)][:n_runs]
    idx, sink = _slots(b, s, k, n0 + n1 if n_runs == 2 else n0), _rand(h)
    assert attention.covers(q, runs, idx, sink)
    got = attention.sparse_attn(q, runs, idx, sink, d**-0.5)
    want = REF.sparse_attn(q, runs, idx, sink, d**-0.5)
    assert got.dtype == torch.float32 and got.shape == (b, s, h, d)
    _check_fp32(got, want)
    _check_split(split, k)
    assert torch.equal(got[0, 1], torch.zeros_like(got[0, 1]))  # all slots unused: exactly 0
    # the second query's slots differ per batch row, so the batch rows' results must too
    assert not torch.allclose(got[0, 0], got[1, 0])


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
def test_bf16_rows_equal_the_reference_within_a_bf16_step(q_dtype, split):
    """bf16 rows (the second run given in fp32 and cast to the first run's bf16, as `concat_rows` does), q bf16
    (tensor-core dots) or fp32 (fp32 logits, bf16 value product); the output in q's dtype."""
    torch.manual_seed(1)
    b, s, h, d, n0, n1, k = 2, 4, 16, 32, 40, 60, 150
    q = _rand(b, s, h, d, dtype=q_dtype, scale=2.0)
    window, entries = _rand(b, n0, d, dtype=torch.bfloat16), _rand(b, n1, d)
    idx, sink = _slots(b, s, k, n0 + n1), _rand(h)
    got = attention.sparse_attn(q, [window, entries], idx, sink, d**-0.5)
    want = REF.sparse_attn(q, [window, entries], idx, sink, d**-0.5)
    assert got.dtype == q_dtype
    _check_bf16(got, want)
    _check_split(split, k)
    assert not got[0, 1].any()


@pytest.mark.parametrize(("dtype", "d", "half"), [(torch.float32, 40, 8), (torch.bfloat16, 64, 16),
                                                  (torch.bfloat16, 32, 16)])
def test_the_output_rotated_back_as_it_is_written(dtype, d, half, split):
    """With cos / sin the kernel writes its output with the last 2*half dims rotated back: bit for bit the output
    then the Triton rope kernel's inverse rotation (D padded to the tile or not; every dim rotated), and the
    reference op (`rope_back` after its attention) within the attention's tolerance."""
    from dsv4.kernels.triton import rows

    torch.manual_seed(d + half)
    b, s, h, n0, n1, k = 2, 3, 20, 30, 50, 70
    q = _rand(b, s, h, d, dtype=dtype, scale=2.0)
    runs = [_rand(b, n0, d, dtype=dtype), _rand(b, n1, d, dtype=dtype)]
    idx, sink = _slots(b, s, k, n0 + n1), _rand(h)
    cos, sin = _rand(b, s, half), _rand(b, s, half)
    assert attention.covers_rotation(q, cos, sin)
    got = attention.sparse_attn(q, runs, idx, sink, d**-0.5, cos, sin)
    plain = attention.sparse_attn(q, runs, idx, sink, d**-0.5)
    assert torch.equal(got, rows.rope(plain, cos.unsqueeze(2), sin.unsqueeze(2), inverse=True))
    assert not torch.equal(got[..., -2 * half :], plain[..., -2 * half :])
    want = REF.sparse_attn(q, runs, idx, sink, d**-0.5, cos, sin)
    (_check_fp32 if dtype == torch.float32 else _check_bf16)(got, want)
    _check_split(split, k)
    assert not attention.covers_rotation(q, cos[..., :1, :], sin[..., :1, :])  # a shape it does not take
    assert not attention.covers_rotation(q, cos, None)


@pytest.mark.parametrize("store", ["none-fp32", "none-bf16", "cast", "cast-down", "fp8"])
def test_paged_entries_equal_the_reference(store, split):
    """A dense window run, then compressed entries left in shuffled pages of a pool: compute rows (codec None),
    bf16 rows of an fp32 model (`CastCodec`), or the production fp8 entries (`PackedCodec`, decoded in the kernel;
    D = 96 with 16 rope dims: 80 nope dims, one whole and one partial scale block). "cast-down" decodes fp32
    rows to bf16 before the fp32 window's dtype, a rounding the kernel must make as `concat_rows` does."""
    torch.manual_seed(2)
    b, s, h, n0, n1, per_page, k = 2, 3, 8, 20, 70, 16, 100
    d = 96 if store == "fp8" else 48
    model = torch.bfloat16 if store in ("none-bf16", "fp8") else torch.float32
    codec, garbage = None, float("nan")
    if store == "cast":
        codec = CastCodec("bf16", "kv", torch.bfloat16, torch.float32)
    elif store == "cast-down":
        codec = CastCodec("odd", "kv", torch.float32, torch.bfloat16)
    elif store == "fp8":
        codec, garbage = PackedCodec("kv", d, 16, torch.bfloat16), 0xFF  # 0xFF: an e4m3 NaN and a NaN scale
    # entries of very different sizes per 64 dims, so the fp8 scales differ within and across rows
    entries = _rand(b, n1, d) * torch.logspace(-2, 1, d, device=DEVICE) * _rand(b, n1, 1).abs()
    paged = _paged(entries.to(model), per_page, codec, garbage)
    q, window = _rand(b, s, h, d, dtype=model), _rand(b, n0, d, dtype=model)
    idx, sink = _slots(b, s, k, n0 + n1, unused=0.1), _rand(h)
    runs = [window, paged]
    assert attention.covers(q, runs, idx, sink)
    got = attention.sparse_attn(q, runs, idx, sink, d**-0.5)
    want = REF.sparse_attn(q, runs, idx, sink, d**-0.5)
    assert not want.isnan().any()
    (_check_fp32 if model == torch.float32 else _check_bf16)(got, want)
    _check_split(split, k)
    assert not got[0, 1].any()
    # the slots reach the entries: zero entries would give another result
    zeros = torch.zeros(b, n1, d, dtype=model, device=DEVICE)
    assert not torch.allclose(got, REF.sparse_attn(q, [window, zeros], idx, sink, d**-0.5), atol=1e-2)


@pytest.mark.parametrize("second", ["none", "dense", "paged", "fp8"])
def test_window_rings_seen_by_rows_equal_the_reference(second, split):
    """The first run as the engine's decode steps give it: the window rings of some cache slots left in the cache's
    [slots, W, D] tensor, one page per batch row (`LayerCacheRows.window_rows`), alone or followed by entries (dense,
    paged, or fp8 in pages). The other slots' rings hold NaN: a read of a wrong row shows."""
    torch.manual_seed(4)
    b, s, h, w, n1, k = 2, 1, 8, 16, 40, 60
    d = 96 if second == "fp8" else 48
    dtype = torch.bfloat16 if second == "fp8" else torch.float32
    rings = torch.full((5, w, d), float("nan"), dtype=dtype, device=DEVICE)
    slots = torch.tensor([3, 1], device=DEVICE)
    rings[slots] = _rand(b, w, d, dtype=dtype)
    window = PagedRows(rings, slots.unsqueeze(1), w, None, dtype)
    runs = [window]
    if second != "none":
        entries = _rand(b, n1, d, dtype=dtype)
        codec = PackedCodec("kv", d, 16, torch.bfloat16) if second == "fp8" else None
        runs.append(entries if second == "dense" else _paged(entries, 16, codec, 0xFF if codec else float("nan")))
    q, sink = _rand(b, s, h, d, dtype=dtype), _rand(h)
    idx = _slots(b, 2, k, w + (n1 if second != "none" else 0), unused=0.1)[:, :s]
    assert attention.covers(q, runs, idx, sink)
    got = attention.sparse_attn(q, runs, idx, sink, d**-0.5)
    want = REF.sparse_attn(q, runs, idx, sink, d**-0.5)
    assert not want.isnan().any()
    (_check_fp32 if dtype == torch.float32 else _check_bf16)(got, want)
    _check_split(split, k)
    # each batch row reads its own slot's ring: swapping the slots changes the result
    swapped = PagedRows(rings, slots.flip(0).unsqueeze(1), w, None, dtype)
    assert not torch.allclose(got, REF.sparse_attn(q, [swapped, *runs[1:]], idx, sink, d**-0.5), atol=1e-3)


@pytest.mark.parametrize("second", ["none", "fp8"])
def test_fp8_window_rings_are_decoded_in_the_kernel(second, split):
    """Rings in the fp8 main-KV layout (an engine's "fp8" KV format), one page per batch row, read as the first run
    and decoded in the kernel, alone or followed by fp8 entries in pages (each slot's row decoded from its own
    pool): the same bits as the kernel over the rings decoded first (`load_rows`, what a step ran before), and the
    reference's result within a bf16 step. The other slots' rings hold 0xFF bytes (NaN codes and scales)."""
    from dsv4.kernels.triton import kv_rows

    torch.manual_seed(6)
    b, s, h, w, n1, k, d, rope = 2, 1, 8, 16, 40, 60, 96, 16
    codec = PackedCodec("kv", d, rope, torch.bfloat16)
    rows = _rand(b, w, d, dtype=torch.bfloat16)
    stored = codec.encode(rows)
    rings = torch.full((5, w, stored.shape[-1]), 0xFF, dtype=torch.uint8, device=DEVICE)
    slots = torch.tensor([3, 1], device=DEVICE)
    rings[slots] = stored
    window = PagedRows(rings, slots.unsqueeze(1), w, codec, torch.bfloat16)
    runs = [window]
    if second == "fp8":
        runs.append(_paged(_rand(b, n1, d, dtype=torch.bfloat16), 16, codec, 0xFF))
    q, sink = _rand(b, s, h, d, dtype=torch.bfloat16), _rand(h)
    idx = _slots(b, 2, k, w + (n1 if second == "fp8" else 0), unused=0.1)[:, :s]
    assert attention.covers(q, runs, idx, sink)
    got = attention.sparse_attn(q, runs, idx, sink, d**-0.5)
    decoded = kv_rows.load_rows(window)
    assert torch.equal(decoded, codec.decode(stored))
    assert torch.equal(got, attention.sparse_attn(q, [decoded, *runs[1:]], idx, sink, d**-0.5))
    want = REF.sparse_attn(q, runs, idx, sink, d**-0.5)
    assert not want.isnan().any()
    _check_bf16(got, want)
    _check_split(split, k)
    # a second run the kernel does not decode beside an fp8 first run (a verify step's chunk): not covered; the
    # backend decodes the rings first and runs the kernel over both
    from dsv4.kernels.triton import TritonBackend

    backend, chunk = TritonBackend(), _rand(b, n1, d, dtype=torch.bfloat16)
    assert not attention.covers(q, [window, chunk], idx, sink)
    assert torch.equal(backend.sparse_attn(q, [window, chunk], idx, sink, d**-0.5),
                       attention.sparse_attn(q, [decoded, chunk], idx, sink, d**-0.5))
    # what a decode step asks before it hands the rings over as they are stored
    assert backend.attends_in_place(window)
    assert backend.attends_in_place(PagedRows(decoded, slots.unsqueeze(1), w, None, torch.bfloat16))
    fp32 = PackedCodec("kv", d, rope, torch.float32)
    assert not backend.attends_in_place(PagedRows(rings, slots.unsqueeze(1), w, fp32, torch.float32))


def test_blocks_of_unused_slots_change_nothing():
    """The kernel skips a 64-slot block whose every slot is -1: the result is the same bits as without such blocks
    (at the end, as a static decode step pads its entries, and before the first used slot), for fp32 and bf16."""
    torch.manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        q, rows, sink = _rand(2, 2, 8, 48, dtype=dtype), _rand(2, 90, 48, dtype=dtype), _rand(8)
        idx = _slots(2, 2, 70, 90, unused=0.2)
        unused = torch.full((2, 2, 64), -1, device=DEVICE)
        padded = torch.cat((unused, idx, unused, unused), dim=-1)
        want = attention.sparse_attn(q, rows, idx, sink, 0.125)
        assert torch.equal(attention.sparse_attn(q, rows, padded, sink, 0.125), want)
        (_check_fp32 if dtype == torch.float32 else _check_bf16)(want, REF.sparse_attn(q, rows, idx, sink, 0.125))


def test_an_index_past_the_rows_counts_as_unused():
    """(The reference raises there.) The rows past the entries' count in their last page hold NaN: not read."""
    torch.manual_seed(3)
    b, s, h, d, n0, n1, per_page, k = 1, 2, 4, 32, 10, 20, 16, 40
    q, window, sink = _rand(b, s, h, d), _rand(b, n0, d), _rand(h)
    paged = _paged(_rand(b, n1, d), per_page, None, float("nan"))
    idx = _slots(b, s, k, n0 + n1, unused=0.0)
    past = idx.clone()
    past[:, :, ::3] = n0 + n1 + torch.arange(0, k, 3, device=DEVICE) % (2 * per_page - n1)  # within the last page
    got = attention.sparse_attn(q, [window, paged], past, sink, 0.2)
    want = REF.sparse_attn(q, [window, paged], torch.where(past >= n0 + n1, -1, past), sink, 0.2)
    _check_fp32(got, want)


def test_no_slot_gives_zeros():
    q, window, sink = _rand(2, 3, 4, 32), _rand(2, 10, 32), _rand(4)
    idx = torch.zeros(2, 3, 0, dtype=torch.long, device=DEVICE)
    assert attention.covers(q, [window], idx, sink)
    got = attention.sparse_attn(q, [window], idx, sink, 0.2)
    assert got.shape == q.shape and got.dtype == q.dtype and not got.any()
    assert torch.equal(got, REF.sparse_attn(q, [window], idx, sink, 0.2))


def test_covers_what_the_kernel_reads_and_nothing_else():
    b, s, h, d = 1, 2, 4, 32
    q, window, entries, sink = _rand(b, s, h, d), _rand(b, 8, d), _rand(b, 20, d), _rand(h)
    idx = _slots(b, s, 8, 28)
    paged = _paged(entries, 8, None, 0.0)
    fp8 = PackedCodec("kv", d, 8, torch.bfloat16)
    fp8_paged = _paged(entries.bfloat16(), 8, fp8, 0)
    cast = _paged(entries, 8, CastCodec("bf16", "kv", torch.bfloat16, torch.float32), 0.0)
    rings = PagedRows(window, torch.zeros(b, 1, dtype=torch.long, device=DEVICE), 8, None, torch.float32)
    for runs in ([window], window, [window, entries], [window, paged], [window, cast], [window.bfloat16(), fp8_paged],
                 [rings], [rings, paged]):
        assert attention.covers(q, runs, idx, sink)

    class Halves:  # a codec the kernel does not know
        format, kind = "halves", "kv"

        def decode(self, stored):
            return stored * 0.5

    index_codec = PackedCodec("index", d, 8, torch.bfloat16)  # FP4 indexer keys: not attention rows
    not_covered = [
        (q.double(), [window], idx, sink),
        (q, [window.double()], idx, sink),
        (q, [window, entries.double()], idx, sink),
        (q, [window], idx, sink.double()),
        (q, [window, entries, entries], idx, sink),  # three runs
        (q, [paged, window], idx, sink),  # the first run over several pages
        (q, [PagedRows(window, torch.zeros(b, 1, dtype=torch.long, device=DEVICE), 8, fp8, torch.bfloat16)], idx,
         sink),  # a first run of one page a row whose codec names a layout its float pool does not hold
        (q, [PagedRows(window, torch.zeros(b + 1, 1, dtype=torch.long, device=DEVICE), 8, None, torch.float32)],
         idx, sink),  # a table of other batch rows
        (q, [window, PagedRows(paged.pool, paged.table, paged.count, Halves(), torch.float32)], idx, sink),
        (q, [window, PagedRows(index_codec.encode(paged.pool.bfloat16()), paged.table, paged.count, index_codec,
                               torch.bfloat16)], idx, sink),
        (q, [window, PagedRows(paged.pool, paged.table, 10**6, None, torch.float32)], idx, sink),  # past the table
        (q, [window, PagedRows(paged.pool[..., :16], paged.table, paged.count, None, torch.float32)], idx, sink),
        (q, [window[..., :16]], idx, sink),  # rows narrower than q
        (q, [window], idx[0], sink),
        (_rand(b, s, h, 1024), [_rand(b, 8, 1024)], idx, sink),  # head_dim past MAX_HEAD_DIM
    ]
    for args in not_covered:
        assert not attention.covers(*args)
    with pytest.raises(ValueError, match="covers"):
        attention.sparse_attn(*not_covered[0], 0.1)
    # gradients are the reference's business, unless none is wanted
    q_grad = q.clone().requires_grad_(True)
    assert not attention.covers(q_grad, [window], idx, sink)
    with torch.no_grad():
        assert attention.covers(q_grad, [window], idx, sink)
