"""Cached, chunked and batched computation equals the full forward."""

import torch
from test_model import random_model

from dsv4.formats import to_official_formats
from dsv4.model import Transformer, init_weights


def run_chunked(model: Transformer, seqs: list[torch.Tensor], schedule: list[list[int]], capacity: int = 96):
    """Feed each row its own chunk sizes per step (right-padded into one batch call); return each
    row's concatenated logits."""
    cache = model.new_cache(len(seqs), capacity)
    pos = [0] * len(seqs)
    outs: list[list[torch.Tensor]] = [[] for _ in seqs]
    for step in schedule:
        width = max(step)
        tokens = torch.zeros(len(seqs), max(width, 1), dtype=torch.long)
        for b, n in enumerate(step):
            tokens[b, :n] = seqs[b][pos[b]:pos[b] + n]
        logits = model(tokens, cache, lengths=torch.tensor(step), start_pos=torch.tensor(pos))
        for b, n in enumerate(step):
            outs[b].append(logits[b, :n])
            pos[b] += n
    assert cache.lengths.tolist() == pos
    return [torch.cat(o) for o in outs]


def random_schedule(lengths: list[int], gen: torch.Generator, max_chunk: int = 13, decode_tail: int = 6):
    """Random chunk sizes per row (0 allowed: the row idles that step), ending in single tokens."""
    left = [n - decode_tail for n in lengths]
    schedule = []
    while any(left):
        step = [min(r, int(torch.randint(0, max_chunk + 1, (1,), generator=gen))) for r in left]
        left = [r - s for r, s in zip(left, step, strict=True)]
        schedule.append(step)
    return schedule + [[1] * len(lengths)] * decode_tail


def full_logits(model, seqs):
    return [model(s.unsqueeze(0))[0] for s in seqs]


@torch.no_grad()
def test_chunked_batched_decoding_equals_full_forward_fp32():
    model = random_model()
    gen = torch.Generator().manual_seed(3)
    lengths = [61, 44]
    seqs = [torch.randint(0, model.args.vocab_size, (n,), generator=gen) for n in lengths]
    ref = full_logits(model, seqs)
    for trial in range(2):
        got = run_chunked(model, seqs, random_schedule(lengths, gen))
        for b in range(2):
            err = (got[b] - ref[b]).abs().max() / ref[b].abs().max()
            assert err < 1e-5, (trial, b, err)


@torch.no_grad()
def test_decode_steps_write_the_rings_a_chunk_writes():
    """Decode and verify steps (every row feeding the same few tokens) write them into their ring slots in place,
    and a decode step reads the window from the ring; a long chunk rebuilds the rings. Step by step from position
    0 (1 token a step with and without explicit lengths, 3 a step), the logits equal the full forward's and the
    window rings and compressor tails equal those one chunk leaves."""
    model = random_model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 29), generator=torch.Generator().manual_seed(6))
    ref = model(tokens)
    chunked = model.new_cache(2, 64)
    model(tokens, chunked)
    for width, lengths in ((1, None), (1, torch.tensor([1, 1])), (3, None)):
        stepped = model.new_cache(2, 64)
        got = torch.cat([model(tokens[:, i:i + width], stepped, lengths=lengths)
                         for i in range(0, tokens.shape[1], width)], 1)
        assert (got - ref).abs().max() / ref.abs().max() < 1e-5
        # equal up to the GEMMs' last bits (one row at a time against 29): a row in the wrong slot is far off
        for layer, want in zip(stepped.layers, chunked.layers, strict=True):
            torch.testing.assert_close(layer.window, want.window, rtol=1e-5, atol=1e-5)
            for state, want_state in ((layer.compressor, want.compressor), (layer.indexer, want.indexer)):
                if state is not None:
                    torch.testing.assert_close(state.kv, want_state.kv, rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(state.score, want_state.score, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cache_rows_are_reusable_and_independent():
    model = random_model()
    gen = torch.Generator().manual_seed(4)
    a, b = (torch.randint(0, model.args.vocab_size, (30,), generator=gen) for _ in range(2))
    cache = model.new_cache(2, 64)
    model(torch.stack((b, b)), cache)  # fill both rows with another sequence first
    cache.reset([0])
    out = model(torch.stack((a[:20], b[:20])), cache, lengths=torch.tensor([20, 0]))
    ref = model(a[:20].unsqueeze(0))[0]
    assert (out[0] - ref).abs().max() / ref.abs().max() < 1e-5
    assert cache.lengths.tolist() == [20, 30]


@torch.no_grad()
def test_mtp_with_cache_equals_full():
    model = random_model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 37))
    streams = model.forward_streams(tokens)
    ref = model.mtp_logits(streams[:, :-1], tokens[:, 1:])
    cache = model.new_cache(2, 64)
    parts = []
    for lo, hi in ((0, 17), (17, 18), (18, 30), (30, 36)):
        parts.append(model.mtp_logits(streams[:, lo:hi], tokens[:, lo + 1:hi + 1], cache))
    got = torch.cat(parts, dim=1)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


