"""Cache rollback is exact, MTP speculative greedy decoding emits exactly the plain greedy sequence, and the
speculative-sampling primitives (`draft_tokens`, `verify_drafts`) preserve the sampler's distribution."""

import copy
import math

import pytest
import torch

from dsv4.config import preset
from dsv4.engine import Sampler, SamplingParams, SequenceState, speculative
from dsv4.engine.sampling import process_logits
from dsv4.engine.speculative import draft_tokens, speculative_generate, verify_drafts
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
    """Everything a later forward can read: rings, tails and the entries finished within each row's length
    (entries past it are dead storage, rewritten before they become visible; so is each ring's slot of the next
    position, which the next token writes before any read reaches it)."""
    out = [cache.lengths, cache.mtp_lengths]

    def live(ring, length):
        ring = ring.clone()
        ring[0, int(length[0]) % ring.shape[1]] = 0
        return ring

    for layer_id, layer in enumerate(cache.layers):
        length = cache.mtp_lengths if layer_id >= cache.args.n_layers else cache.lengths
        out.append(live(layer.window, length))
        for state in (layer.compressor, layer.indexer):
            if state is not None:
                finished = int(length[0]) // cache.args.layer_ratio(layer_id)
                out += [live(state.kv, length), live(state.score, length), state.entries.read(finished)]
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
@pytest.mark.parametrize("kept, check", [(0, True), (1, True), (1, False)])
def test_partial_rollback_keeps_the_accepted_prefix(model, kept, check):
    """Append 4 tokens of which only the first `keep` belong to the sequence; roll back the rest and
    continue: main and MTP logits equal the full forward (`kept`: the snapshot told that the first stays, so it
    saves less; `check` False: the same rollback without the range checks)."""
    gen = torch.Generator().manual_seed(2)
    seq = torch.randint(0, model.args.vocab_size, (1, 45), generator=gen)
    full = model.forward_streams(seq)
    ref_logits, ref_mtp = model.logits(full), model.mtp_logits(full[:, :-1], seq[:, 1:])
    cache = model.new_cache(1, 64)
    pos, logits, mtp = 0, [], []
    while pos < 44:
        snap = cache.snapshot(4, kept=kept)
        keep = min(int(torch.randint(1, 5, (1,), generator=gen)), 44 - pos)
        chunk = torch.cat((seq[:, pos:pos + keep], torch.randint(0, model.args.vocab_size, (1, 4 - keep),
                                                                 generator=gen)), dim=1)
        streams = model.forward_streams(chunk, cache)
        model.mtp_streams(streams[:, :2], chunk[:, 1:3], cache)  # provisional MTP writes, undone below
        cache.rollback(snap, lengths=torch.tensor([pos + keep]), check=check)
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
    with pytest.raises(ValueError, match="kept"):
        cache.snapshot(2, kept=3)


@torch.no_grad()
def test_a_one_draft_verify_step_saves_nothing_and_rolls_back_exactly(model):
    """A verify step of one draft keeps its first token (`kept=1`): the only token it can undo is its last, whose
    ring slots the next token writes before any read, so the snapshot saves no rows of the main model's. Feeding
    each true token with a junk draft and undoing the draft, across window wraps and compression boundaries, the
    cache reads as one that consumed the true tokens alone and every step's first logits equal the full
    forward's. A rollback that would undo the kept token is refused."""
    gen = torch.Generator().manual_seed(4)
    seq = torch.randint(0, model.args.vocab_size, (1, 30), generator=gen)
    ref = model(seq)
    cache = model.new_cache(1, 64)
    main = {id(o) for layer in cache.layers[:model.args.n_layers] for o in (layer, layer.compressor, layer.indexer)}
    model.forward_streams(seq[:, :9], cache)
    got = []
    for pos in range(9, 30):
        snap = cache.snapshot(2, kept=1)
        assert not {id(part[0]) for part in snap.parts} & main  # (the MTP blocks' last slot is saved)
        junk = torch.randint(0, model.args.vocab_size, (1, 1), generator=gen)
        streams = model.forward_streams(torch.cat((seq[:, pos:pos + 1], junk), dim=1), cache)
        got.append(model.logits(streams[:, :1]))
        with pytest.raises(ValueError, match="rollback"):
            cache.rollback(snap, lengths=torch.tensor([pos]))
        cache.rollback(snap, lengths=torch.tensor([pos + 1]))
        if pos % 7 == 0:
            alone = model.new_cache(1, 64)
            model.forward_streams(seq[:, :pos + 1], alone)
            for want, have in zip(cache_tensors(alone), cache_tensors(cache), strict=True):
                assert (want.float() - have.float()).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    assert (torch.cat(got, 1) - ref[:, 9:]).abs().max() / ref.abs().max() < 1e-5


