"""dsv4.engine.sampling: the batched sampler (official Exp-noise draw after penalties, temperature, min-p, top-k,
top-p), its exactness, masks, penalties, per-request seeds, logprobs and stop reporting."""

import math

import pytest
import torch

from dsv4.engine import Sampler, SamplingParams, SequenceState
from dsv4.engine.sampling import apply_penalties, filter_mask, process_logits

# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46}


def chi_square(tokens: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic of the observed token counts against the expected distribution (over its support);
    returns (statistic, degrees of freedom). Asserts nothing outside the support was drawn."""
    counts = torch.bincount(tokens, minlength=expected.numel()).double()
    support = expected > 0
    assert counts[~support].sum() == 0, f"drew filtered tokens: {counts.tolist()}"
    exp = expected.double()[support] * tokens.numel()
    return float(((counts[support] - exp) ** 2 / exp).sum()), int(support.sum()) - 1


def official(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """DeepSeek's generate.py rule, written out independently."""
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    return (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(dim=-1)


def run(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], states=None):
    states = states if states is not None else [SequenceState() for _ in params]
    return sampler.sample(logits, params, states)


# -- the official rule and the exactness of the distribution -------------------------------------------------

@pytest.mark.parametrize("temperature", [0.6, 1.0, 1e-7])
def test_plain_sampling_is_the_official_rule(temperature):
    logits = torch.randn(8, 50)
    for seed in (0, 33377335):
        got = run(Sampler(seed=seed), logits, [SamplingParams(temperature=temperature)] * 8).token_ids
        assert got == official(logits, temperature, torch.Generator().manual_seed(seed)).tolist()


def test_distribution_after_filters_is_exact():
    """min-p, top-k, then top-p on the renormalised remainder: the draws follow the hand-computed distribution
    (chi-square at p = 0.001 with a fixed seed), and never a filtered token."""
    p = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05])
    perm = torch.tensor([4, 0, 6, 2, 5, 1, 3])  # token perm[i] has prob p[i]
    probs = torch.zeros(7)
    probs[perm] = p
    logits = probs.log() + 3.0
    # min_p 0.2: drops 0.05 (< 0.06); top_k 5: keeps 0.30..0.10; top_p 0.7 over the kept mass 0.87:
    # 0.30/.87 = .345, .50/.87 = .575, .65/.87 = .747 >= .7 -> the first three. (Before renormalising, the
    # prefix would reach .7 only at the fourth token: a wrong order or missing renormalisation fails the test.)
    expected = torch.zeros(7)
    expected[perm[:3]] = p[:3] / p[:3].sum()
    params = SamplingParams(temperature=1.0, min_p=0.2, top_k=5, top_p=0.7)
    n = 60_000
    tokens = run(Sampler(seed=1), logits.expand(n, 7).clone(), [params] * n).tokens
    stat, df = chi_square(tokens, expected)
    assert df == 2 and stat < CHI2_999[df], stat
    # the same draws scored against the unrenormalised-top-p distribution (4 tokens) fail it
    wrong = torch.zeros(7)
    wrong[perm[:4]] = p[:4] / p[:4].sum()
    with pytest.raises(AssertionError):
        assert chi_square(tokens, wrong)[0] < CHI2_999[3]


def test_distribution_with_temperature_and_seeded_requests():
    """Softmax(logits / T): unseeded rows (one shared generator) and 3000 requests with their own seeds."""
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7, 0.0, -1.5])
    expected = torch.softmax(logits / 0.5, dim=-1)
    n = 40_000
    tokens = run(Sampler(seed=2), logits.expand(n, 6).clone(), [SamplingParams(temperature=0.5)] * n).tokens
    stat, df = chi_square(tokens, expected)
    assert df == 5 and stat < CHI2_999[df], stat
    m = 3000
    seeded = [SamplingParams(temperature=0.5, seed=s) for s in range(m)]
    tokens = run(Sampler(), logits.expand(m, 6).clone(), seeded).tokens
    stat, df = chi_square(tokens, expected)
    assert stat < CHI2_999[df], stat


def test_filters_not_applied_to_zero_probability():
    """A filter that keeps one token makes the draw deterministic."""
    logits = torch.randn(16, 30)
    out = run(Sampler(seed=0), logits, [SamplingParams(top_k=1)] * 8 + [SamplingParams(min_p=1.0)] * 8)
    assert out.tokens.tolist() == logits.argmax(-1).tolist()


