"""The Triton cache-row kernels (`dsv4/kernels/triton/kv_rows.py`) against the reference `store_rows` / `load_rows`:
the same bytes in the pool after a write (the fp8 format's codes, scales and pad bytes, or the rows as they are),
and the same bits read back, through a shuffled block table.

On a machine without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py)
on CPU tensors; with one, on CUDA tensors against the reference on CPU copies.
"""

from __future__ import annotations

import pytest
import torch
from test_triton_rows import _on

pytest.importorskip("triton")

from dsv4.kernels.paged import PagedRows  # noqa: E402
from dsv4.kernels.reference import ReferenceBackend  # noqa: E402
from dsv4.kernels.triton import kv_rows  # noqa: E402
from dsv4.kv_formats import CastCodec  # noqa: E402
from dsv4.kv_formats.fp8 import PackedCodec, index_key_layout, kv_layout  # noqa: E402

REF = ReferenceBackend()


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    """bf16 rows with what the encoders must get right: blocks of very different magnitudes, an all-zero block (the
    amax floor), negative zeros, values past e4m3's and e2m1's range before scaling."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.exp(torch.randn(n, 1, generator=g) * 3)
    x[:, : min(d, 16)] *= 1000.0
    x[0, :32] = 0.0
    x[-1, 1::7] = -0.0
    return x.bfloat16()


def _pool(codec, pages: int, per_page: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A pool of `pages` pages of stale bytes (what a reused page holds)."""
    if codec is None:
        width = d
    elif codec.kind == "kv":
        width = kv_layout(d, codec.rope_dim)[3]
    else:
        width = index_key_layout(d)[2]
    g = torch.Generator().manual_seed(seed)
    if codec is not None:
        return torch.randint(0, 256, (pages, per_page, width), generator=g, dtype=torch.uint8)
    return torch.randn(pages, per_page, width, generator=g).to(dtype)


def _codec(kind: str, d: int, rope: int):
    return None if kind == "none" else PackedCodec(kind, d, rope, torch.bfloat16)