@torch.no_grad()
def test_a_snapshot_without_the_mtp_side_saves_only_the_main_rings_and_keeps_the_mtp_lengths(model):
    """`snapshot(mtp=False)` (a verify step whose drafts came from the previous step's MTP call): no MTP ring is
    saved, the main side rolls back as before, and a rollback that would undo MTP tokens it could not restore is
    refused."""
    gen = torch.Generator().manual_seed(5)
    seq = torch.randint(0, model.args.vocab_size, (1, 12), generator=gen)
    cache = model.new_cache(1, 64)
    streams = model.forward_streams(seq[:, :9], cache)
    model.mtp_streams(streams[:, :-1], seq[:, 1:9], cache)
    mtp = {id(o) for layer in cache.layers[model.args.n_layers:] for o in (layer, layer.compressor, layer.indexer)}
    assert {id(part[0]) for part in cache.snapshot(3).parts} & mtp  # the default saves the MTP side
    snap = cache.snapshot(3, mtp=False)
    assert snap.parts and not {id(part[0]) for part in snap.parts} & mtp
    model.forward_streams(seq[:, 9:12], cache)
    cache.rollback(snap, lengths=torch.tensor([10]))
    assert cache.lengths.tolist() == [10] and cache.mtp_lengths.tolist() == [8]
    snap = cache.snapshot(3, mtp=False)
    model.mtp_streams(model.forward_streams(seq[:, 10:11], cache), seq[:, 10:11], cache)
    with pytest.raises(ValueError, match="rollback"):
        cache.rollback(snap, lengths=torch.tensor([10]), mtp_lengths=torch.tensor([8]))


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


# -- speculative sampling: verify_drafts / draft_tokens --------------------------------------------------------

@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: one thread is several times faster on a 2-core runner
    yield
    torch.set_num_threads(threads)


def greedy_rule(logits, drafts):
    """speculative_generate's rule, written out: accept while the draft is the argmax, then emit the argmax."""
    greedy = logits.argmax(-1).tolist()
    a = 0
    while a < len(drafts) and drafts[a] == greedy[a]:
        a += 1
    return [*drafts[:a], greedy[a]], a


def peaked(*ids, vocab=10):
    """Target logits whose row i puts almost all mass on ids[i] (for sampled requests too)."""
    x = torch.zeros(len(ids), vocab)
    x[torch.arange(len(ids)), torch.tensor(ids)] = 60.0
    return x


def q_of(logits, params):
    """Draft distributions equal to the target's: every draft is accepted (p / q = 1)."""
    return process_logits(logits, [params] * len(logits), [SequenceState() for _ in logits]).probs()


def total_variation(tokens, expected):
    counts = torch.bincount(torch.tensor(tokens), minlength=expected.numel()).double()
    return 0.5 * float((counts / len(tokens) - expected.double()).abs().sum())


def tv_tolerance(n, vocab):
    """E[TV] of n draws is at most ~0.4 sqrt((V - 1) / n) (Cauchy-Schwarz on the per-token errors); allow 1.5x
    the square root, several times that mean."""
    return 1.5 * math.sqrt((vocab - 1) / n)


