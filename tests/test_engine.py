"""The engine: continuous batching with chunked prefill gives each request exactly the tokens it gets alone."""

import asyncio

import pytest
import torch

from dsv4.config import preset
from dsv4.engine import AsyncEngine, Engine, SamplingParams
from dsv4.engine import engine as engine_module
from dsv4.generate import generate
from dsv4.model import Transformer, init_weights


@pytest.fixture(scope="module")
def model():
    # tiny: window 8, ratios 4 / 8, so these prompts wrap the window and cross compression boundaries
    return init_weights(Transformer(preset("tiny")), seed=1)


def prompts(model, sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.args.vocab_size, (n,), generator=gen).tolist() for n in sizes]


def greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n)


def alone(model, prompt, n):
    return generate(model, [prompt], n).tokens[0]


def run(engine, arrivals, max_steps=500):
    """arrivals: {step: [(prompt, params), ...]} added before that step. Returns {rid: tokens}, {rid: reason}."""
    tokens, reasons, step = {}, {}, 0
    while step < max_steps and (engine.has_unfinished() or any(s >= step for s in arrivals)):
        for prompt, params in arrivals.get(step, []):
            tokens[engine.add_request(prompt, params)] = []
        for u in engine.step():
            tokens[u.request_id] += u.new_token_ids
            assert u.generated_tokens == len(tokens[u.request_id])
            if u.finished:
                reasons[u.request_id] = u.finish_reason
        step += 1
    assert not engine.has_unfinished()
    assert engine.num_free_slots == engine.max_batch
    return tokens, reasons


def test_batched_chunked_greedy_equals_alone(model):
    ps = prompts(model, [3, 17, 9, 30, 1, 12])
    ns = [6, 4, 9, 5, 7, 3]
    # 4 slots for 6 requests: the late ones wait for a slot; chunk 5 splits every long prompt
    engine = Engine(model, max_batch=4, max_seq_len=48, prefill_chunk=5)
    arrivals = {0: [(ps[0], greedy(ns[0])), (ps[1], greedy(ns[1]))], 2: [(ps[2], greedy(ns[2]))],
                3: [(ps[3], greedy(ns[3])), (ps[4], greedy(ns[4]))], 7: [(ps[5], greedy(ns[5]))]}
    tokens, reasons = run(engine, arrivals)
    for rid, (p, n) in enumerate(zip(ps, ns, strict=True)):
        assert tokens[rid] == alone(model, p, n), rid
        assert reasons[rid] == "length"


def test_stop_ids_and_eos_finish_and_free_the_slot(model):
    (p,) = prompts(model, [10], seed=5)
    ref = alone(model, p, 8)
    engine = Engine(model, max_batch=2, max_seq_len=32, prefill_chunk=4, eos_id=ref[5])
    stop = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=(ref[2],))
    tokens, reasons = run(engine, {0: [(p, stop), (p, greedy(8)),
                                       (p, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))]})
    assert tokens == {0: ref[:min(ref.index(ref[2]), ref.index(ref[5])) + 1], 1: ref[:ref.index(ref[5]) + 1], 2: ref}
    assert reasons == {0: "stop", 1: "stop", 2: "length"}


def test_seeded_sampling_alone_equals_batched(model):
    ps = prompts(model, [7, 13, 4], seed=2)
    params = [SamplingParams(temperature=0.9, top_k=20, seed=11 + i, max_tokens=6, logprobs=2) for i in range(3)]
    solo = [run(Engine(model, max_batch=1, max_seq_len=32, prefill_chunk=64), {0: [(p, sp)]})[0][0]
            for p, sp in zip(ps, params, strict=True)]
    engine = Engine(model, max_batch=4, max_seq_len=32, prefill_chunk=5, seed=0)
    noise = SamplingParams(temperature=1.0, max_tokens=5)  # unseeded neighbour
    tokens, _ = run(engine, {0: [(ps[0], params[0]), (ps[2], noise)], 1: [(ps[1], params[1])],
                             4: [(ps[2], params[2])]})
    assert [tokens[0], tokens[2], tokens[3]] == solo


def test_logprobs_and_counts_in_updates(model):
    (p,) = prompts(model, [6], seed=3)
    engine = Engine(model, max_batch=2, max_seq_len=32, prefill_chunk=4)
    engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=3, logprobs=2))
    ups = [u for _ in range(6) for u in engine.step()]
    assert [u.generated_tokens for u in ups] == [1, 2, 3]
    assert all(u.prompt_tokens == 6 and len(u.logprobs[0].top) == 2 for u in ups)
    assert [u.logprobs[0].token_id for u in ups] == [t for u in ups for t in u.new_token_ids]
    assert ups[-1].finished and not ups[0].finished


