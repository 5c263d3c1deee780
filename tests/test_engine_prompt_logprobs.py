"""Prompt logprobs in the engine (vLLM's `prompt_logprobs`, what harnesses score texts with): each prompt token's
logprob given its prefix equals `log_softmax` of the full forward's logits, however the prompt is chunked or
batched; such requests bypass the prefix cache; `max_tokens = 0` finishes right after the prefill."""

import pytest
import torch

from dsv4.config import preset
from dsv4.engine import Engine, SamplingParams
from dsv4.generate import generate
from dsv4.model import Transformer, init_weights


@pytest.fixture(scope="module")
def model():
    # plain fp32 tiny: window 8, ratios 4 / 8, so a 29-token prompt wraps the window and crosses compression blocks
    return init_weights(Transformer(preset("tiny")), seed=1)


def prompts(model, sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.args.vocab_size, (n,), generator=gen).tolist() for n in sizes]


def scoring(k=2, max_tokens=0):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=k)


@torch.inference_mode()
def reference(model, prompt):
    """log_softmax of the full (training) forward: row p scores token p + 1. [len(prompt), vocab]"""
    return model(torch.tensor([prompt])).log_softmax(-1)[0]


def run(engine, requests):
    """Add (prompt, params) pairs, step to the end; {rid: [updates]}."""
    ids = [engine.add_request(p, sp) for p, sp in requests]
    updates = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for u in engine.step():
            updates[u.request_id].append(u)
    assert engine.num_free_slots == engine.max_batch
    return [updates[rid] for rid in ids]


def values(update):
    """The prompt logprobs of an update as (token ids, logprobs [P - 1], top ids, top logprobs)."""
    lps = update.prompt_logprobs
    return ([lp.token_id for lp in lps], torch.tensor([lp.logprob for lp in lps[1:]]),
            [[t for t, _ in lp.top] for lp in lps[1:]], torch.tensor([[v for _, v in lp.top] for lp in lps[1:]]))