# -- the processed distribution (what the draw samples from; speculative verification compares against it) ------

MIXED = [SamplingParams(temperature=0), SamplingParams(temperature=0, presence_penalty=1.0),
         SamplingParams(temperature=0.7, top_k=1, seed=3), SamplingParams(temperature=0.8, top_p=0.6),
         SamplingParams(temperature=1.3, top_k=5, min_p=0.05, frequency_penalty=0.5, repetition_penalty=1.3),
         SamplingParams()]


def mixed_states():
    return [SequenceState(prompt_ids=[1, 2, 3], output_ids=[3, 4, 4, 9]) for _ in MIXED]


def test_processed_probs_are_distributions_over_the_kept_tokens():
    logits = torch.randn(len(MIXED), 30) * 2
    states = mixed_states()
    probs = process_logits(logits, MIXED, states).probs()
    assert probs.shape == (len(MIXED), 30)
    assert torch.allclose(probs.sum(-1), torch.ones(len(MIXED)), atol=1e-6)
    # greedy rows and top_k = 1: one-hot at the (penalised) argmax; top-p row: zero exactly off the mask
    penalised = logits[1].clone()
    penalised[[3, 4, 9]] -= 1.0
    for row, want in ((0, logits[0].argmax()), (1, penalised.argmax()), (2, logits[2].argmax())):
        assert probs[row].tolist() == torch.nn.functional.one_hot(want, 30).float().tolist()
    soft = torch.softmax(logits[3] / 0.8, dim=-1)
    keep = filter_mask(soft[None], torch.tensor([0]), torch.tensor([0.6]), torch.tensor([0.0]))[0]
    assert torch.equal(probs[3] > 0, keep) and 1 <= int(keep.sum()) < 30
    assert torch.allclose(probs[3], soft * keep / (soft * keep).sum())
    assert torch.allclose(probs[5], torch.softmax(logits[5], dim=-1))
    # nothing drawn or recorded: tokens and generators untouched
    assert all(st.output_ids == [3, 4, 4, 9] and st.generator is None for st in states)


def test_sample_draws_from_the_processed_probs():
    """The token Sampler.sample returns is the processed distribution's argmax for greedy / top_k = 1 rows, is
    never a zero-probability token, and over many draws follows the processed probs (chi-square)."""
    logits = torch.randn(len(MIXED), 30) * 2
    probs = process_logits(logits, MIXED, mixed_states()).probs()
    for seed in range(5):
        tokens = run(Sampler(seed=seed), logits, MIXED, mixed_states()).tokens
        assert (probs.gather(1, tokens[:, None]) > 0).all()
        assert tokens[:3].tolist() == probs[:3].argmax(-1).tolist()
    row, n = 4, 30_000  # temperature, min-p, top-k and all three penalties
    tokens = run(Sampler(seed=9), logits[row].expand(n, 30).clone(), [MIXED[row]] * n,
                 [SequenceState(prompt_ids=[1, 2, 3], output_ids=[3, 4, 4, 9]) for _ in range(n)]).tokens
    stat, df = chi_square(tokens, probs[row])
    assert df == 4 and stat < CHI2_999[df], stat
    # power: the same draws against the unpenalised distribution fail
    unpenalised = process_logits(logits[row:row + 1], [MIXED[row]], [SequenceState()]).probs()[0]
    with pytest.raises(AssertionError):
        assert chi_square(tokens, unpenalised)[0] < CHI2_999[4]


# -- the masks, hand-computed (dyadic probabilities, so fp32 sums are exact) ------------------------------------

def mask(probs, top_k=0, top_p=1.0, min_p=0.0, perm=None):
    probs = torch.tensor(probs)
    if perm is not None:  # place prob i at token perm[i]; report the kept i's
        shuffled = torch.zeros_like(probs)
        shuffled[torch.tensor(perm)] = probs
        keep = filter_mask(shuffled[None], torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))[0]
        return {i for i, t in enumerate(perm) if keep[t]}
    keep = filter_mask(probs[None], torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))[0]
    return set(torch.nonzero(keep).flatten().tolist())


