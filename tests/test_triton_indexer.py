"""The lightning indexer's scores: the seam op `index_scores` (the model's indexer calls it) and its Triton kernel
(`dsv4.kernels.triton.indexer`) against the reference backend's.

Without a GPU the kernel runs on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), so the shapes are V4's with fewer heads and smaller head dims.
"""

import pytest
import torch
from counting_backend import CountingBackend

pytest.importorskip("triton")

from dsv4 import kernels  # noqa: E402
from dsv4.config import preset  # noqa: E402
from dsv4.formats import to_official_formats  # noqa: E402
from dsv4.kernels.paged import PagedRows  # noqa: E402
from dsv4.kernels.reference import ReferenceBackend  # noqa: E402
from dsv4.kernels.triton import TritonBackend, indexer  # noqa: E402
from dsv4.kv_formats.fp8 import PackedCodec  # noqa: E402
from dsv4.model import Transformer, init_weights  # noqa: E402

REF = ReferenceBackend()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, S, Hi, D, N): N a multiple of the 64-entry block and not, one head, S over several 64-query blocks,
# D not a power of two
SHAPES = [(2, 9, 8, 128, 200), (1, 1, 4, 32, 1), (2, 3, 4, 64, 128), (1, 5, 1, 48, 65), (1, 70, 2, 32, 20)]


def _inputs(b, s, h, d, n, dtype=torch.float32, w_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=gen).to(dtype).to(DEVICE)
    keys = torch.randn(b, n, d, generator=gen).to(dtype).to(DEVICE)
    weights = (torch.randn(b, s, h, generator=gen) * d**-0.5).to(w_dtype or dtype).to(DEVICE)
    return q, keys, weights


