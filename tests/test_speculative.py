"""Cache rollback is exact, and MTP speculative greedy decoding emits exactly the plain greedy sequence."""

import copy

import pytest
import torch

from dsv4.config import preset
from dsv4.engine import speculative
from dsv4.engine.speculative import speculative_generate
from dsv4.generate import generate
from dsv4.model import Transformer, init_weights


@pytest.fixture(scope="module")
def model():
    # tiny: window 8, ratios 4 / 8, so 40+ tokens wrap the window and cross compression boundaries
    return init_weights(Transformer(preset("tiny")), seed=1)


def prompts(model, sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.args.vocab_size, (n,), generator=gen).tolist() for n in sizes]


def cache_tensors(cache):
    out = [cache.lengths, cache.mtp_lengths]
    for layer in cache.layers:
        out.append(layer.window)
        for state in (layer.compressor, layer.indexer):
            if state is not None:
                out += [state.kv, state.score, state.entries]
    return out


@torch.no_grad()
def test_restore_undoes_appended_tokens_exactly(model):
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(0, model.args.vocab_size, (1, 40), generator=gen)
    cache = model.new_cache(1, 64)
    for lo, hi in ((0, 13), (13, 22), (22, 27)):  # several positions relative to window / compression blocks
        streams = model.forward_streams(seq[:, lo:hi], cache)
        model.mtp_streams(streams, seq[:, lo + 1:hi + 1], cache)
        before = [t.clone() for t in cache_tensors(cache)]
        snap = cache.snapshot(4)
        junk = torch.randint(0, model.args.vocab_size, (1, 4), generator=gen)
        streams = model.forward_streams(junk, cache)
        model.mtp_streams(streams[:, :3], junk[:, 1:], cache)
        cache.rollback(snap)
        for a, b in zip(before, cache_tensors(cache), strict=True):
            assert torch.equal(a, b)
    # and the next forward equals a run that never saw the junk
    got = model(seq[:, 27:], cache)
    ref = model(seq)[:, 27:]
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


@torch.no_grad()
def test_partial_rollback_keeps_the_accepted_prefix(model):
    """Append 4 tokens of which only the first `keep` belong to the sequence; roll back the rest and
    continue: main and MTP logits equal the full forward."""
    gen = torch.Generator().manual_seed(2)
    seq = torch.randint(0, model.args.vocab_size, (1, 45), generator=gen)
    full = model.forward_streams(seq)
    ref_logits, ref_mtp = model.logits(full), model.mtp_logits(full[:, :-1], seq[:, 1:])
    cache = model.new_cache(1, 64)
    pos, logits, mtp = 0, [], []
    while pos < 44:
        snap = cache.snapshot(4)
        keep = min(int(torch.randint(1, 5, (1,), generator=gen)), 44 - pos)
        chunk = torch.cat((seq[:, pos:pos + keep], torch.randint(0, model.args.vocab_size, (1, 4 - keep),
                                                                 generator=gen)), dim=1)
        streams = model.forward_streams(chunk, cache)
        model.mtp_streams(streams[:, :2], chunk[:, 1:3], cache)  # provisional MTP writes, undone below
        cache.rollback(snap, lengths=torch.tensor([pos + keep]))
        logits.append(model.logits(streams[:, :keep]))
        mtp.append(model.mtp_logits(streams[:, :keep], seq[:, pos + 1:pos + keep + 1], cache))
        pos += keep
    assert cache.lengths.tolist() == [44] and cache.mtp_lengths.tolist() == [44]
    for got, ref in ((torch.cat(logits, 1), ref_logits[:, :44]), (torch.cat(mtp, 1), ref_mtp)):
        assert (got - ref).abs().max() / ref.abs().max() < 1e-5


def test_snapshot_refuses_steps_longer_than_a_ring(model):
    cache = model.new_cache(1, 32)
    with pytest.raises(ValueError, match="smallest cache ring"):
        cache.snapshot(cache.ring_limit() + 1)
    with pytest.raises(ValueError, match="rollback"):
        cache.rollback(cache.snapshot(2), lengths=torch.tensor([1]))


@pytest.mark.parametrize("num_draft", [1, 2, 3])
def test_speculative_equals_greedy(model, num_draft):
    for prompt, n in zip(prompts(model, (1, 7, 12)), (41, 45, 20), strict=True):
        ref = generate(model, [prompt], n).tokens[0]
        got, stats = speculative_generate(model, prompt, n, num_draft=num_draft)
        assert got == ref
        assert 0 <= stats.accepted <= stats.drafted == num_draft * stats.steps
        assert stats.main_forwards == stats.steps + 1
        assert 0.0 <= stats.acceptance_rate <= 1.0


@pytest.mark.parametrize("num_draft,wrong", [(1, 0.0), (3, 0.0), (2, 0.3), (3, 0.5)])
def test_oracle_drafts_are_accepted(model, monkeypatch, num_draft, wrong):
    """A drafter proposing the true greedy tokens (some corrupted at random): everything correct is
    accepted, the output is still the greedy sequence, and all rollback paths are exercised."""
    prompt, n = prompts(model, (6,), seed=3)[0], 44
    truth = generate(model, [prompt], n + num_draft + 1).tokens[0]
    gen = torch.Generator().manual_seed(4)
    real_draft = speculative.mtp_draft

    def oracle(model_, cache, history, first, hidden, k):
        real_draft(model_, cache, history, first, hidden, k)  # keep the provisional MTP writes in play
        done = len(history) - len(prompt)
        drafts = truth[done:done + k]
        return [(t + 1) % model.args.vocab_size if torch.rand((), generator=gen) < wrong else t for t in drafts]

    monkeypatch.setattr(speculative, "mtp_draft", oracle)
    got, stats = speculative_generate(model, prompt, n, num_draft=num_draft)
    assert got == truth[:n]
    if wrong == 0:
        assert stats.accepted == stats.drafted and stats.acceptance_rate == 1.0
        assert stats.steps == -(-(n - 1) // (num_draft + 1))
    else:
        assert 0 < stats.accepted < stats.drafted


def test_eos_stops_like_generate(model):
    prompt = prompts(model, (5,), seed=5)[0]
    ref = generate(model, [prompt], 30).tokens[0]
    eos = ref[17]
    want = generate(model, [prompt], 30, eos_id=eos).tokens[0]
    assert want[-1] == eos and len(want) <= 18
    for k in (1, 3):
        assert speculative_generate(model, prompt, 30, num_draft=k, eos_id=eos)[0] == want


def test_speculative_leaves_the_model_alone(model):
    state = copy.deepcopy(model.state_dict())
    speculative_generate(model, [1, 2, 3], 5, num_draft=2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