CASES = [("kv", 512, 64), ("kv", 96, 32), ("kv", 160, 64), ("kv", 200, 8), ("index", 128, 0), ("index", 32, 0),
         ("none", 64, 0)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize(("kind", "d", "rope"), CASES)
def test_store_rows_writes_the_references_bytes(kind, d, rope):
    """Rows written at scattered (batch row, row) places through a shuffled block table: every byte of the pool equal
    to the reference's (codes, scales, the scale pad bytes zeroed, stale bytes elsewhere left alone)."""
    codec, per_page, pages, batch = _codec(kind, d, rope), 4, 12, 3
    pool = _pool(codec, pages, per_page, d, torch.bfloat16, d)
    table = torch.randperm(pages, generator=torch.Generator().manual_seed(1)).view(batch, pages // batch)
    rows = torch.tensor([0, 2, 1, 2, 0, 1, 2])
    index = torch.tensor([0, 15, 5, 3, 9, 14, 7])
    values = _rows(len(rows), d, d + 1)
    dest = PagedRows(pool.clone(), table, per_page * table.shape[1], codec, torch.bfloat16)
    assert kv_rows.covers_store(values, dest, rows, index)
    want = pool.clone()
    REF.store_rows(values, PagedRows(want, table, dest.count, codec, torch.bfloat16), rows, index)
    got = _on(pool.clone())
    kv_rows.store_rows(_on(values), PagedRows(got, _on(table), dest.count, codec, torch.bfloat16), _on(rows),
                       _on(index))
    assert not torch.equal(want, pool)  # (the rows were written somewhere)
    assert torch.equal(_bits(got.cpu()), _bits(want))


@pytest.mark.parametrize(("kind", "d", "rope"), [("kv", 512, 64), ("index", 64, 0), ("none", 96, 0)])
@pytest.mark.parametrize("pages_a_row", [1, 2])
def test_store_rows_by_batch_row_writes_window_slots(kind, d, rope, pages_a_row):
    """`rows=None`: values [B, S, D] at rows index [B, S] of each batch row; with one page a row the rings of a cache
    seen through some of its slots (the table is the slots [B, 1]), else pages of a block table."""
    codec, ring, slots_total = _codec(kind, d, rope), 8, 6
    pool = _pool(codec, slots_total, ring, d, torch.bfloat16, 3)
    table = torch.tensor([[3], [0], [4]]) if pages_a_row == 1 else torch.tensor([[3, 1], [0, 5], [4, 2]])
    index = torch.tensor([[7, 1], [0, 2], [5, 6]]) + (torch.tensor([[8, 0], [0, 9], [3, 8]]) if pages_a_row == 2 else 0)
    values = _rows(6, d, 4).view(3, 2, d)
    want = pool.clone()
    REF.store_rows(values, PagedRows(want, table, ring * pages_a_row, codec, torch.bfloat16), None, index)
    got = _on(pool.clone())
    dest = PagedRows(got, _on(table), ring * pages_a_row, codec, torch.bfloat16)
    assert kv_rows.covers_store(_on(values), dest, None, _on(index))
    kv_rows.store_rows(_on(values), dest, None, _on(index))
    assert torch.equal(_bits(got.cpu()), _bits(want))


@pytest.mark.parametrize(("kind", "d", "rope"), CASES)
@pytest.mark.parametrize("count", [1, 13, 24])
def test_load_rows_decodes_the_references_rows(kind, d, rope, count):
    """Every addressable row gathered from its page and decoded: the reference's bits (`PagedRows.dense`), for rows
    the codec wrote (fp8) or any values (no codec), a count that ends inside a page."""
    codec, per_page, pages, batch = _codec(kind, d, rope), 4, 18, 3
    pool = _pool(codec, pages, per_page, d, torch.bfloat16, d + 2)
    if codec is not None:  # valid encodings of rows (stale random bytes could hold e4m3 NaN codes)
        pool = codec.encode(_rows(pages * per_page, d, d + 3)).view(pages, per_page, -1)
    table = torch.randperm(pages, generator=torch.Generator().manual_seed(2)).view(batch, pages // batch)
    src = PagedRows(pool, table, count, codec, torch.bfloat16)
    assert kv_rows.covers_load(src)
    want = REF.load_rows(src)
    got = kv_rows.load_rows(PagedRows(_on(pool), _on(table), count, codec, torch.bfloat16)).cpu()
    assert got.dtype == want.dtype and got.shape == (batch, count, d)
    assert torch.equal(_bits(got), _bits(want))


def test_a_row_written_then_read_comes_back_as_written():
    """What the decode step relies on to read the window ring just after writing its token: for rows the exact
    numerics cached (nope dims already through the FP8 blocks) the fp8 codec round-trips."""
    codec = PackedCodec("kv", 512, 64, torch.bfloat16)
    rows = _rows(4, 512, 9)
    rows[:, :448] = REF.fp8_simulate(rows[:, :448], 64)
    pool = _on(torch.zeros(1, 4, kv_layout(512, 64)[3], dtype=torch.uint8))
    dest = PagedRows(pool, _on(torch.zeros(1, 1, dtype=torch.long)), 4, codec, torch.bfloat16)
    kv_rows.store_rows(_on(rows.unsqueeze(0)), dest, None, _on(torch.arange(4).unsqueeze(0)))
    assert torch.equal(kv_rows.load_rows(dest).cpu()[0].view(torch.int16), rows.view(torch.int16))
    assert codec.round_trips(torch.bfloat16, True) and not codec.round_trips(torch.bfloat16, False)


def test_what_the_row_kernels_cover():
    fp8 = PackedCodec("kv", 512, 64, torch.bfloat16)
    pool = torch.zeros(4, 8, kv_layout(512, 64)[3], dtype=torch.uint8)
    table = torch.zeros(2, 4, dtype=torch.long)
    values, rows, index = torch.zeros(3, 512, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.long), \
        torch.zeros(3, dtype=torch.long)
    assert kv_rows.covers_store(values, PagedRows(pool, table, 32, fp8, torch.bfloat16), rows, index)
    assert kv_rows.covers_load(PagedRows(pool, table, 32, fp8, torch.bfloat16))
    # fp32 rows into the fp8 layout, an fp32 codec, a cast codec, a float index, a count past the table: the reference
    assert not kv_rows.covers_store(values.float(), PagedRows(pool, table, 32, fp8, torch.bfloat16), rows, index)
    fp32 = PackedCodec("kv", 512, 64, torch.float32)
    assert not kv_rows.covers_load(PagedRows(pool, table, 32, fp32, torch.float32))
    cast = CastCodec("bf16", "kv", torch.bfloat16, torch.float32)
    plain = torch.zeros(4, 8, 512, dtype=torch.bfloat16)
    assert not kv_rows.covers_store(values.float(), PagedRows(plain, table, 32, cast, torch.float32), rows, index)
    assert not kv_rows.covers_load(PagedRows(plain, table, 32, cast, torch.float32))
    assert not kv_rows.covers_store(values, PagedRows(pool, table, 32, fp8, torch.bfloat16), rows, index.float())
    assert not kv_rows.covers_load(PagedRows(pool, table, 33, fp8, torch.bfloat16))
    # rows of the pool's own dtype as they are
    assert kv_rows.covers_store(values, PagedRows(plain, table, 32, None, torch.bfloat16), rows, index)
    assert not kv_rows.covers_store(values.float(), PagedRows(plain, table, 32, None, torch.bfloat16), rows, index)


# (codec kind, width, rope dims, the rounding its rows take, the rows' dtype): the window's and the CSA compressor's
# fp8 rows, the indexer keys' fp4 rows, plain bf16 and fp32 pools
NORM_STORE_CASES = [("kv", 512, 64, "fp8_nope", torch.bfloat16), ("kv", 64, 16, "fp8_nope", torch.bfloat16),
                    ("index", 128, 32, "hadamard_fp4", torch.bfloat16),
                    ("index", 32, 8, "hadamard_fp4", torch.bfloat16), ("none", 64, 16, "none", torch.bfloat16),
                    ("none", 128, 32, "fp8_nope", torch.float32)]


@pytest.mark.parametrize(("kind", "d", "rope", "qat", "dtype"), NORM_STORE_CASES)
@pytest.mark.parametrize("by_rows", [True, False], ids=["entries", "ring_slots"])
@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interpreter_tiles", "gpu_tiles"])
def test_norm_rope_store_is_norm_rope_qat_then_store_rows(kind, d, rope, qat, dtype, by_rows, gpu_tiles, monkeypatch):
    """The fused op leaves the pool byte for byte as the two kernels it replaces (`norm_rope_qat`, then `store_rows`
    of its rows), in both of the store's forms: entries at (batch row, index) pairs through a shuffled block table
    (a compressor's), and [B, S] slots of rings one page a batch row (a decode step's window); stale bytes elsewhere
    are left alone. And the reference op (norm_rope_qat, store_rows) writes the same rows, to the norm's rounding."""
    from dsv4.kernels.triton import rows as row_kernels

    if gpu_tiles:  # (a GPU's tiling: fewer rows a program)
        monkeypatch.setattr(row_kernels, "interpreting", lambda: False)
    codec, per_page = _codec(kind, d, rope), 4
    g = torch.Generator().manual_seed(d + rope)
    weight = torch.rand(d, generator=g) + 0.5
    if by_rows:  # 7 entries: x [7, D], rows [7], index [7]
        batch, pages = 3, 12
        table = torch.randperm(pages, generator=g).view(batch, pages // batch)
        rows, index = torch.tensor([0, 2, 1, 2, 0, 1, 2]), torch.tensor([0, 15, 5, 3, 9, 14, 7])
        x = torch.randn(7, d, generator=g).to(dtype) * 3
        cos_shape = (7, rope // 2)
    else:  # ring slots: x [B, S, D], index [B, S], one page of `per_page` rows a batch row
        batch, pages, per_page = 3, 5, 8
        table = torch.tensor([[4], [0], [2]])
        rows, index = None, torch.tensor([[3, 7], [0, 1], [6, 2]])
        x = torch.randn(batch, 2, d, generator=g).to(dtype) * 3
        cos_shape = (batch, 2, rope // 2)
    angle = torch.rand(cos_shape, generator=g) * 6
    cos, sin = angle.cos(), angle.sin()
    pool = _pool(codec, pages, per_page, d, dtype, d + 3)
    dest = PagedRows(pool, table, per_page * table.shape[1], codec, dtype)
    assert row_kernels.covers_norm_rope_store(x, weight, cos, sin, qat, dest, rows, index)
    on = [_on(t) for t in (x, weight, cos, sin)]
    placed = PagedRows(_on(table), _on(table), dest.count, codec, dtype)

    def paged(p):
        return PagedRows(p, placed.table, dest.count, codec, dtype)

    two = _on(pool.clone())
    kv_rows.store_rows(row_kernels.norm_rope_qat(*on[:2], 1e-6, *on[2:], qat), paged(two), _on(rows), _on(index))
    one = _on(pool.clone())
    row_kernels.norm_rope_store(*on[:2], 1e-6, *on[2:], qat, paged(one), _on(rows), _on(index))
    assert not torch.equal(two.cpu(), pool)  # (the rows were written)
    assert torch.equal(_bits(one).cpu(), _bits(two).cpu())
    want = pool.clone()
    REF.norm_rope_store(x, weight, 1e-6, cos, sin, qat, PagedRows(want, table, dest.count, codec, dtype), rows, index)
    at = (rows, index) if by_rows else (torch.arange(batch).unsqueeze(1), index)  # (the written rows alone)
    read = REF.load_rows(PagedRows(one.cpu(), table, dest.count, codec, dtype))[at].float()
    expected = REF.load_rows(PagedRows(want, table, dest.count, codec, dtype))[at].float()
    # (the norm's sum in another order can move a row one bf16 step, and its FP8 / FP4 codes a block's step)
    torch.testing.assert_close(read, expected, rtol=0.13, atol=0.13 * expected.abs().max().item())
    assert (read == expected).float().mean() > 0.9


def test_norm_rope_store_covers_what_both_kernels_cover():
    from dsv4.kernels.triton import rows as row_kernels

    fp8 = PackedCodec("kv", 512, 64, torch.bfloat16)
    pool = torch.zeros(4, 8, kv_layout(512, 64)[3], dtype=torch.uint8)
    table, rows, index = torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long), \
        torch.zeros(3, dtype=torch.long)
    x, weight = torch.zeros(3, 512, dtype=torch.bfloat16), torch.ones(512)
    cos = sin = torch.zeros(3, 32)
    dest = PagedRows(pool, table, 32, fp8, torch.bfloat16)
    assert row_kernels.covers_norm_rope_store(x, weight, cos, sin, "fp8_nope", dest, rows, index)
    # fp32 rows into the fp8 layout (store_rows' limit), a width not a power of two (norm_rope_qat's), a bad rounding
    assert not row_kernels.covers_norm_rope_store(x.float(), weight, cos, sin, "fp8_nope", dest, rows, index)
    odd = PackedCodec("kv", 96, 32, torch.bfloat16)
    odd_pool = torch.zeros(4, 8, kv_layout(96, 32)[3], dtype=torch.uint8)
    assert not row_kernels.covers_norm_rope_store(x[:, :96], weight[:96], cos[:, :16], sin[:, :16], "fp8_nope",
                                                  PagedRows(odd_pool, table, 32, odd, torch.bfloat16), rows, index)
    assert not row_kernels.covers_norm_rope_store(x, weight, cos, sin, "fp9", dest, rows, index)
