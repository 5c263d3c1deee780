"""The Triton compressor pooling (`dsv4/kernels/triton/pool.py`) against the reference `gated_pool`: the same
candidates, masks and softmax; the sums over the candidates are reduction trees where torch's CPU sums add in
order, so entries agree to fp32 rounding of their magnitude.

On a machine without a GPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py)
on CPU tensors; with one, on CUDA tensors against the reference on CPU copies.
"""

from __future__ import annotations

import pytest
import torch
from test_triton_rows import _on

pytest.importorskip("triton")

from dsv4.kernels.reference import ReferenceBackend, ring_candidates  # noqa: E402
from dsv4.kernels.triton import pool  # noqa: E402

REF = ReferenceBackend()


@pytest.mark.parametrize(("rows", "c", "entries", "n"), [(40, 64, 6, 8), (300, 128, 3, 128), (20, 96, 5, 8),
                                                         (50, 512, 2, 8)])
def test_gated_pool_matches_the_reference(rows, c, entries, n):
    """CSA's 2r candidates (the first entry's previous block missing: -1) and HCA's 128, channel counts that are
    and are not a power of two, scores large enough that the softmax is far from uniform."""
    g = torch.Generator().manual_seed(rows + n)
    kv, score = torch.randn(rows, c, generator=g), torch.randn(rows, c, generator=g) * 4
    candidates = torch.randint(0, rows, (entries, n), generator=g)
    candidates[0, : n // 2] = -1
    got = pool.gated_pool(_on(kv), _on(score), _on(candidates)).cpu()
    want = REF.gated_pool(kv, score, candidates)
    assert got.dtype == torch.float32 and got.shape == (entries, c)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * float(kv.abs().max()))
    # the missing candidates count for nothing: the first entry is its second half's pool
    alone = REF.gated_pool(kv, score, candidates[:1, n // 2 :])
    torch.testing.assert_close(got[:1], alone, rtol=1e-5, atol=2e-6 * float(kv.abs().max()))


def test_what_the_pooling_kernel_covers():
    kv, candidates = torch.randn(10, 64), torch.randint(0, 10, (3, 8))
    assert pool.covers(kv, kv, candidates) and pool.covers(kv, kv, candidates.int())
    assert not pool.covers(kv.bfloat16(), kv.bfloat16(), candidates)
    assert not pool.covers(kv, kv[:, :32], candidates)
    assert not pool.covers(kv, kv, candidates.float())
    assert not pool.covers(kv, kv, torch.zeros(3, 2000, dtype=torch.long))
    assert not pool.covers(kv, kv, torch.zeros(3, 0, dtype=torch.long))  # (the reference's empty sum: zeros)
    assert not pool.covers(kv.t(), kv.t(), candidates)
    wants = kv.clone().requires_grad_()
    assert not pool.covers(wants, kv, candidates)
    with torch.no_grad():
        assert pool.covers(wants, kv, candidates)


def _ring_step(ratio: int, coff: int, c: int, storage: list[int], parent_rows: int, seed: int):
    """A decode step's inputs: tokens of `len(storage)` batch rows at random positions (row 0 in entry 0, which has
    no previous block), rings of `parent_rows` rows of R = coff * ratio slots (the step's row i is ring row
    storage[i], starting at row storage[i] * R of the rings' slots), and, built here, what the op derives from the
    positions: each token's slot and phase, and each entry's candidates into the rings as rows of c (CSA: the
    previous block's first halves, -1 for entry 0's, then the block's second halves; HCA: the block's slots)."""
    g = torch.Generator().manual_seed(seed)
    b, ring, width = len(storage), coff * ratio, coff * c
    kv, score = torch.randn(b, width, generator=g), torch.randn(b, width, generator=g) * 3
    ape = torch.randn(ratio, width, generator=g)
    ring_kv, ring_score = torch.randn(parent_rows, ring, width, generator=g), torch.randn(parent_rows, ring, width,
                                                                                         generator=g) * 3
    positions = torch.randint(0, 4 * ring, (b,), generator=g)
    positions[0] = ratio - 1  # (entry 0: no previous block)
    base = torch.tensor(storage) * ring
    at = base + positions % ring
    candidates = []
    for p, first_slot in zip(positions.tolist(), base.tolist(), strict=True):
        block = [p // ratio * ratio + i for i in range(ratio)]  # the entry's positions, each in slot q % R
        if coff == 2:
            prev = [-1 if p < ratio else 2 * (first_slot + (q - ratio) % ring) for q in block]
            candidates.append(prev + [2 * (first_slot + q % ring) + 1 for q in block])
        else:
            candidates.append([first_slot + q % ring for q in block])
    return kv, score, ape, positions, ring_kv, ring_score, base, at, torch.tensor(candidates)


def test_ring_candidates_name_the_entrys_blocks():
    """The reference's candidates (`reference.ring_candidates`) against the list built position by position."""
    for ratio, coff in ((4, 2), (16, 1), (8, 1)):
        for seed in range(3):
            *_, positions, _, _, base, _, candidates = (None, *_ring_step(ratio, coff, 8, [2, 0, 1, 4], 5, seed))
            assert torch.equal(ring_candidates(positions, base, ratio, coff * ratio), candidates)


@pytest.mark.parametrize(("ratio", "coff", "c"), [(4, 2, 64), (4, 2, 96), (16, 1, 128), (128, 1, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_pool_writes_the_slots_then_pools_the_rings_in_place(ratio, coff, c, dtype):
    """The step's tokens land in their ring rows (score plus its phase's ape row) exactly as the reference writes
    them, the other ring rows untouched, and the entries are the kernel's own gated pool of the rings after the
    writes over the candidates the positions name (bit for bit) and the reference's to fp32 rounding; batch rows
    that are rows 3, 0 and 5 of the rings (a cache view), CSA's and HCA's candidates, channel counts that are and
    are not a power of two."""
    kv, score, ape, positions, ring_kv, ring_score, base, at, candidates = _ring_step(ratio, coff, c, [3, 0, 5], 6,
                                                                                     seed=ratio + c)
    want_kv, want_score = ring_kv.clone(), ring_score.clone()
    want = REF.ring_pool(kv, score, ape, positions, want_kv, want_score, base, True, dtype)
    got_kv, got_score = _on(ring_kv.clone()), _on(ring_score.clone())
    got = pool.ring_pool(_on(kv), _on(score), _on(ape), _on(positions), got_kv, got_score, _on(base), True, dtype)
    assert torch.equal(got_kv.cpu(), want_kv) and torch.equal(got_score.cpu(), want_score)
    assert not torch.equal(want_kv, ring_kv) and torch.equal(want_kv[[1, 2, 4]], ring_kv[[1, 2, 4]])
    assert torch.equal(want_kv.view(-1, coff * c)[at], kv)
    assert torch.equal(want_score.view(-1, coff * c)[at], score + ape[positions % ratio])
    assert got.dtype == dtype and got.shape == (3, c)
    own = pool.gated_pool(got_kv.view(-1, c), got_score.view(-1, c), _on(candidates)).to(dtype).cpu()
    assert torch.equal(got.cpu(), own)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=(1e-2 if dtype == torch.bfloat16 else 2e-6) * float(ring_kv.abs().max()))


def test_ring_pool_without_pooling_writes_the_slots_alone():
    kv, score, ape, positions, ring_kv, ring_score, base, at, _ = _ring_step(4, 2, 64, [1, 2], 3, seed=7)
    want_kv, want_score = ring_kv.clone(), ring_score.clone()
    assert REF.ring_pool(kv, score, ape, positions, want_kv, want_score, base, False, torch.float32) is None
    got_kv, got_score = _on(ring_kv.clone()), _on(ring_score.clone())
    assert pool.ring_pool(_on(kv), _on(score), _on(ape), _on(positions), got_kv, got_score, _on(base), False,
                          torch.float32) is None
    assert torch.equal(got_kv.cpu(), want_kv) and torch.equal(got_score.cpu(), want_score)
    assert torch.equal(want_kv.view(-1, 128)[at], kv)
    assert torch.equal(want_score.view(-1, 128)[at], score + ape[positions % 4])


def test_what_the_ring_pool_kernel_covers():
    kv, score, ape, positions, ring_kv, ring_score, base, _, _ = _ring_step(4, 2, 64, [0, 1], 2, seed=3)
    args = (kv, score, ape, positions, ring_kv, ring_score, base)
    assert pool.covers_ring(*args, torch.bfloat16) and pool.covers_ring(*args, torch.float32)
    assert not pool.covers_ring(*args, torch.float64)
    assert not pool.covers_ring(kv.bfloat16(), *args[1:], torch.float32)
    assert not pool.covers_ring(*args[:4], ring_kv.transpose(0, 1), *args[5:], torch.float32)
    assert not pool.covers_ring(*args[:4], ring_kv[:, :6], ring_score[:, :6], base, torch.float32)  # R not coff * r
    assert not pool.covers_ring(*args[:3], positions.float(), *args[4:], torch.float32)
    assert not pool.covers_ring(*args[:6], base[:1], torch.float32)  # not a ring start a row
    wants = kv.clone().requires_grad_()
    assert not pool.covers_ring(wants, *args[1:], torch.float32)


@pytest.mark.parametrize(("ratio", "coff", "c", "k", "storage"), [
    (4, 2, 64, 96, [3, 0, 5]),  # CSA, K not a multiple of the kernel's block
    (4, 2, 96, 256, [1]),  # channels not a power of two, one row
    (16, 1, 128, 64, list(range(10))),  # HCA, more rows than a program's block
    (128, 1, 32, 128, [2, 0]),
])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_project_ring_pool_is_ring_pool_of_the_projections(ratio, coff, c, k, storage, x_dtype):
    """The fused op writes the slots with the projections of x (in fp32) and pools them: against the reference's
    two fp32 GEMMs then `ring_pool`, the ring rows agree to fp32 rounding of the sums over K (the other rows
    untouched), and the entries are the kernel's own gated pool of the rings it wrote (bit for bit) and the
    reference's to fp32 rounding; bf16 tokens are upcast exactly as the reference's ``x.to(float32)``."""
    g = torch.Generator().manual_seed(ratio + c + k)
    *_, ape, positions, ring_kv, ring_score, base, at, candidates = _ring_step(ratio, coff, c, storage,
                                                                             max(storage) + 2, seed=k)
    x = torch.randn(len(storage), k, generator=g).to(x_dtype)
    wkv, wgate = torch.randn(coff * c, k, generator=g) / k**0.5, torch.randn(coff * c, k, generator=g) / k**0.5 * 3
    want_kv, want_score = ring_kv.clone(), ring_score.clone()
    want = REF.project_ring_pool(x, wkv, wgate, ape, positions, want_kv, want_score, base, True, torch.bfloat16)
    kv, score = x.float() @ wkv.T, x.float() @ wgate.T
    assert torch.equal(want_kv.view(-1, coff * c)[at], kv)  # (the reference: the GEMMs, then `ring_pool`)
    assert torch.equal(want_score.view(-1, coff * c)[at], score + ape[positions % ratio])
    got_kv, got_score = _on(ring_kv.clone()), _on(ring_score.clone())
    assert pool.covers_projection(x, wkv, wgate, ape, positions, ring_kv, ring_score, base, torch.bfloat16)
    got = pool.project_ring_pool(_on(x), _on(wkv), _on(wgate), _on(ape), _on(positions), got_kv, got_score,
                                 _on(base), True, torch.bfloat16)
    got_kv, got_score = got_kv.cpu(), got_score.cpu()
    untouched = torch.ones(ring_kv.shape[0] * ring_kv.shape[1], dtype=torch.bool)
    untouched[at] = False
    assert torch.equal(got_kv.view(-1, coff * c)[untouched], ring_kv.view(-1, coff * c)[untouched])
    assert torch.equal(got_score.view(-1, coff * c)[untouched], ring_score.view(-1, coff * c)[untouched])
    torch.testing.assert_close(got_kv, want_kv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_score, want_score, rtol=1e-5, atol=1e-5)
    own = pool.gated_pool(got_kv.view(-1, c), got_score.view(-1, c), candidates).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got.cpu(), own)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=1e-2, atol=1e-2)


def test_project_ring_pool_without_pooling_writes_the_slots_alone():
    *_, ape, positions, ring_kv, ring_score, base, at, _ = _ring_step(4, 2, 64, [1, 2], 3, seed=7)
    x, w = torch.randn(2, 32), torch.randn(128, 32)
    got_kv, got_score = _on(ring_kv.clone()), _on(ring_score.clone())
    assert pool.project_ring_pool(_on(x), _on(w), _on(-w), _on(ape), _on(positions), got_kv, got_score, _on(base),
                                  False, torch.float32) is None
    torch.testing.assert_close(got_kv.cpu().view(-1, 128)[at], x @ w.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_score.cpu().view(-1, 128)[at], -(x @ w.T) + ape[positions % 4], rtol=1e-5,
                               atol=1e-5)


def test_what_the_projecting_ring_pool_kernel_covers():
    *_, ape, positions, ring_kv, ring_score, base, _, _ = _ring_step(4, 2, 64, [0, 1], 2, seed=3)
    x, w = torch.randn(2, 32), torch.randn(128, 32)
    rings = (ape, positions, ring_kv, ring_score, base)
    assert pool.covers_projection(x, w, w, *rings, torch.bfloat16)
    assert pool.covers_projection(x.bfloat16(), w, w, *rings, torch.float32)
    assert not pool.covers_projection(x.double(), w, w, *rings, torch.float32)
    assert not pool.covers_projection(x, w.bfloat16(), w, *rings, torch.float32)  # (the kernel reads fp32 weights)
    assert not pool.covers_projection(x, w, w[:64], *rings, torch.float32)
    assert not pool.covers_projection(x, w[:, :16], w[:, :16], *rings, torch.float32)  # K not x's
    assert not pool.covers_projection(x.t(), w, w, *rings, torch.float32)
    assert not pool.covers_projection(x, w.t().contiguous().t(), w, *rings, torch.float32)
    assert not pool.covers_projection(x, w[:96], w[:96], *rings, torch.float32)  # C not the rings'
    assert not pool.covers_projection(x[:1], w, w, *rings, torch.float32)  # not a position a row
    wants = w.clone().requires_grad_()
    assert not pool.covers_projection(x, wants, w, *rings, torch.float32)
    with torch.no_grad():
        assert pool.covers_projection(x, wants, w, *rings, torch.float32)