@pytest.mark.parametrize("draft", ["random", "equal", "disjoint"])
def test_verify_preserves_the_distribution(one_thread, draft):
    """V = 6, k = 2, top_k = 4 (two target tokens filtered): drafts drawn from q, 20k steps (10k when q = p or q
    is disjoint from p, where every step accepts all drafts or none). Each emitted position j follows p_j (the
    target after top-k), whatever q is; the first draft is accepted at the rate sum min(p, q): 1 for q = p, 0 for
    q on the filtered tokens only."""
    vocab, k, n = 6, 2, 20_000 if draft == "random" else 10_000
    gen = torch.Generator().manual_seed(11)
    target = torch.randn(k + 1, vocab, generator=gen) * 1.5
    params = SamplingParams(top_k=4)
    p = torch.softmax(target, dim=-1)
    p = p * (p >= p.topk(4, dim=-1).values[:, -1:])
    p = p / p.sum(-1, keepdim=True)  # [k+1, V], written out independently of the sampler
    if draft == "random":
        q = torch.softmax(torch.randn(k, vocab, generator=gen) * 1.5, dim=-1)
    elif draft == "equal":
        q = p[:k].clone()
    else:
        q = (p[:k] == 0).float()
        q = q / q.sum(-1, keepdim=True)
    sampler = Sampler(seed=0)
    emitted, first_accepted = [], 0
    for _ in range(n):
        drafts = torch.multinomial(q, 1, generator=gen)[:, 0].tolist()
        out = verify_drafts(sampler, target, drafts, q, params, SequenceState())
        assert out.token_ids[:out.accepted] == drafts[:out.accepted] and len(out.token_ids) == out.accepted + 1
        emitted.append(out.token_ids)
        first_accepted += out.accepted > 0
    rate = float(torch.minimum(p[0], q[0]).sum())
    assert abs(first_accepted / n - rate) < 4 * math.sqrt(rate * (1 - rate) / n) + 1e-9
    checked = 0
    for j in range(k + 1):
        tokens = [t[j] for t in emitted if len(t) > j]
        if len(tokens) >= 2000:
            assert total_variation(tokens, p[j]) < tv_tolerance(len(tokens), vocab), (j, len(tokens))
            checked += 1
    assert checked == {"random": 3, "equal": 3, "disjoint": 1}[draft]
    if draft == "random":
        # power: resampling from p instead of max(0, p - q) after a rejection (a classic bug) is detectable
        a = torch.minimum(p[0], q[0])
        buggy = a + (1 - a.sum()) * p[0]
        assert total_variation(torch.multinomial(buggy, n, replacement=True, generator=gen).tolist(), p[0]) > \
            2 * tv_tolerance(n, vocab)


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_verify_greedy_is_the_greedy_rule(k):
    gen = torch.Generator().manual_seed(k)
    params = SamplingParams(temperature=0, seed=5, max_tokens=100)
    for trial in range(20):
        logits = torch.randn(k + 1, 50, generator=gen)
        drafts = logits[:k].argmax(-1).tolist()
        if trial % 2:
            drafts = [(t + 1) % 50 if torch.rand((), generator=gen) < 0.4 else t for t in drafts]
        state = SequenceState()
        out = verify_drafts(Sampler(), logits, drafts, torch.zeros(k, 50), params, state)
        want, a = greedy_rule(logits, drafts)
        assert (out.token_ids, out.accepted, out.finish_reason, out.logprobs) == (want, a, None, None)
        assert state.output_ids == want and state.generator is None  # greedy draws no randomness


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, presence_penalty=0.5, logprobs=3),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.02, frequency_penalty=0.4, repetition_penalty=1.2,
                   seed=17, logprobs=2),
    SamplingParams(temperature=1.1, min_p=0.1),
])
def test_verify_without_drafts_is_sample(params):
    """k = 0: the same tokens, logprobs, reasons, state and generator as Sampler.sample, bit for bit, over two
    steps (so both must advance the generators alike)."""
    gen = torch.Generator().manual_seed(6)
    for seed in range(3):
        a = SequenceState(prompt_ids=[1, 5, 7], output_ids=[5, 5, 2, seed])
        b = copy.deepcopy(a)
        sa, sb = Sampler(eos_id=3, seed=seed), Sampler(eos_id=3, seed=seed)
        for _ in range(2):
            logits = torch.randn(1, 40, generator=gen) * 2
            ref = sa.sample(logits, [params], [a])
            got = verify_drafts(sb, logits, [], torch.zeros(0, 40), params, b)
            assert (got.token_ids, got.accepted, got.finish_reason) == (ref.token_ids, 0, ref.finish_reasons[0])
            assert (got.logprobs or [None]) == ref.logprobs
        assert b.output_ids == a.output_ids
        assert torch.equal(a.output_counts, b.output_counts) if params.penalised else b.output_counts is None
        if params.seed is not None:
            assert torch.equal(a.generator.get_state(), b.generator.get_state())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_finishing_token_inside_accepted_drafts_ends_the_emission(temperature):
    logits = peaked(3, 5, 7, 2)
    drafts = [3, 5, 7]

    def verify(sampler, state=None, **kw):
        params = SamplingParams(temperature=temperature, **kw)
        state = state if state is not None else SequenceState(prompt_ids=[0])
        return verify_drafts(sampler, logits, drafts, q_of(logits[:3], params), params, state), state

    out, state = verify(Sampler(eos_id=9), stop_token_ids=[5])
    assert (out.token_ids, out.accepted, out.finish_reason) == ([3, 5], 3, "stop") and state.output_ids == [3, 5]
    out, state = verify(Sampler(eos_id=7))
    assert (out.token_ids, out.finish_reason) == ([3, 5, 7], "stop") and state.output_ids == [3, 5, 7]
    out, state = verify(Sampler(eos_id=7), ignore_eos=True)
    assert (out.token_ids, out.accepted, out.finish_reason) == ([3, 5, 7, 2], 3, None)
    # max_tokens: 3 already generated, room for 2 more
    out, state = verify(Sampler(), SequenceState(output_ids=[1, 1, 1]), max_tokens=5, logprobs=0)
    assert (out.token_ids, out.finish_reason) == ([3, 5], "length") and state.output_ids == [1, 1, 1, 3, 5]
    assert out.logprobs is not None and [lp.token_id for lp in out.logprobs] == [3, 5]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_penalties_see_the_earlier_drafts(temperature):
    """A repetition penalty on d_1 = 1 demotes token 1 at the next position (40 -> 20) below token 2 (30): the
    draft d_2 = 2 is the target's choice only if p_2 counts d_1 as generated (without, the step emits [1, 1])."""
    logits = torch.tensor([[0.0, 40.0, 0.0, 0.0], [0.0, 40.0, 30.0, 0.0], [0.0, 0.0, 0.0, 40.0]])
    params = SamplingParams(temperature=temperature, repetition_penalty=2.0, logprobs=1)
    state = SequenceState(prompt_ids=[0])
    q = torch.nn.functional.one_hot(torch.tensor([1, 2]), 4).float()
    out = verify_drafts(Sampler(seed=0), logits, [1, 2], q, params, state)
    assert (out.token_ids, out.accepted) == ([1, 2, 3], 2)
    assert out.logprobs is not None
    assert out.logprobs[1].logprob == pytest.approx(float(torch.log_softmax(torch.tensor([0.0, 20.0, 30.0, 0.0]),
                                                                           -1)[2]), abs=1e-5)
    # the state's cached counts follow the emitted tokens: the next step penalises like a fresh state would
    assert state.output_ids == [1, 2, 3] and state.output_counts.tolist() == [0, 1, 1, 1]