P5 = [0.5, 0.25, 0.125, 0.0625, 0.0625]


def test_top_k_mask():
    assert mask(P5) == {0, 1, 2, 3, 4}
    assert mask(P5, top_k=1) == {0}
    assert mask(P5, top_k=2) == {0, 1}
    assert mask(P5, top_k=4) == {0, 1, 2, 3, 4}  # the 4th is tied with the 5th: both kept
    assert mask(P5, top_k=99) == {0, 1, 2, 3, 4}
    assert mask([0.25] * 4, top_k=1) == {0, 1, 2, 3}
    assert mask(P5, top_k=2, perm=[3, 1, 4, 0, 2]) == {0, 1}


def test_top_p_mask():
    # cumulative: .5 .75 .875 .9375 1 -> the shortest prefix reaching top_p, plus the tokens tied with its last
    assert mask(P5, top_p=1e-9) == {0}
    assert mask(P5, top_p=0.5) == {0}  # exactly reached by the first token
    assert mask(P5, top_p=0.5001) == {0, 1}
    assert mask(P5, top_p=0.75) == {0, 1}
    assert mask(P5, top_p=0.76) == {0, 1, 2}
    assert mask(P5, top_p=0.875) == {0, 1, 2}
    assert mask(P5, top_p=0.9) == {0, 1, 2, 3, 4}  # boundary token 3 tied with token 4
    assert mask([0.25] * 4, top_p=0.3) == {0, 1, 2, 3}  # ties at the top: all kept, whatever the ids
    assert mask([0.375, 0.25, 0.25, 0.125], top_p=0.5) == {0, 1, 2}
    assert mask(P5, top_p=0.76, perm=[2, 4, 0, 1, 3]) == {0, 1, 2}


def test_min_p_mask():
    assert mask(P5, min_p=0.25) == {0, 1, 2}  # threshold 0.125, inclusive
    assert mask(P5, min_p=0.26) == {0, 1}
    assert mask(P5, min_p=1.0) == {0}
    assert mask(P5, min_p=0.0) == {0, 1, 2, 3, 4}
    assert mask(P5, min_p=0.25, perm=[1, 0, 4, 3, 2]) == {0, 1, 2}


def test_combined_masks_renormalise_before_top_p():
    probs = [0.5, 0.25, 0.125, 0.125]
    # top_k 2 keeps mass .75; top_p .6 of it is reached by token 0 alone (.5/.75 = .67)
    assert mask(probs, top_k=2, top_p=0.6) == {0}
    assert mask(probs, top_p=0.6) == {0, 1}
    # min_p .25 (threshold .125) keeps all; top_k 3 keeps 0..3 (tie); top_p .8 -> .5 .75 .875 -> {0, 1, 2, 3}
    assert mask(probs, min_p=0.25, top_k=3, top_p=0.8) == {0, 1, 2, 3}
    # min_p .5 keeps {0, 1} (mass .75); top_p .7 of it: .5/.75 = .67 < .7 -> {0, 1}
    assert mask(probs, min_p=0.5, top_p=0.7) == {0, 1}


def test_batched_masks_are_per_row():
    probs = torch.tensor([P5, P5, P5, P5])
    keep = filter_mask(probs, torch.tensor([2, 0, 0, 3]), torch.tensor([1.0, 0.76, 1.0, 0.5]),
                       torch.tensor([0.0, 0.0, 0.25, 0.0]))
    assert [set(torch.nonzero(r).flatten().tolist()) for r in keep] == [{0, 1}, {0, 1, 2}, {0, 1, 2}, {0}]


# -- penalties --------------------------------------------------------------------------------------------------

def test_penalty_formulas():
    logits = torch.tensor([[1.0, -1.0, 2.0, -2.0, 0.5, 0.0]])
    counts = torch.tensor([[0, 0, 0, 1, 2, 0]])  # generated: 3, 4, 4
    prompt = torch.tensor([[False, False, True, True, False, False]])  # prompt: 2, 3
    out = apply_penalties(logits, counts, prompt, torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([2.0]))
    # 0, 1, 5 unseen; 2 prompt only: 2/2 (no presence: the prompt does not count); 3: -2*2 - .25 - .5;
    # 4: .5/2 - 2*.25 - .5
    assert out[0].tolist() == [1.0, -1.0, 1.0, -4.75, -0.75, 0.0]