@torch.no_grad()
def test_exact_numerics_cache_parity():
    """Exact mode (FP8/FP4 GEMMs, KV FP8 and indexer FP4 simulation) through the cache.

    With fp32 activations the chunked path equals the full forward tightly. With bf16 activations
    (the official setting) CPU GEMMs round differently for different row counts (lengths that are
    not a multiple of the SIMD width), and on a random model those last-bit differences flip FP8
    roundings and routing choices. So the bf16 bound is the spread between equally valid full
    computations: full forwards of prefixes of odd lengths against the full forward."""
    gen = torch.Generator().manual_seed(5)
    lengths = [40, 29]
    for dtype in (torch.float32, torch.bfloat16):
        model = to_official_formats(init_weights(Transformer(random_model().args, dtype=dtype, numerics="exact"),
                                                 seed=1))
        assert model.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fn
        seqs = [torch.randint(0, model.args.vocab_size, (n,), generator=gen) for n in lengths]
        ref = full_logits(model, seqs)
        got = run_chunked(model, seqs, random_schedule(lengths, gen))
        rel = torch.cat([(g - r).norm(dim=-1) / r.norm(dim=-1) for g, r in zip(got, ref, strict=True)])
        if dtype == torch.float32:
            assert rel.max() < 1e-5, rel.max()
            continue
        # bf16: last-bit GEMM differences compound over chunk boundaries on this chaotic random model
        # (measured: mean 0.06, max 0.44 relative per position). A cache bug is a different order of
        # magnitude: the same comparison against a sequence differing in one early token.
        assert rel.mean() < 0.15 and rel.max() < 0.6, (rel.mean(), rel.max())
        other = seqs[0].clone()
        other[2] = (other[2] + 1) % model.args.vocab_size
        wrong = model(other.unsqueeze(0))[0]
        assert ((got[0] - wrong).norm(dim=-1) / wrong.norm(dim=-1))[8:].mean() > 0.3


def test_a_verify_steps_window_rows_name_what_the_position_ordered_window_names():
    """`_ring_window_indices` (a verify step's few tokens over the ring as it is and the chunk) computed from the
    positions alone names, slot for slot, the rows `_window_indices` names over the ring in position order and the
    chunk, mapped to the ring's slots: starts before, at and past the window, one and several tokens, a fresh
    sequence's first chunk (its window slots cut to the chunk)."""
    from dsv4.model.attention import _ring_window_indices, _window_indices
    from dsv4.model.cache import ForwardContext

    for W, starts, seqlen in ((8, [0, 3, 7, 8, 20], 3), (8, [5, 9], 1), (4, [0, 0], 2), (6, [2, 40], 6),
                              (8, [7, 8, 20], 3), (6, [40], 6), (8, [7], 1), (5, [4, 9, 13], 2)):  # windows full
        start = torch.tensor(starts)
        tokens = torch.zeros(len(starts), seqlen, dtype=torch.long)
        ctx = ForwardContext(tokens, start, torch.full_like(start, seqlen), start.unsqueeze(1) + torch.arange(seqlen),
                             exact=False, persist=True, appends=seqlen, fresh=not bool(start.any()))
        ring_slots, idx, _ = _window_indices(W, seqlen, ctx, rewrite=False)
        in_ring = (idx >= 0) & (idx < W)
        want = torch.where(in_ring, ring_slots.gather(1, idx.clamp(0, W - 1).flatten(1)).view_as(idx), idx)
        assert torch.equal(_ring_window_indices(W, seqlen, ctx), want), (W, starts, seqlen)


def test_a_chunks_finished_entry_pairs_are_the_true_places_of_its_mask_in_grid_order():
    """`_finished_pairs` builds from the host's counts what `nonzero` of the [B, M] mask "m < count of row b" gives
    (without reading the device): rows that finish none, some and all M entries, and the whole grid."""
    from dsv4.model.compressor import _finished_pairs

    for counts, m in (((0, 2, 1, 2), 2), ((3, 3), 3), ((0, 0, 1), 1), ((1,), 4), ((2, 0, 5, 5, 1), 5)):
        mask = torch.arange(m).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
        want = mask.nonzero(as_tuple=True)
        got = _finished_pairs(counts, m, torch.device("cpu"))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (counts, m)
