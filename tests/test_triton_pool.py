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

from dsv4.kernels.reference import ReferenceBackend  # noqa: E402
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
