"""The indexer's top-k selection with the official order, as one Triton kernel after torch's k-th value.

`dsv4.kernels.topk.stable_topk` picks, per row of scores [R, N], the k entries a stable descending sort would put
first: every entry above the k-th value, then the earliest entries at it, in descending score, ties by index. Off
the CPU it does so without reading the device, in about a dozen torch ops, seven of them passes over all N
entries (compare, compare, cumsum, sum, where, a second top-k over N, ...). Here torch's `topk` gives the k-th value
(one radix select over N) and one program per row does the rest:

1. one pass counts the entries above the k-th value, so the row knows how many tied entries it takes;
2. one pass writes the chosen entries' indices to the output row in index order (a running count and an in-block
   prefix sum give each its place; the earliest tied ones, by a running count of ties);
3. the k chosen indices are read back (after a barrier: other threads of the program wrote them) and sorted in
   registers by one 64-bit key, the score's order-preserving bits (descending) above the index (ascending);
   for the indexer (`index_picks`) written final: -1 at or past the query's visible count, with the picked scores.

At k = N (a context with no more entries than the top-k takes) every entry is picked: no k-th value, no counting
pass, only the sort.

Scores compare as torch compares them: -0.0 equals 0.0 (the key adds +0.0 first, which makes -0.0 +0.0), and
-inf entries (the masked ones) order like any other value. A row with a NaN score is not ordered as torch orders
it (none should occur: the indexer's scores are finite or masked to -inf), but its picks are valid indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_K = 4096  # the sorted picks live in one program's registers (V4: index_topk 512; 1024 for V4-Pro)
_BLOCK = 1024  # entries per step of the passes over a row
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _descending_key(values, index):
    """int64 keys whose ascending order is descending `values` (fp32), ties by ascending `index` (< 2**31)."""
    bits = (values + 0.0).to(tl.int32, bitcast=True)  # (+0.0: -0.0 becomes +0.0, which it equals)
    # as signed integers in the floats' order: a negative float's magnitude bits flipped; then reversed (~x = -x-1)
    ascending = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ((~ascending).to(tl.int64) << 32) | index.to(tl.int64)


@triton.jit
def _earliest_k_kernel(scores_ptr, stride_r, kth_ptr, out_ptr, stride_o, seen_ptr, picked_ptr, stride_p, N, K,
                       offset, prefix_ptr, stride_f, W, KP: tl.constexpr, BLOCK: tl.constexpr, ALL: tl.constexpr,
                       FINAL: tl.constexpr, WP: tl.constexpr):
    """One row's picks; ALL: K == N, every entry (no k-th value); FINAL: the indexer's outputs, the picks plus
    `offset`, -1 for those at or past the row's `seen` count, and each pick's score (as stored; -inf for those) at
    picked_ptr, the entries at or past `seen` ranked as -inf (masked or not: with ALL the row is read unmasked).
    W > 0: the row's W prefix indices first in the output row (copied), the picks after them."""
    row = tl.program_id(0).to(tl.int64)
    base = scores_ptr + row * stride_r
    offs = tl.arange(0, BLOCK)
    out = out_ptr + row * stride_o
    if WP > 0:
        w = tl.arange(0, WP)
        tl.store(out + w, tl.load(prefix_ptr + row * stride_f + w, mask=w < W), mask=w < W)
        out += W
    if ALL:
        for lo in range(0, N, BLOCK):
            tl.store(out + lo + offs, lo + offs, mask=lo + offs < N)
    else:
        kth = tl.load(kth_ptr + row).to(tl.float32)
        above = 0
        for lo in range(0, N, BLOCK):
            v = tl.load(base + lo + offs, mask=lo + offs < N, other=float("-inf")).to(tl.float32)
            above += tl.sum((v > kth).to(tl.int32), axis=0)
        need = K - above  # the tied entries the row takes, the earliest ones (>= 1)
        written = 0
        ties = 0
        for lo in range(0, N, BLOCK):
            ok = lo + offs < N
            v = tl.load(base + lo + offs, mask=ok, other=float("-inf")).to(tl.float32)
            tied = ok & (v == kth)
            tie_rank = ties + tl.cumsum(tied.to(tl.int32), axis=0)  # 1-based among the row's ties so far
            chosen = (ok & (v > kth)) | (tied & (tie_rank <= need))
            place = written + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
            tl.store(out + place, lo + offs, mask=chosen)
            written += tl.sum(chosen.to(tl.int32), axis=0)
            ties += tl.sum(tied.to(tl.int32), axis=0)
    tl.debug_barrier()  # the chosen indices, written by every thread of the program, are read back below

    slots = tl.arange(0, KP)
    picked = tl.load(out + slots, mask=slots < K, other=0)
    # (a row with a NaN score may have fewer than K picks written: whatever the rest holds becomes a valid index,
    # so no read or later gather leaves the row)
    picked = tl.where((picked >= 0) & (picked < N), picked, 0)
    values = tl.load(base + picked, mask=slots < K, other=0.0).to(tl.float32)
    if FINAL:  # the entries at or past `seen` rank as -inf, whatever their scores hold (ALL: they are not masked)
        seen = tl.load(seen_ptr + row)
        values = tl.where(picked < seen, values, float("-inf"))
    key = tl.where(slots < K, _descending_key(values, picked), 9223372036854775807)  # padding sorts last
    key = tl.sort(key)
    tl.debug_barrier()  # (every thread read its picks before any is overwritten)
    top = (key & 0x7FFFFFFF).to(tl.int64)
    if FINAL:  # (two masked stores, not a select: a 16-bit score is stored as it was read, -inf from fp32)
        at = picked_ptr + row * stride_p + slots
        tl.store(at, tl.load(base + top, mask=slots < K), mask=(slots < K) & (top < seen))
        tl.store(at, tl.full((KP,), float("-inf"), tl.float32), mask=(slots < K) & (top >= seen))
        top = tl.where(top < seen, top + offset, -1)
    tl.store(out + slots, top, mask=slots < K)