def check_against_full_forward(model, prompt, update, k, exact):
    ids, lps, top_ids, top_lps = values(update)
    ref = reference(model, prompt)[:-1]  # the last position predicts the first output token, not a prompt token
    assert ids == prompt and update.prompt_logprobs[0].logprob is None and update.prompt_logprobs[0].top == []
    want = ref.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    ref_sorted = torch.sort(ref, dim=-1, descending=True, stable=True)
    if exact:
        assert torch.equal(lps, want) and torch.equal(top_lps, ref_sorted.values[:, :k])
        assert top_ids == ref_sorted.indices[:, :k].tolist()
    else:
        torch.testing.assert_close(lps, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(top_lps, ref_sorted.values[:, :k], rtol=1e-6, atol=1e-6)
        # the same alternatives wherever they are not near-ties
        gaps = ref_sorted.values[:, :k] - ref_sorted.values[:, 1:k + 1]
        assert all(a == b or g < 1e-4 for row_a, row_b, row_g in zip(top_ids, ref_sorted.indices[:, :k].tolist(),
                                                                      gaps.tolist(), strict=True)
                   for a, b, g in zip(row_a, row_b, row_g, strict=True))


def test_one_shot_prefill_equals_the_full_forward_exactly(model):
    (p,) = prompts(model, [29])
    (ups,) = run(Engine(model, max_batch=1, max_seq_len=48, prefill_chunk=64), [(p, scoring(k=3))])
    assert len(ups) == 1 and len(ups[0].prompt_logprobs) == 29
    check_against_full_forward(model, p, ups[0], 3, exact=True)


@pytest.mark.parametrize("chunk", [1, 3, 8, 13])
def test_chunked_prefill_gives_the_same_values(model, chunk):
    (p,) = prompts(model, [29])
    (ups,) = run(Engine(model, max_batch=1, max_seq_len=48, prefill_chunk=chunk, page_tokens=8), [(p, scoring())])
    check_against_full_forward(model, p, ups[0], 2, exact=False)


def test_batched_with_other_requests_gives_the_same_values(model):
    """Three scoring requests (one also generating) among plain decodes, chunks cut by the shared budget."""
    a, b, c, d = prompts(model, [29, 17, 6, 23], seed=1)
    engine = Engine(model, max_batch=4, max_seq_len=48, prefill_chunk=7, page_tokens=8)
    reqs = [(c, SamplingParams(temperature=0.0, max_tokens=9)), (a, scoring()), (d, scoring(k=0, max_tokens=5)),
            (b, scoring(k=4))]
    plain, ua, ud, ub = run(engine, reqs)
    for prompt, ups, k in ((a, ua, 2), (d, ud, 0), (b, ub, 4)):
        check_against_full_forward(model, prompt, ups[0], k, exact=False)
    assert [t for u in plain for t in u.new_token_ids] == generate(model, [c], 9).tokens[0]
    # a scoring request that also generates: the same tokens as without scoring, prompt logprobs only at first
    assert [t for u in ud for t in u.new_token_ids] == generate(model, [d], 5).tokens[0]
    assert ud[0].prompt_logprobs is not None and all(u.prompt_logprobs is None for u in ud[1:])
    assert all(u.prompt_logprobs is None for u in plain)


def test_max_tokens_zero_finishes_after_the_prefill(model):
    (p,) = prompts(model, [20], seed=2)
    engine = Engine(model, max_batch=2, max_seq_len=48, prefill_chunk=8, page_tokens=8)
    rid = engine.add_request(p, scoring())
    steps = []
    while engine.has_unfinished():
        steps.append(engine.step())
    assert [len(s) for s in steps] == [0, 0, 1]  # 8 + 8 + 4 prompt tokens, then done
    (u,) = steps[-1]
    assert (u.request_id, u.finished, u.finish_reason, u.new_token_ids, u.generated_tokens) == (rid, True, "length",
                                                                                                 [], 0)
    assert u.prompt_tokens == 20 and len(u.prompt_logprobs) == 20
    assert engine.stats().pages_used == 0 and engine.stats().running == 0


def test_max_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    for bad in (-1, 21, 1.0, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0


def test_the_prefix_cache_is_bypassed_but_still_fed(model):
    """A saved prompt does not satisfy a scoring request (its logits are not saved), but the scoring request saves
    its prompt for the next plain one."""
    p, q = prompts(model, [21, 19], seed=3)
    engine = Engine(model, max_batch=2, max_seq_len=48, prefill_chunk=64, page_tokens=8, prefix_cache_bytes=1 << 22)
    run(engine, [(p, SamplingParams(temperature=0.0, max_tokens=2))])  # saves p
    lookups = engine.stats().prefix_lookups
    (ups,) = run(engine, [(p, scoring())])
    assert ups[0].cached_tokens == 0 and engine.stats().prefix_lookups == lookups  # not even looked up
    check_against_full_forward(model, p, ups[0], 2, exact=True)
    (ups,) = run(engine, [(q, scoring())])  # saves q at the end of its prompt
    (plain,) = run(engine, [(q, SamplingParams(temperature=0.0, max_tokens=3))])
    assert plain[0].cached_tokens == len(q)
    assert [t for u in plain for t in u.new_token_ids] == generate(model, [q], 3).tokens[0]


def test_preemption_mid_prefill_keeps_every_prompt_logprob(model):
    """A pool too small for both: the scoring request is preempted part way through its prompt, recomputes it
    later, and still reports each prompt token once, with the full forward's values."""
    long, other = prompts(model, [33, 30], seed=4)
    engine = Engine(model, max_batch=2, max_seq_len=48, prefill_chunk=6, page_tokens=8, num_pages=6)
    plain, ups = run(engine, [(other, SamplingParams(temperature=0.0, max_tokens=12)), (long, scoring())])
    assert engine.stats().preemptions > 0
    assert len(ups) == 1 and len(ups[0].prompt_logprobs) == 33
    check_against_full_forward(model, long, ups[0], 2, exact=False)


def test_speculative_engine_generates_nothing_for_max_tokens_zero(model):
    """With MTP the last prompt token alone is scheduled like a decode; a prompt-only request must not verify
    drafts there (that would emit tokens)."""
    (p,) = prompts(model, [10], seed=5)
    engine = Engine(model, max_batch=2, max_seq_len=48, prefill_chunk=9, num_speculative=1)
    (ups,) = run(engine, [(p, scoring())])
    assert [(u.new_token_ids, u.finish_reason) for u in ups] == [([], "length")]
    check_against_full_forward(model, p, ups[0], 2, exact=False)