def test_penalties_through_the_sampler():
    """The sampler's penalised distribution (seen through logprobs of a greedy request) is the formula's."""
    logits = torch.tensor([[1.0, -1.0, 2.0, -2.0, 0.5, 0.0]])
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
                            logprobs=6)
    state = SequenceState(prompt_ids=[2, 3], output_ids=[3, 4, 4])
    out = run(Sampler(), logits, [params], [state])
    want = torch.log_softmax(torch.tensor([1.0, -1.0, 1.0, -4.75, -0.75, 0.0]), dim=-1)
    lp = out.logprobs[0]
    assert lp is not None and lp.token_id == 0 == out.token_ids[0]  # 1.0 at ids 0 and 2: the lowest id
    assert dict(lp.top) == pytest.approx({i: v for i, v in enumerate(want.tolist())}, abs=1e-6)
    assert state.output_ids == [3, 4, 4, 0]


def test_penalty_counts_follow_the_generated_tokens():
    """Greedy over flat logits with a frequency penalty cycles through the vocabulary: each step's token is
    penalised at the next step (counts kept incrementally by the state)."""
    sampler, state = Sampler(), SequenceState(prompt_ids=[0], output_ids=[2])
    params = SamplingParams(temperature=0, frequency_penalty=1.0)
    got = [run(sampler, torch.zeros(1, 4), [params], [state]).token_ids[0] for _ in range(8)]
    assert got == [0, 1, 3, 0, 1, 2, 3, 0]  # 2 was already generated once before the first step
    assert state.output_counts is not None and state.output_counts.tolist() == [3, 2, 2, 2]
    # a presence penalty only counts once; repetition also looks at the prompt
    state = SequenceState(prompt_ids=[0, 1])
    rep = SamplingParams(temperature=0, repetition_penalty=3.0)
    assert [run(sampler, torch.ones(1, 3), [rep], [state]).token_ids[0] for _ in range(2)] == [2, 0]


def test_neutral_penalties_leave_logits_alone():
    logits = torch.randn(4, 40)
    out = run(Sampler(), logits, [SamplingParams(temperature=0, logprobs=3)] * 4,
              [SequenceState(prompt_ids=list(range(10)), output_ids=[1, 1, 2]) for _ in range(4)])
    assert out.token_ids == logits.argmax(-1).tolist()
    lps = torch.log_softmax(logits, -1)
    for b, lp in enumerate(out.logprobs):
        assert lp is not None and lp.logprob == pytest.approx(lps[b].max().item(), abs=1e-6)


# -- seeds ------------------------------------------------------------------------------------------------------

def step_logits(step: int, rows: int, vocab: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1000 + step)) * 3


TARGET = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, presence_penalty=0.3,
                        seed=1234, max_tokens=50)
OTHERS = [SamplingParams(temperature=0), SamplingParams(temperature=1.2), SamplingParams(temperature=0.7, seed=99),
          SamplingParams(min_p=0.1, logprobs=5), SamplingParams(top_p=0.5, frequency_penalty=1.0, seed=5)]


def decode(params: list[SamplingParams], row: int, sampler_seed: int, steps: int = 50) -> list[int]:
    """Decode `steps` steps of a batch; row `row` sees the same logits whatever the batch (step_logits row 0),
    the others see their own. Returns row `row`'s tokens."""
    sampler = Sampler(seed=sampler_seed)
    states = [SequenceState(prompt_ids=[1, 2, 3]) for _ in params]
    vocab = 100
    for step in range(steps):
        logits = step_logits(step + 7 * len(params), len(params), vocab)
        logits[row] = step_logits(step, 1, vocab)[0]
        sampler.sample(logits, params, states)
    return states[row].output_ids


def test_seed_independent_of_batch_and_row():
    alone = decode([TARGET], 0, sampler_seed=0)
    assert len(alone) == 50 and len(set(alone)) > 10
    assert decode(OTHERS[:3] + [TARGET] + OTHERS[3:], 3, sampler_seed=1) == alone
    assert decode([TARGET] + OTHERS[::-1], 0, sampler_seed=2) == alone
    assert decode(OTHERS[1:] + [TARGET], 4, sampler_seed=None) == alone
    # another seed gives another sequence
    other = SamplingParams(**{**TARGET.__dict__, "seed": 4321})
    assert decode([other], 0, sampler_seed=0) != alone


