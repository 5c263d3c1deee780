"""The Triton backend's indexer top-k (`dsv4.kernels.triton.topk`) against the stable-sort rule and the reference
`index_topk`. Without a GPU the kernel runs through Triton's interpreter (tests/conftest.py), on small rows."""

import pytest
import torch

pytest.importorskip("triton")

from dsv4.kernels.reference import ReferenceBackend  # noqa: E402
from dsv4.kernels.triton import TritonBackend, topk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ties(rows: int, n: int, seed: int) -> torch.Tensor:
    """Scores with many exact ties (a few values, -0.0 next to 0.0) and a masked -inf tail per row."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (rows, n), generator=g).float() * 0.5
    scores[scores == 0.5] = -0.0
    tails = torch.randint(0, n // 2 + 1, (rows,), generator=g)
    scores[torch.arange(n) >= n - tails.unsqueeze(1)] = float("-inf")
    return scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(40, 1), (40, 39), (40, 40), (97, 13), (300, 64), (1500, 7), (200, 200)])
def test_the_picks_are_a_stable_descending_sorts_first_k(n, k, dtype):
    """Every entry above the k-th value, the earliest at it, in descending score, ties by index: the first k of a
    stable descending sort, for rows that tie at the k-th value across the kernel's 1,024-entry blocks too; at
    k = N (a context with no more entries than the top-k takes: every entry), the whole stable sort."""
    scores = _ties(3, n, seed=n + k).to(dtype).to(DEVICE)
    want = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    assert torch.equal(topk.earliest_k(scores, k), want)


def test_distinct_scores_and_strided_rows():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 3, 200, generator=g).to(DEVICE)[:, :, :150]  # rows 200 apart
    want = scores.sort(dim=-1, descending=True, stable=True).indices[..., :20]
    assert torch.equal(topk.earliest_k(scores, 20), want)


@pytest.mark.parametrize("offset", [0, 128])
@pytest.mark.parametrize("k", [16, 70, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_topk_equals_the_reference(k, dtype, offset):
    """The seam op: picks (plus the offset at which the attention's rows hold entry 0), -1 where a query sees fewer
    than k entries, and the picked scores, as the reference's; k below, at and above the 70 entries (every entry
    picked). The entries past each query's visible ones score highest unless masked: below k = 70 the scores are
    masked to -inf in place (the k-th value needs it), as the reference masks them; from k = 70 on the kernel
    ranks them as -inf as it reads them and leaves the scores unwritten."""
    g = torch.Generator().manual_seed(2)
    scores = (torch.randint(-2, 3, (2, 3, 70), generator=g).float() * torch.rand(2, 3, 1, generator=g)).to(dtype)
    visible = torch.tensor([[70, 30, 5], [0, 69, 41]], device=DEVICE)
    scores = scores.masked_fill(torch.arange(70) >= visible.cpu().unsqueeze(-1), 1e4)
    fast_scores, slow_scores = scores.to(DEVICE), scores.clone()
    picks, picked = TritonBackend().index_topk(fast_scores, visible, k, offset)
    want_picks, want_picked = ReferenceBackend().index_topk(slow_scores, visible.cpu(), k, offset)
    assert picked.dtype == dtype and picks.shape == (2, 3, min(k, 70))
    assert torch.equal(picks.cpu(), want_picks) and torch.equal(picked.cpu(), want_picked)
    assert torch.equal(fast_scores.cpu(), slow_scores if k < 70 else scores)
    assert (picks[0, 2] >= 0).sum() == 5 and (picks[1, 0] == -1).all()
    assert (picks[0, 2, :5] >= offset).all() and (picks[0, 2, :5] < offset + 5).all()


@pytest.mark.parametrize("k", [16, 70])
def test_index_topk_writes_its_picks_after_a_prefix(k):
    """With a prefix (the attention's window slots, [B, S, W], strided here) the ids are [B, S, W + k]: the prefix
    copied, then the picks; the same as the reference (which concatenates), the picked scores unchanged."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(-2, 3, (2, 3, 70), generator=g).float() * torch.rand(2, 3, 1, generator=g)
    visible = torch.tensor([[70, 30, 5], [0, 69, 41]])
    prefix = torch.randint(-1, 128, (2, 3, 2 * 37), generator=g)[..., ::2]  # W = 37, not a power of two
    backend = TritonBackend()
    got, got_scores = backend.index_topk(scores.clone().to(DEVICE), visible.to(DEVICE), k, 128, prefix.to(DEVICE))
    want, want_scores = ReferenceBackend().index_topk(scores.clone(), visible, k, 128, prefix)
    plain, plain_scores = backend.index_topk(scores.clone().to(DEVICE), visible.to(DEVICE), k, 128)
    assert got.shape == (2, 3, 37 + min(k, 70)) and torch.equal(got.cpu(), want)
    assert torch.equal(got[..., :37].cpu(), prefix) and torch.equal(got[..., 37:], plain)
    assert torch.equal(got_scores.cpu(), want_scores) and torch.equal(got_scores, plain_scores)


def test_a_row_with_nan_scores_still_picks_valid_entries():
    scores = torch.randn(2, 60, device=DEVICE)
    scores[0, 7] = float("nan")
    picks = topk.earliest_k(scores, 10)
    assert ((picks >= 0) & (picks < 60)).all()
    assert torch.equal(picks[1], scores[1].sort(descending=True, stable=True).indices[:10])


def test_covers():
    x = torch.randn(2, 50, device=DEVICE)
    assert topk.covers(x, 10) and topk.covers(x.bfloat16(), 49) and topk.covers(x, 50)  # (50: every entry)
    assert not topk.covers(x, 0) and not topk.covers(x, 51)
    assert not topk.covers(x.double(), 10)
    assert not topk.covers(x.t(), 1)  # the entries must be contiguous
    assert not topk.covers(torch.randn(1, 5000, device=DEVICE), topk.MAX_K + 1)
    with pytest.raises(ValueError, match="covers"):
        topk.earliest_k(x, 51)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hide_unseen_masks_in_place_as_the_reference(dtype):
    """-inf at and past each row's visible count, in place: rows seeing none, some and all entries, over rows wider
    than one block of the kernel, and through a view whose rows are not evenly strided (torch's mask then)."""
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 3, 1500, generator=g).to(dtype)
    visible = torch.tensor([[0, 1, 1500], [700, 1024, 1499]])
    want = scores.masked_fill(torch.arange(1500) >= visible.unsqueeze(-1), float("-inf"))
    got = scores.clone().to(DEVICE)
    topk.hide_unseen(got, visible.to(DEVICE))
    assert torch.equal(got.cpu(), want)
    uneven = scores.clone().to(DEVICE).transpose(0, 1)  # [3, 2, N]: no [6, N] view
    topk.hide_unseen(uneven, visible.t().to(DEVICE))
    assert torch.equal(uneven.transpose(0, 1).cpu(), want)