def test_logprobs_are_the_target_rows_as_the_sampler_reports_them():
    """Greedy with a frequency penalty: each emitted token's TokenLogprobs equal Sampler.sample's on that row with
    the earlier emitted tokens as output."""
    gen = torch.Generator().manual_seed(3)
    params = SamplingParams(temperature=0, frequency_penalty=0.7, repetition_penalty=1.5, logprobs=4)
    prefix = [4, 4, 1]
    for _ in range(10):
        logits = torch.randn(4, 12, generator=gen)
        drafts = torch.randint(0, 12, (3,), generator=gen).tolist()
        logits[torch.arange(3), torch.tensor(drafts)] += 5.0  # mostly accepted, so several positions are emitted
        out = verify_drafts(Sampler(), logits, drafts, torch.zeros(3, 12), params,
                            SequenceState(prompt_ids=[9], output_ids=list(prefix)))
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
        for j, lp in enumerate(out.logprobs):
            ref = Sampler().sample(logits[j:j + 1], [params],
                                   [SequenceState(prompt_ids=[9], output_ids=[*prefix, *out.token_ids[:j]])])
            want = ref.logprobs[0]
            assert want is not None and ref.token_ids[0] == lp.token_id == out.token_ids[j]
            assert lp.logprob == pytest.approx(want.logprob, abs=1e-6)
            assert [i for i, _ in lp.top] == [i for i, _ in want.top]
            assert [v for _, v in lp.top] == pytest.approx([v for _, v in want.top], abs=1e-6)


def test_same_seed_same_result():
    """A seeded request's steps depend only on its seed: not on the sampler, its seed, or other draws."""
    gen = torch.Generator().manual_seed(8)
    steps = [(torch.randn(4, 40, generator=gen), torch.softmax(torch.randn(3, 40, generator=gen), -1))
             for _ in range(10)]
    drafts = [torch.multinomial(q, 1, generator=gen)[:, 0].tolist() for _, q in steps]

    def decode(seed, sampler):
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed, max_tokens=1000, logprobs=2)
        state, outs = SequenceState(), []
        for (logits, q), d in zip(steps, drafts, strict=True):
            outs.append(verify_drafts(sampler, logits, d, q, params, state))
            sampler.sample(torch.randn(2, 40), [SamplingParams()] * 2, [SequenceState(), SequenceState()])
        return outs

    a = decode(7, Sampler(seed=0))
    assert a == decode(7, Sampler(seed=1))
    assert [o.token_ids for o in a] != [o.token_ids for o in decode(8, Sampler(seed=0))]
    assert 0 < sum(o.accepted for o in a) < 30  # both branches exercised