def test_same_seed_same_tokens_within_a_batch():
    logits = torch.randn(1, 64).expand(4, 64).clone()
    params = [SamplingParams(seed=7), SamplingParams(), SamplingParams(seed=7), SamplingParams(seed=8)]
    sampler, states = Sampler(seed=0), [SequenceState() for _ in params]
    for _ in range(20):
        sampler.sample(logits, params, states)
    assert states[0].output_ids == states[2].output_ids
    assert states[0].output_ids != states[3].output_ids


def test_unseeded_requests_follow_the_sampler_seed():
    logits = torch.randn(3, 64)
    params = [SamplingParams()] * 3
    a, b, c = (run(Sampler(seed=s), logits, params).token_ids for s in (5, 5, 6))
    assert a == b and a != c


def test_greedy_ignores_seed():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, -1.0, 2.0, 2.0]])
    for seed in (None, 1, 2):
        states = [SequenceState(), SequenceState()]
        out = run(Sampler(seed=seed), logits, [SamplingParams(temperature=0, seed=seed)] * 2, states)
        assert out.token_ids == [1, 2]  # ties: the lowest id
        assert all(s.generator is None for s in states)  # no noise drawn


def test_seed_change_is_an_error():
    state = SequenceState()
    run(Sampler(), torch.randn(1, 8), [SamplingParams(seed=1)], [state])
    with pytest.raises(ValueError, match="seed"):
        run(Sampler(), torch.randn(1, 8), [SamplingParams(seed=2)], [state])


# -- logprobs ---------------------------------------------------------------------------------------------------

def test_logprobs_after_penalties_and_temperature_before_filters():
    logits = torch.randn(3, 40)
    params = [SamplingParams(temperature=0.7, top_k=1, presence_penalty=1.5, logprobs=5),
              SamplingParams(temperature=1.3, top_p=0.2, logprobs=0),
              SamplingParams(temperature=0.5)]
    states = [SequenceState(output_ids=[int(logits[0].argmax())]), SequenceState(), SequenceState()]
    penalised = logits.clone()
    penalised[0, int(logits[0].argmax())] -= 1.5
    out = run(Sampler(seed=0), logits, params, states)
    assert out.logprobs[2] is None
    lps0 = torch.log_softmax(penalised[0] / 0.7, -1)
    lp0 = out.logprobs[0]
    assert lp0 is not None and lp0.token_id == out.token_ids[0] == int(penalised[0].argmax())  # top_k 1
    assert lp0.logprob == pytest.approx(lps0[lp0.token_id].item(), abs=1e-5)
    top_v, top_i = lps0.topk(5)
    assert [i for i, _ in lp0.top] == top_i.tolist()  # 5 entries although top_k kept 1
    assert [v for _, v in lp0.top] == pytest.approx(top_v.tolist(), abs=1e-5)
    lp1 = out.logprobs[1]
    assert lp1 is not None and lp1.top == [] and lp1.token_id == out.token_ids[1]
    assert lp1.logprob == pytest.approx(torch.log_softmax(logits[1] / 1.3, -1)[lp1.token_id].item(), abs=1e-5)


def test_logprob_ties_list_the_lower_id_first():
    out = run(Sampler(), torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0]]), [SamplingParams(temperature=0, logprobs=4)])
    lp = out.logprobs[0]
    assert lp is not None and [i for i, _ in lp.top] == [1, 3, 2, 4]
    assert lp.logprob == pytest.approx(math.log(math.e**2 / (1 + 2 * math.e**2 + 2 * math.e)), abs=1e-6)


# -- stop / length reporting ------------------------------------------------------------------------------------