@pytest.mark.parametrize("when", ["prefill", "decode", "waiting"])
def test_abort_frees_the_slot_for_a_correct_new_request(model, when):
    long, short, other = prompts(model, [30, 5, 11], seed=4)
    engine = Engine(model, max_batch=2, max_seq_len=48, prefill_chunk=5)
    keep = engine.add_request(short, greedy(12))  # keeps running throughout
    victim = engine.add_request(long, greedy(8))
    if when == "waiting":
        engine.add_request(other, greedy(1))  # never admitted: no free slot
        victim = engine.add_request(long, greedy(8))
    kept = []
    for _ in range(3 if when == "prefill" else 11):
        kept += [t for u in engine.step() if u.request_id == keep for t in u.new_token_ids]
    slot = engine.slot_of(victim)
    if when == "prefill":
        assert slot is not None and engine.cache.lengths[slot] < len(long)
    elif when == "decode":
        assert slot is not None and engine.cache.lengths[slot] > len(long)
    final = engine.abort(victim)
    assert final.finished and final.finish_reason == "abort" and final.prompt_tokens == 30
    assert engine.abort(victim) is None
    if slot is not None:
        assert engine.slot_of(victim) is None and int(engine.cache.lengths[slot]) == 0
    # all of the victim's pages are back: only the running requests hold pages, as many as their lengths need
    held = [engine.kv.pages_for(int(engine.cache.lengths[s])) for s in range(2) if engine._slots[s] is not None]
    assert engine.stats().pages_used == sum(held) and engine.stats().running == len(held)
    new = engine.add_request(other, greedy(6))
    got = {keep: kept, new: []}
    while engine.has_unfinished():
        for u in engine.step():
            got.setdefault(u.request_id, []).extend(u.new_token_ids)
        if slot is not None and got[new] == []:
            assert engine.slot_of(new) == slot  # the new request reuses the freed row
    assert got[new] == alone(model, other, 6)
    assert got[keep] == alone(model, short, 12)