def test_verify_checks_shapes():
    params = SamplingParams()
    with pytest.raises(ValueError, match="target logits"):
        verify_drafts(Sampler(), torch.randn(2, 8), [1, 2], torch.rand(2, 8), params, SequenceState())
    with pytest.raises(ValueError, match="draft probs"):
        verify_drafts(Sampler(), torch.randn(3, 8), [1, 2], torch.rand(3, 8), params, SequenceState())
    with pytest.raises(ValueError, match="draft_probs"):  # a sampled request's acceptance reads q
        verify_drafts(Sampler(), torch.randn(3, 8), [1, 2], None, params, SequenceState())


def test_draft_tokens():
    """Greedy rows: argmax and one-hot q; sampled rows: q is the processed MTP logits with the earlier drafts
    counted as output, drafts follow q and come from the request's generator; the states are left alone."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 16, generator=gen)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=6, presence_penalty=2.0, seed=1),
              SamplingParams(temperature=0.7)]
    states = [SequenceState(prompt_ids=[1], output_ids=[2]) for _ in params]
    drafted = [[], [int(logits[1].argmax())], []]
    tokens, q = draft_tokens(Sampler(seed=0), logits, params, states, drafted)
    assert tokens[0] == logits[0].argmax() and q[0].tolist() == torch.nn.functional.one_hot(tokens[0], 16).tolist()
    want = process_logits(logits, params, [SequenceState([1], [2, *d]) for d in drafted]).probs()
    assert torch.equal(q, want)
    assert not torch.equal(q[1], process_logits(logits[1:2], params[1:2], [SequenceState([1], [2])]).probs()[0])
    assert (q.gather(1, tokens[:, None]) > 0).all()
    assert all(st.output_ids == [2] for st in states) and states[1].generator is not None
    # the seeded row does not depend on its batch; the drafts follow q
    alone = draft_tokens(Sampler(seed=5), logits[1:2], params[1:2], [SequenceState([1], [2])], drafted[1:2])[0]
    assert alone.tolist() == tokens[1:2].tolist()
    n = 20_000
    many, _ = draft_tokens(Sampler(seed=0), logits[2].expand(n, 16).clone(), [params[2]] * n,
                           [SequenceState() for _ in range(n)])
    assert total_variation(many.tolist(), q[2]) < tv_tolerance(n, 16)


def test_plain_greedy_drafts_and_verification_are_the_processed_ones():
    """Greedy rows without penalties or a grammar skip the logit processing: the same drafts (the first maximum,
    ties and NaN included), no q (what the processed path gives is one-hot at the draft, which no greedy
    verification reads), and the same verification as through `process_logits` (forced here by asking for
    logprobs, which only the processed path reports), with or without a q."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 512, generator=gen)
    logits[1, 10] = logits[1, 300] = logits[1].max() + 1  # a tie: the lower id
    logits[2, 77] = float("nan")
    logits[3] = 0.0
    params = [SamplingParams(temperature=0)] * len(logits)
    states = [SequenceState() for _ in logits]
    tokens, q = draft_tokens(Sampler(), logits, params, states)
    processed = process_logits(logits, params, states)
    assert tokens.tolist() == Sampler().draw(processed, params, states).tolist() == [
        int(logits[0].argmax()), 10, 77, 0, int(logits[4].argmax()), int(logits[5].argmax())]
    assert q is None
    assert torch.equal(processed.probs(), torch.nn.functional.one_hot(tokens, 512).float())
    for trial in range(12):
        k = trial % 4
        target = torch.randn(k + 1, 512, generator=gen)
        drafts = [int(t) if trial % 3 else int(t + 1) for t in target[:k].argmax(-1)]
        quick = verify_drafts(Sampler(), target, drafts, None if trial % 2 else torch.zeros(k, 512),
                              SamplingParams(temperature=0, max_tokens=2), SequenceState())
        full = verify_drafts(Sampler(), target, drafts, torch.zeros(k, 512), SamplingParams(temperature=0,
                             max_tokens=2, logprobs=0), SequenceState())
        assert (quick.token_ids, quick.accepted, quick.finish_reason) == (full.token_ids, full.accepted,
                                                                          full.finish_reason)
        assert quick.logprobs is None and len(full.logprobs) == len(full.token_ids)
