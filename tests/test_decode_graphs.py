"""The static decode step a CUDA graph captures (`Transformer.static_decode_streams`) and the engine's decode graphs
(`dsv4.engine.graphs`), on the CPU: the step equals the decode forward; it runs the same ops on the same buffers at
any positions of its bucket, reading nothing on the host (what a capture needs: `tests/op_trace.py`); and an engine
whose decode steps go through the graphs' buffers, buckets and spare slot gives the eager engine's tokens. The
capture itself needs a GPU (`benchmarks/bench_gpu.py`'s `graphs` section)."""

from __future__ import annotations

import pytest
import torch
from host_reads import count_host_reads
from op_trace import first_difference, record_ops

from dsv4 import kernels
from dsv4.config import preset
from dsv4.engine import Engine, SamplingParams
from dsv4.engine.graphs import batch_buckets, capacity_buckets
from dsv4.engine.kv_cache import KVCacheManager
from dsv4.formats import to_official_formats
from dsv4.model import Transformer, init_weights

TINY = preset("tiny")  # ratios 0, 4, 8, 4, 8 (window, CSA, HCA, CSA, HCA), window 8, index top-k 3


def _model(numerics: str, max_seq_len: int = 128) -> Transformer:
    args = TINY.replace(max_seq_len=max_seq_len)
    if numerics == "plain":
        return init_weights(Transformer(args, torch.float32, "plain"), seed=0).eval()
    return to_official_formats(init_weights(Transformer(args, torch.bfloat16, "exact"), seed=0)).eval()


def _prefilled(model: Transformer, prompts: list[int], cache=None):
    """A cache whose row i holds a random prompt of prompts[i] tokens."""
    cache = cache or model.new_cache(len(prompts), 128)
    for i, n in enumerate(prompts):
        tokens = torch.randint(0, model.args.vocab_size, (1, n), generator=torch.Generator().manual_seed(i))
        model.forward_streams(tokens, cache.select(torch.tensor([i])))
    return cache


@pytest.mark.parametrize(("backend", "numerics"), [("reference", "plain"), ("reference", "exact"), ("native", "plain"),
                                                   ("native", "exact"), ("triton", "exact")])
