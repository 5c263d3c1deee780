"""Top-k selection with the official order, in O(N) per row: what the reference `index_topk` op picks with.

`torch.topk` finds a k-set in O(N) but keeps an unspecified subset of the entries tied at the k-th value, and
the lightning indexer's scores tie often (every head's ReLU at 0, masked -inf entries); `stable_topk` resolves
such ties to the earliest entries and orders the picks as a stable descending sort would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .capture import host_reads_allowed


def stable_topk(scores: Tensor, k: int, read_free: bool | None = None) -> Tensor:
    """Indices [..., min(k, N)] equal to `scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]`,
    in O(N) per row instead of a sort.

    Exact ties are common (every head's ReLU at 0, masked -inf entries), and the rule must not depend on
    how many entries a call happens to hold, so ties go to the earliest entries, and the picks come in
    descending score order (ties by index) like the official top-k: the attention kernel walks its
    candidates in that order, in blocks, so the order is part of the numerics. `topk` finds a k-set in
    O(N) but keeps an unspecified subset of the entries tied at the k-th value; asking it for k + 1
    values shows whether such a tie is cut, and only those rows swap their tied picks for the earliest
    tied entries (`_take_earliest_ties`).

    Finding those rows is a read of the device (a wait for it, on a GPU, in every CSA layer of a decode step), so
    off the CPU, and inside `capture.without_host_reads` (a step a CUDA graph captures), every row takes its
    earliest tied entries without asking (`_earliest_k`: a few more passes over N, 1.5-9x the CPU time of the
    above, where a read costs nothing). `read_free` None chooses so; True or False forces a way.
    """
    n = scores.shape[-1]
    k = min(k, n)
    if read_free is None:
        read_free = scores.device.type != "cpu" or not host_reads_allowed()
    if k in (0, n):  # nothing or everything is picked: only the order is left to do
        top = torch.arange(k, device=scores.device).expand(*scores.shape[:-1], k)
    elif read_free:
        top = _earliest_k(scores, k)
    else:
        values, top = scores.topk(k + 1, dim=-1)  # [..., k+1] descending
        cut = values[..., k] == values[..., k - 1]  # [...] the (k+1)-th value ties the k-th: a tie is cut
        values, top = values[..., :k], top[..., :k]
        if bool(cut.any()):
            top = top.clone()
            _take_earliest_ties(scores.reshape(-1, n), values.reshape(-1, k), top.view(-1, k),
                                cut.reshape(-1).nonzero().squeeze(1))
    top = top.sort(dim=-1).values  # the chosen set in index order ...
    order = scores.gather(-1, top).sort(dim=-1, descending=True, stable=True).indices  # ... then by score
    return top.gather(-1, order)


def _earliest_k(scores: Tensor, k: int) -> Tensor:
    """The k-set of `stable_topk` (0 < k < N) in increasing index, with no read of the device: every entry above the
    k-th value, then the earliest entries at it, as many as the k-set has room for."""
    n = scores.shape[-1]
    kth = scores.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # [..., 1] the k-th value
    above = scores > kth
    tied = scores == kth
    chosen = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))  # exactly k a row
    key = torch.where(chosen, n - torch.arange(n, device=scores.device), 0)  # the earlier, the larger
    return key.topk(k, dim=-1).indices


def _take_earliest_ties(scores: Tensor, values: Tensor, top: Tensor, rows: Tensor) -> None:
    """In the given rows of a top-k (scores [M,N], its values / indices [M,k]), replace the picks tied at
    the k-th value by the earliest entries holding that value (in place in `top`).

    Every entry above the k-th value is already picked, so a row needs only its first `need` tied
    positions. Ties at 0 (all ReLUs off) are many and start early, so the search scans a prefix that
    widens 4x at a time for the rows not yet served (a query that sees fewer than k entries finds its
    -inf ties only past them): under 4/3 N compares per row at worst.
    """
    k, n = values.shape[1], scores.shape[1]
    width = 4 * k
    while rows.numel():
        width = min(width, n)
        kth = values[rows, k - 1 :]  # [R,1]
        above = values[rows] > kth  # [R,k] picks that stay
        need = k - above.sum(-1, keepdim=True)  # [R,1] tied picks to take, >= 1
        tied = scores[rows, :width] == kth  # [R,w]
        rank = tied.cumsum(-1)  # [R,w]
        done = rank[:, -1:] >= need  # [R,1] the prefix holds enough ties
        take = tied & (rank <= need) & done  # [R,w] exactly `need` per finished row
        fixed = top[rows]
        fixed[~above & done] = take.nonzero()[:, 1]  # row-major on both sides: each row gets its own
        top[rows] = fixed
        rows = rows[~done.squeeze(1)]
        width *= 4