def test_long_prompt_does_not_stall_decoding(model):
    short, long = prompts(model, [4, 41], seed=6)
    engine = Engine(model, max_batch=2, max_seq_len=64, prefill_chunk=5)
    a = engine.add_request(short, greedy(16))
    ups = engine.step()
    assert [u.request_id for u in ups] == [a]  # prompt of 4 fits one chunk
    b = engine.add_request(long, greedy(3))
    got = {a: list(ups[0].new_token_ids), b: []}
    steps_to_first_b = 0
    while not got[b]:
        ups = engine.step()
        steps_to_first_b += 1
        assert a in [u.request_id for u in ups]  # a decodes every step while b prefills
        assert int(engine.cache.lengths[engine.slot_of(b)]) <= 4 * steps_to_first_b  # chunks of 5 - 1 decode
        for u in ups:
            got[u.request_id] += u.new_token_ids
    assert steps_to_first_b == -(-41 // 4)
    while engine.has_unfinished():
        for u in engine.step():
            got[u.request_id] += u.new_token_ids
    assert got[a] == alone(model, short, 16) and got[b] == alone(model, long, 3)


def test_bad_input(model):
    engine = Engine(model, max_batch=1, max_seq_len=16)
    vocab = model.args.vocab_size
    for prompt, params, match in [([], greedy(1), "at least one"), ([1, vocab], greedy(1), "vocab|ids"),
                                  ([-1], greedy(1), "ids"), ([1, 2.0], greedy(1), "ids"),
                                  ([1] * 10, greedy(7), "max_seq_len"), ([1], {"max_tokens": 1}, "SamplingParams")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request(prompt, params)
    assert not engine.has_unfinished()
    assert engine.add_request([1] * 10, greedy(6)) == 0
    with pytest.raises(ValueError):
        Engine(model, max_batch=0)
    assert engine.abort(123) is None


def test_async_streams_the_same_tokens_and_cancellation_aborts(model):
    ps = prompts(model, [9, 23, 5], seed=7)
    ns = [5, 4, 7]

    async def main():
        engine = Engine(model, max_batch=2, max_seq_len=48, prefill_chunk=5)
        aengine = AsyncEngine(engine)

        async def consume(p, n):
            return [t async for u in aengine.generate(p, greedy(n)) for t in u.new_token_ids]

        streamed = await asyncio.gather(*(consume(p, n) for p, n in zip(ps, ns, strict=True)))

        seen = []

        async def stop_early():
            async for u in aengine.generate(ps[1], greedy(30 - 23 + 10)):
                seen.extend(u.new_token_ids)
                if len(seen) == 2:
                    await asyncio.sleep(3600)  # cancelled here

        task = asyncio.create_task(stop_early())
        while len(seen) < 2:
            await asyncio.sleep(0)
        assert engine.has_unfinished()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not engine.has_unfinished() and engine.num_free_slots == 2

        async with aengine.generate(ps[0], greedy(20)) as stream:  # leaving early aborts too
            async for _ in stream:
                break
        assert not engine.has_unfinished()

        stream = aengine.generate(ps[2], greedy(20))  # an outside abort ends the stream
        first = await stream.__anext__()
        aengine.abort(stream.request_id)
        rest = [u async for u in stream]
        assert not first.finished and [u.finish_reason for u in rest][-1:] == ["abort"]
        assert not engine.has_unfinished()

        with pytest.raises(ValueError):
            aengine.generate([], greedy(1))
        await aengine.close()
        return streamed

    streamed = asyncio.run(main())
    assert streamed == [alone(model, p, n) for p, n in zip(ps, ns, strict=True)]


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_any_chunk_size_equals_one_shot(model, chunk):
    ps = prompts(model, [29, 6], seed=8)
    engine = Engine(model, max_batch=2, max_seq_len=48, prefill_chunk=chunk, page_tokens=8)
    tokens, _ = run(engine, {0: [(ps[0], greedy(5)), (ps[1], greedy(5))]})
    assert tokens == {0: alone(model, ps[0], 5), 1: alone(model, ps[1], 5)}


def test_preemption_by_recompute_loses_nothing(model):
    """A pool too small for everyone: the newest running requests are preempted and recompute later, and every
    request still gets exactly its tokens alone (greedy and seeded sampling)."""
    ps = prompts(model, [20, 14, 25, 9], seed=9)
    params = [greedy(20), SamplingParams(temperature=0.8, seed=3, max_tokens=18), greedy(12),
              SamplingParams(temperature=1.0, top_p=0.9, seed=4, max_tokens=16)]
    solo = [run(Engine(model, max_batch=1, max_seq_len=48, prefill_chunk=64), {0: [(p, sp)]})[0][0]
            for p, sp in zip(ps, params, strict=True)]
    engine = Engine(model, max_batch=4, max_seq_len=48, prefill_chunk=16, page_tokens=8, num_pages=9)
    tokens, reasons = run(engine, {0: [(p, sp) for p, sp in zip(ps, params, strict=True)]})
    assert engine.stats().preemptions > 0
    assert [tokens[i] for i in range(4)] == solo
    assert engine.stats().pages_used == 0


def test_admission_waits_for_memory_first_come_first_served(model):
    ps = prompts(model, [30, 30, 4], seed=10)
    engine = Engine(model, max_batch=3, max_seq_len=48, prefill_chunk=64, page_tokens=8, num_pages=5)
    ids = [engine.add_request(p, greedy(2)) for p in ps]
    engine.step()
    assert engine.slot_of(ids[0]) is not None
    assert engine.slot_of(ids[1]) is None and engine.slot_of(ids[2]) is None  # the short one does not overtake
    with pytest.raises(ValueError, match="pages"):
        engine.add_request(ps[0], greedy(17))  # 47 tokens need 6 pages, the pool has 5


def test_prefix_cache_resumes_exactly_and_reports_cached_tokens(model):
    system, question, follow = prompts(model, [21, 6, 5], seed=11)
    engine = Engine(model, max_batch=2, max_seq_len=96, prefill_chunk=7, page_tokens=8,
                    prefix_cache_bytes=1 << 22, prefix_interval=8)
    first = system + question
    out, _ = run(engine, {0: [(first, greedy(6))]})
    # the same prompt again: every prompt token from the cache, sampled from the saved logits
    # a longer prompt on the same system prompt: resumes from the interval save at 16 tokens
    # the next turn (prompt + answer + more): resumes from the end-of-output save
    second = first + out[0] + follow
    cases = [(first, 6, len(first)), (system + follow, 4, 16), (second, 5, len(first) + 5)]
    for prompt, n, cached in cases:
        engine_out = []
        rid = engine.add_request(prompt, greedy(n))
        while engine.has_unfinished():
            for u in engine.step():
                assert u.request_id == rid and u.cached_tokens == cached
                engine_out += u.new_token_ids
        assert engine_out == alone(model, prompt, n)
    stats = engine.stats()
    assert stats.prefix_hits == 3 and stats.prefix_hit_tokens == sum(c for _, _, c in cases)
    assert 0 < stats.prefix_bytes <= 1 << 22


def test_greedy_rows_take_the_heads_greedy_token_and_the_rest_their_logits(model, monkeypatch):
    """A request whose next token is all its logits are for (greedy; no penalties, grammar or logprobs; no prefix
    save due) gets it from `Transformer.greedy_tokens`, which a backend may answer without computing every logit;
    the others, in the same batch, from the sampler: the same tokens and logprobs as when every row computes its
    logits. A finishing greedy request's logits still reach the prefix cache: a prompt of its whole tokens
    samples its last token from them."""
    ps = prompts(model, [9, 14, 5, 11], seed=7)
    params = [greedy(6), SamplingParams(temperature=0.0, max_tokens=6, logprobs=2),
              SamplingParams(temperature=0.8, seed=3, max_tokens=6), SamplingParams(temperature=0.0, max_tokens=6,
                                                                                   presence_penalty=0.5)]
    greedy_tokens = type(model).greedy_tokens

    def once(screen):
        rows = []
        monkeypatch.setattr(type(model), "greedy_tokens", lambda m, x: rows.append(x.shape[0]) or greedy_tokens(m, x))
        if not screen:
            monkeypatch.setattr(Engine, "_greedy_now", lambda self, req: False)
        engine = Engine(model, max_batch=4, max_seq_len=48, prefill_chunk=5, prefix_cache_bytes=1 << 22)
        out = {engine.add_request(p, sp): [] for p, sp in zip(ps, params, strict=True)}
        while engine.has_unfinished():
            for u in engine.step():
                out[u.request_id] += [(t, lp) for t, lp in zip(u.new_token_ids, u.logprobs, strict=True)]
        tokens = [t for t, _ in out[0]]
        whole = engine.add_request(ps[0] + tokens[:-1], greedy(1))  # the end-of-output save, logits included
        (update,) = engine.step()
        assert update.request_id == whole and update.cached_tokens == len(ps[0]) + 5
        assert update.new_token_ids == tokens[-1:]
        monkeypatch.undo()
        return out, rows

    screened, rows = once(True)
    logits = once(False)[0]
    # the same tokens; logprobs within fp32 rounding (a GEMM of other rows may round its last bits otherwise)
    assert {i: [t for t, _ in out] for i, out in screened.items()} == {i: [t for t, _ in out] for i, out in
                                                                       logits.items()}
    for (_, lp), (_, want) in zip(screened[1], logits[1], strict=True):
        assert [i for i, _ in lp.top] == [i for i, _ in want.top]
        assert lp.logprob == pytest.approx(want.logprob, abs=1e-5)
    assert [t for t, _ in screened[0]] == alone(model, ps[0], 6)
    # only request 0, once a step after its first token (the prompt's end, which the prefix cache saves)
    assert sum(rows) == 5 and set(rows) == {1}
    assert all(lp is not None for _, lp in screened[1])


def test_prefix_cache_stays_in_budget_and_gives_pages_back(model):
    ps = prompts(model, [40, 40, 40], seed=12)
    engine = Engine(model, max_batch=1, max_seq_len=48, prefill_chunk=64, page_tokens=8, num_pages=6,
                    prefix_cache_bytes=1 << 22)
    for p in ps:  # each request needs 5 of the 6 pages: the previous prefixes must be evicted to admit it
        tokens, _ = run(engine, {0: [(p, greedy(3))]})
        assert tokens[max(tokens)] == alone(model, p, 3)
    stats = engine.stats()
    assert stats.prefix_entries >= 1 and stats.pages_used <= 6
    engine.prefix.clear()
    assert engine.stats().pages_used == 0


def test_fp8_kv_format_gives_the_same_tokens_as_bf16_rows():
    exact = init_weights(Transformer(preset("tiny"), dtype=torch.bfloat16, numerics="exact"), seed=2)
    ps = prompts(exact, [26, 11], seed=13)
    outs = []
    for kv_format in ("model", "fp8"):
        engine = Engine(exact, max_batch=2, max_seq_len=48, prefill_chunk=8, kv_format=kv_format)
        outs.append(run(engine, {0: [(ps[0], greedy(8)), (ps[1], greedy(8))]})[0])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_engine_greedy_equals_alone(model, k, monkeypatch):
    """MTP drafting + one verify forward per step inside continuous batching, with chunked prefill, late joiners,
    a prefix-cache resume and preemption: every request still gets exactly its plain greedy tokens. Random MTP
    weights never guess right, so the drafter is overridden to propose the true next token 3 times in 4 (each
    step then accepts some drafts and rejects the rest, across window wrap-around and compression boundaries)."""
    ps = prompts(model, [19, 5, 33, 12], seed=14)
    ps.append(ps[2][:17] + ps[1])  # shares 16 tokens with an earlier prompt (interval save)
    ns = [14, 9, 11, 16, 10]
    refs = {tuple(p): alone(model, p, n) for p, n in zip(ps, ns, strict=True)}
    real = engine_module.draft_tokens

    def oracle(sampler, logits, params, states, drafted):
        toks, q = real(sampler, logits, params, states, drafted)
        for i, state in enumerate(states):
            pos = len(state.output_ids) + len(drafted[i])
            ref = refs[tuple(state.prompt_ids)]
            if pos < len(ref) and pos % 4 != 3:
                toks[i] = ref[pos]
                if q is not None:
                    q[i] = torch.nn.functional.one_hot(toks[i], q.shape[-1]).float()
        return toks, q

    monkeypatch.setattr(engine_module, "draft_tokens", oracle)
    engine = Engine(model, max_batch=3, max_seq_len=64, prefill_chunk=9, page_tokens=8, num_pages=8,
                    prefix_cache_bytes=1 << 22, prefix_interval=8, num_speculative=k)
    arrivals = {0: [(ps[0], greedy(ns[0])), (ps[1], greedy(ns[1]))], 2: [(ps[2], greedy(ns[2]))],
                5: [(ps[3], greedy(ns[3]))], 9: [(ps[4], greedy(ns[4]))]}
    tokens, _ = run(engine, arrivals)
    for rid, p in enumerate(ps):
        assert tokens[rid] == refs[tuple(p)], rid
    stats = engine.stats()
    assert 0 < stats.accepted < stats.drafted
    assert stats.prefix_hits >= 1 and stats.preemptions >= 1


def test_speculation_with_a_one_token_prompt(model):
    """A one-token prompt has no final streams to draft from at its first step: it decodes plainly once, then
    speculates (this used to crash the step, and with it every running request)."""
    ps = [[7], prompts(model, [12], seed=3)[0]]
    engine = Engine(model, max_batch=2, max_seq_len=48, num_speculative=1)
    tokens, _ = run(engine, {0: [(p, greedy(8)) for p in ps]})
    assert [tokens[0], tokens[1]] == [alone(model, p, 8) for p in ps]
    assert engine.stats().drafted > 0


def test_a_verify_step_saves_the_mtp_rings_only_when_its_drafting_calls_the_mtp_block(model, monkeypatch):
    """At one draft a verify step drafts from the MTP call of the step before (its catch-up), so the MTP blocks
    append nothing before the rollback and the snapshot leaves their rings alone; only a request's first draft
    (no such call yet) needs them saved. The tokens stay plain greedy's."""
    prompt = prompts(model, [12], seed=4)[0]
    engine = Engine(model, max_batch=1, max_seq_len=48, num_speculative=1)
    flags, snapshot = [], engine.cache.snapshot
    monkeypatch.setattr(engine.cache, "snapshot",
                        lambda n, kept=0, mtp=True: flags.append(mtp) or snapshot(n, kept, mtp))
    tokens, _ = run(engine, {0: [(prompt, greedy(10))]})
    assert tokens[0] == alone(model, prompt, 10)
    assert flags[0] and len(flags) > 2 and not any(flags[1:])


def test_speculative_sampling_is_seeded_and_counts_acceptance(model):
    ps = prompts(model, [11, 7], seed=15)
    params = [SamplingParams(temperature=0.8, top_k=30, seed=5 + i, max_tokens=12, logprobs=1) for i in range(2)]

    def once(batch):
        engine = Engine(model, max_batch=batch, max_seq_len=48, prefill_chunk=16, num_speculative=2)
        out = run(engine, {0: [(p, sp) for p, sp in zip(ps, params, strict=True)]})[0]
        return out, engine.stats()

    (a, stats), (b, _) = once(2), once(1)
    assert a == b  # per-request seeds: the same tokens whatever the batch
    assert all(len(t) == 12 for t in a.values())
    assert stats.drafted > 0 and stats.accepted <= stats.drafted