@triton.jit
def _hide_kernel(scores_ptr, stride_r, seen_ptr, N, BLOCK: tl.constexpr):
    """Row r's scores at or past its `seen` count set to -inf (one program a row and block of entries)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seen = tl.load(seen_ptr + row)
    hidden = (offs < N) & (offs >= seen)
    tl.store(scores_ptr + row * stride_r + offs, tl.full((BLOCK,), float("-inf"), tl.float32), mask=hidden)


def covers(scores: Tensor, k: int) -> bool:
    """The kernel takes float scores [..., N] with a unit last stride, 0 < k <= N, k <= MAX_K, N < 2**31, no
    gradient wanted (the selection is not differentiable anyway; the caller gathers the picked scores)."""
    if not isinstance(scores, Tensor) or scores.dtype not in _FLOATS or scores.dim() < 1:
        return False
    n = scores.shape[-1]
    return 0 < k <= n < 2**31 and k <= MAX_K and scores.numel() > 0 and scores.stride(-1) == 1


def _launch(scores: Tensor, k: int, seen: Tensor | None, offset: int = 0,
            prefix: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The picks [..., k] of scores [..., N]; with `seen` [...], final (plus `offset`, -1 at or past it) and with
    their scores; with `prefix` [..., W] int64, [..., W + k]: each row's prefix, then its picks."""
    if not covers(scores, k):
        raise ValueError("triton earliest_k does not cover these inputs (check `covers` first)")
    n = scores.shape[-1]
    rows = scores.detach().reshape(-1, n)  # (a view where the rows are evenly strided)
    every = k == n
    # the k-th value (one radix select over N), unless every entry is picked
    kth = rows if every else rows.topk(k, dim=-1, sorted=False).values.amin(dim=-1).to(torch.float32).contiguous()
    w = 0 if prefix is None else prefix.shape[-1]
    before = None if prefix is None else prefix.reshape(-1, w).to(torch.int64)
    if before is not None and before.stride(-1) != 1:
        before = before.contiguous()
    out = torch.empty(rows.shape[0], w + k, dtype=torch.int64, device=scores.device)
    picked = None if seen is None else torch.empty(rows.shape[0], k, dtype=scores.dtype, device=scores.device)
    _earliest_k_kernel[(rows.shape[0],)](
        rows, rows.stride(0), kth, out, out.stride(0), out if seen is None else seen.reshape(-1).contiguous(),
        out if picked is None else picked, k if picked is None else picked.stride(0), n, k, offset,
        out if before is None else before, 0 if before is None else before.stride(0), w,
        KP=triton.next_power_of_2(k), BLOCK=_BLOCK, ALL=every, FINAL=seen is not None,
        WP=triton.next_power_of_2(w) if w else 0)
    lead = scores.shape[:-1]
    return out.view(*lead, w + k), None if picked is None else picked.view(*lead, k)


def earliest_k(scores: Tensor, k: int) -> Tensor:
    """`stable_topk(scores, k)`: indices [..., k] int64 of the k entries a stable descending sort puts first, in
    that order. Inputs must satisfy `covers`."""
    return _launch(scores, k, None)[0]


def hide_unseen(scores: Tensor, visible: Tensor) -> None:
    """Scores [..., N] set to -inf in place at and past each row's `visible` [...] count: one launch (torch's mask
    is three), or torch's where the rows are not evenly strided."""
    n = scores.shape[-1]
    rows = scores.detach().reshape(-1, n)
    if rows.numel() and rows.data_ptr() != scores.data_ptr():  # (reshape copied them: no view to write through)
        scores.masked_fill_(torch.arange(n, device=scores.device) >= visible.unsqueeze(-1), float("-inf"))
        return
    block = min(_BLOCK, triton.next_power_of_2(n))
    if rows.numel():
        _hide_kernel[(rows.shape[0], triton.cdiv(n, block))](rows, rows.stride(0), visible.reshape(-1).contiguous(), n,
                                                             BLOCK=block)


def index_picks(scores: Tensor, visible: Tensor, k: int, offset: int = 0,
                prefix: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`ReferenceBackend.index_topk` on scores [..., N]: the picks [..., k] (plus `offset`; -1 at or past a row's
    visible count; after the row's `prefix` where given) and their scores, from the kernel directly. The scores
    past `visible` are masked in place first (`hide_unseen`) where the k-th value needs them masked (k < N); at
    k = N (every entry picked: a context with no more entries than the top-k takes, every decode step's below
    ~2K tokens at V4's k = 512) the kernel ranks them as -inf as it reads them, and `scores` is left as it is."""
    if k < scores.shape[-1]:
        hide_unseen(scores, visible)
    return _launch(scores, k, visible, offset, prefix)


__all__ = ["MAX_K", "covers", "earliest_k", "hide_unseen", "index_picks"]