def test_static_decode_steps_equal_the_decode_forward(backend, numerics):
    """Rows at positions 17, 30 and 9, eight steps: across CSA (every 4th position) and HCA (every 8th) entry
    completions, with more entries read than the rows hold (capacity 64) and, for the rows past index top-k
    entries, more top-k slots than entries. The whole cache and a view of some of its rows (what the engine runs
    on) alike. The streams are the decode forward's bit for bit, except where the reference's attention or indexer
    scores run in fp32 (plain numerics on the reference backend, or on the Triton backend's fallback for a view of
    rows, whose window is paged): their GEMMs sum over the slots or take the entries they are given in a blocking
    that depends on how many, so those agree to fp32 rounding."""
    model = _model(numerics)
    steps = 4 if backend == "triton" else 8  # (Triton's interpreter: seconds a step)
    with torch.inference_mode(), kernels.use_backend(backend):
        eager, static = _prefilled(model, [17, 30, 9]), _prefilled(model, [17, 30, 9])
        rows = torch.tensor([2, 0])
        g = torch.Generator().manual_seed(5)
        bits = True
        for step in range(steps):
            whole = step % 2 == 0
            tokens = torch.randint(0, model.args.vocab_size, (3 if whole else 2, 1), generator=g)
            expected = model.forward_streams(tokens, eager if whole else eager.select(rows))
            got = model.static_decode_streams(tokens, static if whole else static.select(rows), 64)
            # (a step that differs in its last bits writes the cache so: the later ones differ too)
            bits &= numerics == "exact" or backend == "native"
            if bits:
                assert torch.equal(got, expected), (step, (got - expected).abs().max())
            else:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(static.lengths, eager.lengths)
        assert static.lengths.tolist() == [17 + steps, 30 + steps // 2, 9 + steps]


def test_a_static_decode_step_runs_the_same_ops_at_any_positions_in_its_bucket():
    """What a CUDA graph replays: the static step's op sequence, shapes, scalars and outside buffers are the same
    at other positions (here across CSA and HCA entry completions, in paged FP8 storage, through the Triton
    backend's device-scheduled experts), for other tokens and other cache slots fed through the same buffers; it
    reads nothing on the host and takes no host data in. The decode forward at the same positions does change its
    ops (the check can fail)."""
    model = _model("exact")
    kv = KVCacheManager(model, 4, 128, "fp8", spare=True)
    for slot in range(4):
        kv.ensure(slot, 128)
    with torch.inference_mode(), kernels.use_backend("triton"):
        _prefilled(model, [17, 30, 9, 40], kv.cache)
        slots, tokens = torch.tensor([0, 1]), torch.zeros(2, 1, dtype=torch.long)
        recorded, eager = [], []
        for step, (fed_slots, fed_tokens) in enumerate((([0, 1], [5, 6]), ([0, 1], [7, 8]), ([2, 3], [9, 10]))):
            slots.copy_(torch.tensor(fed_slots))
            tokens.copy_(torch.tensor(fed_tokens).view(2, 1))
            with count_host_reads() as reads, record_ops() as ops:
                model.static_decode_streams(tokens, kv.cache.select(slots), 64)
            assert not reads, reads
            recorded.append(ops)
            if step < 2:  # positions 18 / 31 (row 1 finishes CSA and HCA entries), then 19 / 32
                with record_ops() as ops:
                    model.forward_streams(tokens, kv.cache.select(slots))
                eager.append(ops)
        assert kv.cache.lengths.tolist()[:4] == [21, 34, 10, 41]
    assert len(recorded[0]) > 1000
    assert first_difference(recorded[0], recorded[1]) is None, first_difference(recorded[0], recorded[1])
    assert first_difference(recorded[0], recorded[2]) is None, first_difference(recorded[0], recorded[2])
    assert not [op for op in recorded[0] if "lift_fresh" in op[0]]  # no `torch.tensor(host data)` inside
    assert first_difference(eager[0], eager[1]) is not None


def test_the_static_step_refuses_what_it_cannot_run():
    model = _model("plain")
    cache = model.new_cache(2, 64)
    tokens = torch.zeros(2, 1, dtype=torch.long)
    with torch.inference_mode():
        for capacity in (0, 60, 72, 128):  # not a multiple of 8 (the HCA ratio), past the cache's 64 tokens
            with pytest.raises(ValueError, match="multiple of every compression ratio"):
                model.static_decode_streams(tokens, cache, capacity)
        with pytest.raises(ValueError, match=r"tokens \[2, 1\]"):
            model.static_decode_streams(torch.zeros(2, 2, dtype=torch.long), cache, 64)
        with pytest.raises(ValueError, match=r"tokens \[2, 1\]"):
            model.static_decode_streams(torch.zeros(1, 1, dtype=torch.long), cache, 64)
        assert cache.lengths.tolist() == [0, 0]


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert capacity_buckets(64, 300) == [64, 128, 256]
    assert capacity_buckets(64, 1000) == [64, 128, 256, 512, 960]
    assert capacity_buckets(128, 100) == []


def _generate(model: Transformer, graphs: bool, backend: str, prompts, max_tokens, **engine_args):
    """Greedy tokens by request id of an engine over prompts of the given lengths (token i * 7 + j of prompt i; a
    negative length -i repeats prompt i)."""
    engine = Engine(model, kernel_backend=backend, decode_graphs=graphs, **engine_args)
    for i, n in enumerate(prompts):
        source, n = (-n, prompts[-n]) if n < 0 else (i, n)
        engine.add_request([(7 * source + j) % model.args.vocab_size for j in range(n)],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens[i], ignore_eos=True))
    out: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for update in engine.step():
            out.setdefault(update.request_id, []).extend(update.new_token_ids)
    return out, engine


@pytest.mark.parametrize("kv_format", ["model", "fp8"])
def test_an_engine_with_decode_graphs_gives_the_eager_engines_tokens(kv_format):
    """Seven requests over four slots (slots reused; batches of 1 to 4 rows, 3 padded to 4 on the spare slot),
    a one-token prompt (its first step at position 0 runs eagerly), a 64-token prompt whose first decode writes its
    unfinished entry at the start of a page the eager engine would not have allocated yet, a prompt repeated after
    its first run saved it in the prefix cache (resumed from its saved partial page), contexts past the first
    capacity bucket. Greedy tokens equal the eager engine's, and the graphs of several buckets ran."""
    model = _model("exact", max_seq_len=512)
    prompts, max_tokens = (5, 64, 1, 30, 12, 9, -3), (70, 20, 12, 25, 40, 33, 15)
    common = dict(max_batch=4, max_seq_len=200, prefill_chunk=32, kv_format=kv_format, prefix_cache_bytes=1 << 22)
    eager, eager_engine = _generate(model, False, "reference", prompts, max_tokens, **common)
    graphed, engine = _generate(model, True, "reference", prompts, max_tokens, **common)
    assert [len(eager[i]) for i in range(7)] == list(max_tokens)
    assert eager[6] == eager[3][:15] and eager_engine.stats().prefix_hits >= 1 and engine.stats().prefix_hits >= 1
    assert graphed == eager
    assert {b for b, _ in engine.graphs.graphs} == {1, 2, 4} and {c for _, c in engine.graphs.graphs} == {64, 128}
    assert engine.graphs.padded > 0