def _magnitude(q, keys, weights):
    """sum_h |w_h * ReLU(q_h . k)| in fp64: what the rounding errors of the terms scale with."""
    scores = torch.einsum("bshd,bnd->bshn", q.double(), keys.double()).relu()
    return (scores * weights.double().unsqueeze(-1)).abs().sum(dim=2)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_scores_equal_the_reference(shape):
    q, keys, weights = _inputs(*shape)
    got, want = indexer.index_scores(q, keys, weights), REF.index_scores(q, keys, weights)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape == (*shape[:2], shape[4])
    # the same operations; only the order of the additions inside each dot (and torch's blocked order over 8+
    # heads) differ: fp32 rounding relative to the terms' magnitude
    scale = _magnitude(q, keys, weights).max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(("dtype", "w_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)])
def test_the_weight_scale_is_the_weights_scaled_first(dtype, w_dtype):
    """`weight_scale` (the indexer's 1/sqrt(D * Hi)) applied as the kernel reads the weights is bit for bit the kernel
    over ``weights * weight_scale`` rounded to the weights' dtype, the reference's the same, and (fp32) the two
    agree."""
    q, keys, weights = _inputs(2, 9, 8, 128, 200, dtype=dtype, w_dtype=w_dtype, seed=4)
    scale = 128**-0.5 * 8**-0.5
    got = indexer.index_scores(q, keys, weights, None, scale)
    assert torch.equal(got, indexer.index_scores(q, keys, weights * scale))
    assert not torch.equal(got, indexer.index_scores(q, keys, weights))
    want = REF.index_scores(q, keys, weights, None, scale)
    assert torch.equal(want, REF.index_scores(q, keys, weights * scale))
    if dtype == torch.float32:  # and the kernel's scaled scores are the reference's, to fp32 rounding
        bound = _magnitude(q, keys, weights * scale).max().item()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * bound)


def test_with_visible_counts_the_scores_each_query_sees_are_the_references():
    """`visible` [B, S] lets the kernel skip a 64-entry tile no query of its block sees (what a static decode step
    reads past a row's entries); every entry a query sees is scored as without it. Counts on both sides of the tile
    borders, a query that sees nothing, one that sees every entry."""
    q, keys, weights = _inputs(2, 6, 4, 32, 200, seed=3)
    visible = torch.tensor([[0, 63, 64, 65, 128, 200], [1, 1, 2, 3, 5, 8]], device=DEVICE)
    assert indexer.covers(q, keys, weights, visible)
    got, want = indexer.index_scores(q, keys, weights, visible), REF.index_scores(q, keys, weights)
    seen = torch.arange(200, device=DEVICE) < visible.unsqueeze(-1)
    scale = _magnitude(q, keys, weights).max().item()
    torch.testing.assert_close(got[seen], want[seen], rtol=1e-5, atol=1e-5 * scale)
    # the same through the backend and the seam (the reference takes `visible` and scores everything)
    torch.testing.assert_close(TritonBackend().index_scores(q, keys, weights, visible)[seen], want[seen],
                               rtol=1e-5, atol=1e-5 * scale)
    assert torch.equal(REF.index_scores(q, keys, weights, visible), want)
    for bad in (visible[:, :3], visible.float(), visible[0]):
        assert not indexer.covers(q, keys, weights, bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_16_bit_scores_round_where_the_reference_does(dtype, shape):
    q, keys, weights = _inputs(*shape, dtype=dtype, seed=1)
    got, want = indexer.index_scores(q, keys, weights), REF.index_scores(q, keys, weights)
    assert got.dtype == want.dtype == dtype
    # The kernel rounds each head's score and weighted score to `dtype` and the fp32 sum once, as torch does, so
    # the bits are the reference's unless a dot's summation order moves a score across a rounding boundary: one
    # step (eps = 2**-7 bf16, 2**-10 fp16, relative) of that head's score, which moves its weighted term by at
    # most two steps, and the final rounding by at most one more step of the result.
    eps = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    bound = 2 * eps * _magnitude(q, keys, weights) + eps * want.double().abs()
    assert ((got.double() - want.double()).abs() <= bound).all()
    assert (got == want).double().mean() >= 0.99


def test_mixed_dtypes_and_strided_views_as_the_model_passes_them():
    # the indexer hands over q[:, rows] and weights[:, rows] (views into [B, S, ...]); bf16 scores times fp32
    # weights are fp32, like torch's type promotion
    q, keys, weights = _inputs(2, 12, 4, 64, 90, dtype=torch.bfloat16, w_dtype=torch.float32, seed=2)
    keys = keys.transpose(1, 2).contiguous().transpose(1, 2)  # a column-major key slab
    q, weights = q[:, 3:8], weights[:, 3:8]
    got, want = indexer.index_scores(q, keys, weights), REF.index_scores(q, keys, weights)
    assert got.dtype == want.dtype == torch.float32
    scale = _magnitude(q, keys, weights).max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("fmt", ["model", "fp8"])
def test_paged_keys_are_read_in_place(fmt):
    """The engine's keys in their pages through a shuffled block table, bf16 rows or the fp8 format's FP4 layout
    (decoded in the kernel): the scores of the same keys read dense, bit for bit, and the reference's over the pages
    (it decodes them with `load_rows`) to its 16-bit rounding; a count that ends inside a page, visible counts that
    skip tiles."""
    b, s, h, d, n, per_page = 2, 3, 4, 128, 150, 16
    q, keys, weights = _inputs(b, s, h, d, n, dtype=torch.bfloat16, seed=4)
    pages = 2 * -(-n // per_page)
    table = torch.randperm(pages, generator=torch.Generator().manual_seed(3)).view(b, -1).to(DEVICE)
    codec = None if fmt == "model" else PackedCodec("index", d, 0, torch.bfloat16)
    pool = torch.zeros(pages, per_page, d if codec is None else 68, dtype=torch.bfloat16 if codec is None
                       else torch.uint8, device=DEVICE)
    stored = keys if codec is None else codec.encode(keys)
    for row in range(b):
        for j in range(n):
            pool[table[row, j // per_page], j % per_page] = stored[row, j]
    paged = PagedRows(pool, table, n, codec, torch.bfloat16)
    dense = REF.load_rows(paged)  # the keys as stored (FP4-rounded under the fp8 format)
    visible = torch.tensor([[10, 70, 150], [1, 64, 65]], device=DEVICE)
    assert indexer.covers(q, paged, weights, visible)
    got = indexer.index_scores(q, paged, weights, visible)
    seen = torch.arange(n, device=DEVICE) < visible.unsqueeze(-1)
    assert torch.equal(got[seen], indexer.index_scores(q, dense, weights, visible)[seen])
    want = REF.index_scores(q, paged, weights)
    eps = 2.0**-7
    bound = 2 * eps * _magnitude(q, dense, weights) + eps * want.double().abs()
    assert ((got.double() - want.double()).abs() <= bound)[seen].all()
    # fp32 queries over bf16 pages, or a table of other batch rows: the reference's
    assert not indexer.covers(q.float(), paged, weights.float())
    assert not indexer.covers(q[:1], paged, weights[:1])


def test_covers_and_the_backend_falls_back_to_the_reference():
    q, keys, weights = _inputs(1, 3, 2, 32, 10)
    assert indexer.covers(q, keys, weights)
    assert not indexer.covers(q.double(), keys.double(), weights.double())
    assert not indexer.covers(q, keys.bfloat16(), weights)  # q and keys of one dtype (torch's einsum wants it)
    assert not indexer.covers(q, keys[:, :0], weights)  # no entry
    assert not indexer.covers(q, keys[..., :16], weights)  # head dims differ
    assert not indexer.covers(q, keys, weights[:, :2])
    big = _inputs(1, 1, 1, indexer.MAX_DIM + 1, 4)
    assert not indexer.covers(*big)
    with pytest.raises(ValueError, match="does not cover"):
        indexer.index_scores(*big)
    tri = TritonBackend()
    assert torch.equal(tri.index_scores(*big), REF.index_scores(*big))  # the reference takes the rest
    wanted = q.clone().requires_grad_()
    assert not indexer.covers(wanted, keys, weights)  # a gradient wanted: the reference (differentiable)
    out = tri.index_scores(wanted, keys, weights)
    assert out.grad_fn is not None and torch.equal(out, REF.index_scores(q, keys, weights))
    with torch.no_grad():
        assert indexer.covers(wanted, keys, weights)


class _IndexerOnTriton(ReferenceBackend):
    """The reference with the Triton indexer scores: what the seam changes in a model's forward."""

    name = "indexer-on-triton"
    index_scores = TritonBackend.index_scores


@torch.no_grad()
def test_the_indexer_scores_through_the_seam():
    args = preset("tiny")
    csa_layers = sum(1 for r in args.compress_ratios[: args.n_layers] if r == 4)
    tokens = torch.randint(0, args.vocab_size, (2, 37), generator=torch.Generator().manual_seed(5))
    for numerics, dtype in (("plain", torch.float32), ("exact", torch.bfloat16)):
        model = init_weights(Transformer(args, dtype, numerics), seed=3)
        model = (to_official_formats(model) if numerics == "exact" else model).eval()
        counting = CountingBackend()
        with kernels.use_backend(counting):
            counted = model(tokens)
        with kernels.use_backend("reference"):
            want = model(tokens)
        assert torch.equal(counted, want)
        assert counting.calls["index_scores"] == csa_layers > 0  # 37 queries: one query block per CSA layer
        for q, keys, weights, visible, weight_scale in counting.arguments["index_scores"]:
            assert q.shape == (2, 37, args.index_n_heads, args.index_head_dim) and q.dtype == dtype
            assert keys.shape == (2, 37 // 4, args.index_head_dim) and weights.shape == q.shape[:3]
            assert torch.equal(visible, ((torch.arange(37) + 1) // 4).expand(2, 37))  # each query's entries
            assert weight_scale == args.index_head_dim**-0.5 * args.index_n_heads**-0.5  # scaled in the op
        with kernels.use_backend(_IndexerOnTriton()):
            got = model(tokens)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