def test_stop_and_length():
    sampler = Sampler(eos_id=1)

    def onehot(*ids):
        x = torch.full((len(ids), 6), -1e4)
        x[torch.arange(len(ids)), torch.tensor(ids)] = 0.0
        return x

    params = [SamplingParams(), SamplingParams(stop_token_ids=[4]), SamplingParams(ignore_eos=True),
              SamplingParams(max_tokens=1), SamplingParams(max_tokens=1, stop_token_ids=[3])]
    out = run(sampler, onehot(1, 4, 1, 2, 3), params)
    assert out.token_ids == [1, 4, 1, 2, 3]
    assert out.finish_reasons == ["stop", "stop", None, "length", "stop"]
    assert out.stopped == [True, True, False, False, True]
    assert run(Sampler(), onehot(1), [SamplingParams()]).finish_reasons == [None]  # no eos given
    states = [SequenceState()]
    reasons = [run(sampler, onehot(0), [SamplingParams(max_tokens=3)], states).finish_reasons[0] for _ in range(3)]
    assert reasons == [None, None, "length"]


# -- validation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")),
    ("top_k", -1), ("top_k", 2.0), ("top_k", True),
    ("min_p", -0.01), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("frequency_penalty", 3), ("frequency_penalty", -3),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("seed", 1.5), ("seed", "3"),
    ("max_tokens", 0), ("max_tokens", 1.0),
    ("stop_token_ids", [1, -2]), ("stop_token_ids", "ab"), ("stop_token_ids", 5),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", True),
    ("ignore_eos", 1),
])
def test_validation(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_valid_edges():
    p = SamplingParams(temperature=0, top_p=1, top_k=0, min_p=1, presence_penalty=-2, frequency_penalty=2,
                       repetition_penalty=1e-3, seed=0, max_tokens=1, stop_token_ids=[3, 4], logprobs=20)
    assert p.stop_token_ids == (3, 4) and p.greedy
    assert SamplingParams(logprobs=0).logprobs == 0 and SamplingParams(seed=-5).seed == -5
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]


def test_sample_checks_shapes():
    with pytest.raises(ValueError, match="logits"):
        run(Sampler(), torch.randn(8), [SamplingParams()])
    with pytest.raises(ValueError, match="params"):
        Sampler().sample(torch.randn(2, 8), [SamplingParams()], [SequenceState(), SequenceState()])


# -- performance sanity (not timed): a decode-sized batch at the real vocabulary ---------------------------------

def test_real_vocab_batch():
    vocab, n = 129_280, 32
    kinds = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_p=0.9, top_k=40, seed=3),
             SamplingParams(min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2,
                            logprobs=20)]
    params = [kinds[i % 4] for i in range(n)]
    states = [SequenceState(prompt_ids=list(range(i, i + 500))) for i in range(n)]
    sampler = Sampler(eos_id=1, seed=0)
    for _ in range(3):
        out = sampler.sample(torch.randn(n, vocab, dtype=torch.bfloat16) * 4, params, states)
        assert out.tokens.shape == (n,) and all(0 <= t < vocab for t in out.token_ids)
    assert all(len(s.output_ids) == 3 for s in states)


def test_greedy_tokens_are_argmax_first_maximum_with_ties_and_nans():
    from dsv4.engine.sampling import greedy_tokens

    g = torch.Generator().manual_seed(0)
    # 32,768 and 129,280: whole blocks, searched block-wise (2,048: whole blocks, but too few to pay)
    for vocab in (1, 7, 2_048, 2_048 + 37, 32_768, 129_280):
        logits = torch.randint(-2, 2, (8, vocab), generator=g).float()  # many ties at the top, across blocks
        logits[1] = float("-inf")
        if vocab > 1:
            logits[2, vocab // 2] = float("nan")
            logits[3, [vocab // 3, vocab - 1]] = float("nan")  # the first NaN wins
            logits[4, vocab - 1] = 5.0  # the maximum in the vectorised tail (the last block)
            logits[5, [vocab - 1, vocab // 2 + 1]] = 5.0  # two tied maxima in different blocks: the first wins
            logits[6, 0] = 5.0  # the maximum at id 0
            logits[7, [vocab - 2, vocab // 3]] = float("inf")
        got = greedy_tokens(logits)
        assert torch.equal(got, logits.argmax(dim=-1)), vocab
        top = logits[0].max()
        assert got[0] == (logits[0] == top).nonzero()[0, 0]  # the lowest id among the tied maxima
        assert torch.equal(greedy_tokens(logits[3]), logits[3].argmax())  # one row [V], as speculation asks
        assert torch.equal(greedy_tokens(logits.view(2, 4, vocab)), logits.argmax(dim=-1).view(2, 4))