def test_decode_graphs_through_the_triton_backend():
    """The same through the Triton backend's kernels (the one a capture on CUDA runs), under its interpreter; the
    fp8 rows written and read by its row kernels (a window ring read back just after its token is written) give
    the tokens of rows kept in the model's dtype (the exact numerics' rows round-trip)."""
    model = _model("exact", max_seq_len=128)
    common = dict(max_batch=2, max_seq_len=80, prefill_chunk=32)
    eager, _ = _generate(model, False, "triton", (6, 17), (5, 4), kv_format="fp8", **common)
    graphed, engine = _generate(model, True, "triton", (6, 17), (5, 4), kv_format="fp8", **common)
    model_rows, _ = _generate(model, True, "triton", (6, 17), (5, 4), kv_format="model", **common)
    assert graphed == eager == model_rows and len(eager[0]) == 5
    assert set(engine.graphs.graphs) == {(1, 64), (2, 64)}


def test_a_failed_capture_turns_the_graphs_off_and_the_engine_goes_on(monkeypatch, caplog):
    """A capture that fails after its warm-up step ran (here a stand-in for CUDA's capture that raises as torch
    does): that step's result stands, a warning says why, and every later decode step runs eagerly; the tokens are
    the eager engine's (no step lost or run twice)."""
    from dsv4.engine import graphs

    class FailingCapture:
        def __init__(self, step, pool):
            raise graphs.CaptureError("RuntimeError: operation not permitted when stream is capturing", step())

    model = _model("exact")
    common = dict(max_batch=2, max_seq_len=100, prefill_chunk=32)
    eager, _ = _generate(model, False, "reference", (6, 17), (9, 7), **common)
    monkeypatch.setattr(graphs, "_Captured", FailingCapture)
    engine = Engine(model, kernel_backend="reference", decode_graphs=True, **common)
    engine.graphs.capture = True  # (as on CUDA)
    for i, n in enumerate((6, 17)):
        engine.add_request([(7 * i + j) % model.args.vocab_size for j in range(n)],
                           SamplingParams(temperature=0.0, max_tokens=(9, 7)[i], ignore_eos=True))
    out: dict[int, list[int]] = {}
    with caplog.at_level("WARNING", logger="dsv4.engine.graphs"):
        while engine.has_unfinished():
            for update in engine.step():
                out.setdefault(update.request_id, []).extend(update.new_token_ids)
    assert out == eager
    assert engine.graphs.failure.startswith("batch 2, capacity 64: RuntimeError: operation not permitted")
    assert engine.graphs.steps == 1 and not engine.graphs.graphs
    assert "decode graphs off: a capture failed" in caplog.text


def test_the_spare_slot_is_outside_the_pool_and_the_budget():
    model = _model("plain")
    plain = KVCacheManager(model, 2, 128)
    spared = KVCacheManager(model, 2, 128, spare=True)
    assert spared.spare_slot == 2 and plain.spare_slot is None
    assert spared.num_pages == plain.num_pages and spared.total_bytes == plain.total_bytes
    assert spared.cache.batch_size == 3
    scratch = plain.num_pages  # the page past the pool's
    assert spared.storage.table[2].tolist() == [scratch] * spared.storage.table.shape[1]
    for slot in range(2):
        spared.ensure(slot, 128)
    assert scratch not in {p for pages in spared.slot_pages for p in pages}


def test_what_a_capture_needs_is_said_before_one_is_tried():
    """On CUDA the engine refuses decode graphs that could not be captured: experts routed by reading the device
    (the reference backend's; a training recipe's forwards, which run expert by expert), naming the layer."""
    from dsv4.engine.graphs import uncapturable
    from dsv4.kernels.reference import ReferenceBackend
    from dsv4.kernels.triton import TritonBackend
    from dsv4.train import apply_precision

    recipe = _model("plain")
    apply_precision(recipe, "fp8")
    with torch.inference_mode():
        assert uncapturable(_model("exact"), TritonBackend()) is None
        assert uncapturable(_model("plain"), TritonBackend()) is None  # float experts, grouped on the device
        for model, backend in ((_model("exact"), ReferenceBackend()), (recipe, TritonBackend())):
            reason = uncapturable(model, backend)
            assert reason.startswith("layer 0's routed experts are not scheduled on the device by the"), reason


def test_decode_graphs_refuse_speculation():
    model = _model("plain")
    with pytest.raises(ValueError, match="num_speculative"):
        Engine(model, max_batch=2, num_speculative=1, decode_graphs=True)
