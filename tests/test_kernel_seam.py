"""The kernel seam: every op the model, the QAT simulation and the KV codecs use goes through `dsv4.kernels`, on
the backend chosen by name (engine / CLI option, environment variable), and attention reads paged KV in place."""

from __future__ import annotations

import threading

import pytest
import torch
from counting_backend import CountingBackend

from dsv4 import kernels
from dsv4.config import preset
from dsv4.engine import Engine, SamplingParams
from dsv4.formats import to_official_formats
from dsv4.kernels.paged import PagedRows
from dsv4.kernels.reference import ReferenceBackend
from dsv4.model import Transformer, init_weights
from dsv4.model.layers import Linear
from dsv4.quant import quantize_fp8_weight
from dsv4.train.precision import apply_precision


@pytest.fixture(scope="module", autouse=True)
def counting():
    kernels.register_backend("counting", "counting_backend:CountingBackend")  # the one registration line
    yield kernels.get_backend("counting")


def tiny(dtype=torch.float32, numerics="plain", seed=0):
    model = init_weights(Transformer(preset("tiny"), dtype, numerics), seed=seed)
    return to_official_formats(model).eval() if numerics == "exact" else model.eval()


def tokens(n=2, s=21, seed=0):
    return torch.randint(0, 256, (n, s), generator=torch.Generator().manual_seed(seed))


def count_linear_forwards(model: torch.nn.Module) -> list[int]:
    """A counter of every Linear module call (of whatever forward is installed on it)."""
    seen = [0]
    for m in model.modules():
        if isinstance(m, Linear):
            m.register_forward_hook(lambda *_: seen.__setitem__(0, seen[0] + 1))
    return seen


# ---------------------------------------------------------------------------------------------- registry


def test_backends_are_chosen_by_name_and_unknown_names_are_refused(counting):
    assert {"reference", "counting"} <= set(kernels.backend_names())
    assert isinstance(kernels.get_backend("counting"), CountingBackend)
    assert kernels.get_backend("counting") is counting  # built once
    with pytest.raises(kernels.UnknownBackendError, match="unknown kernel backend 'nope'; available: .*reference"):
        kernels.get_backend("nope")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        Engine(tiny(), max_batch=1, max_seq_len=32, kernel_backend="nope")

    class Partial:
        def linear(self, *args):
            return None

    kernels.register_backend("partial", Partial)
    with pytest.raises(TypeError, match="lacks the ops act_quant"):
        kernels.get_backend("partial")


def test_the_environment_variable_picks_the_default_and_use_backend_scopes_it(monkeypatch, counting):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert type(kernels.active_backend()) is kernels.AutoBackend  # the device's choice: "native" on the CPU
    assert kernels.active_backend().backend_for(torch.device("cpu")) is kernels.get_backend("native")
    assert kernels.resolve_backend_name("auto", "meta") == "reference"
    assert kernels.resolve_backend_name("cpu", "meta") == "cpu"
    monkeypatch.setenv(kernels.ENV_VAR, "counting")
    assert kernels.active_backend() is counting
    with kernels.use_backend("reference") as chosen:
        assert type(chosen) is ReferenceBackend and kernels.active_backend() is chosen
        seen = []
        worker = threading.Thread(target=lambda: seen.append(kernels.active_backend()))
        worker.start()
        worker.join()
        assert seen == [counting]  # the choice is per thread (a context variable), not a global
    assert kernels.active_backend() is counting
    monkeypatch.setenv(kernels.ENV_VAR, "nope")
    with pytest.raises(kernels.UnknownBackendError):
        kernels.linear(torch.ones(1, 4), torch.ones(2, 4))


# ---------------------------------------------------------------------------------------------- every op, through it


def test_every_linear_of_a_forward_goes_through_the_seam(counting):
    for numerics, dtype in (("plain", torch.float32), ("exact", torch.bfloat16)):
        model = tiny(dtype, numerics)
        linears = count_linear_forwards(model)
        counting.reset()
        with kernels.use_backend("counting"), torch.no_grad():
            out = model(tokens())
        # the experts' Linear modules hold weights the swiglu op multiplies with (three linears per expert call);
        # two quantised linears of one input run as one `linears` op (two linears, no module call)
        expected = linears[0] + 3 * counting.calls["swiglu"] + 2 * counting.calls["linears"]
        assert linears[0] > 0 and counting.calls["linear"] == expected, (numerics, counting.calls)
        assert counting.calls["routed_experts"] == model.args.n_layers
        with torch.no_grad(), kernels.use_backend("reference"):
            assert torch.equal(out, model(tokens()))  # the counting oracle computes what the reference does
        if numerics == "exact":  # FP8 / FP4 weights: quantised activations and block-scaled GEMMs
            # the attention's, the ffn's and the query latent's norms quantise their output once for the linears
            # reading it (wq_a and wkv; wq_b and the indexer's; the shared and routed experts)
            assert counting.calls["rms_norm_quant"] == 3 * model.args.n_layers
            assert 0 < counting.calls["act_quant"] < counting.calls["fp8_gemm"] + counting.calls["fp4_gemm"]
            assert counting.calls["fp8_simulate"] > 0 and counting.calls["fp4_simulate"] > 0
            csa = sum(model.args.layer_ratio(i) == 4 for i in range(model.args.n_layers))
            assert counting.calls["linears"] == model.args.n_layers + csa  # (wq_a and wkv; wq_b and the indexer's)
        else:  # float weights: nothing to quantise
            assert counting.calls["rms_norm_quant"] == counting.calls["act_quant"] == counting.calls["linears"] == 0
        assert counting.calls["sparse_attn"] == model.args.n_layers
        assert counting.calls["hc_split_sinkhorn"] == 2 * model.args.n_layers  # attention and ffn of each block
        assert counting.calls["hadamard"] > 0


def test_qat_runs_through_the_seam(counting):
    model = tiny()
    apply_precision(model, "fp8+fp4")
    linears = count_linear_forwards(model)
    counting.reset()
    with kernels.use_backend("counting"):
        model(tokens()).float().logsumexp(-1).mean().backward()
    assert counting.calls["linear"] == linears[0] > 0
    assert counting.calls["fp8_simulate"] > 0  # FP8 activations (and the KV nope dims: not here, plain numerics)
    assert counting.calls["fp8_weight_simulate"] > 0 and counting.calls["fp4_weight_simulate"] > 0


def test_the_engine_runs_its_backend_and_attention_reads_fp8_pages_in_place(counting):
    model = tiny(torch.bfloat16, "exact", seed=2)
    prompts = [tokens(1, n, seed=n)[0].tolist() for n in (5, 19, 11)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def run(backend):
        engine = Engine(model, max_batch=3, max_seq_len=64, prefill_chunk=8, kv_format="fp8", kernel_backend=backend)
        ids = [engine.add_request(p, params) for p in prompts]
        out = {i: [] for i in ids}
        while engine.has_unfinished():
            for u in engine.step():
                out[u.request_id] += u.new_token_ids
        return [out[i] for i in ids], engine

    reference, _ = run("reference")
    counting.reset()
    counted, engine = run("counting")
    assert counted == reference and engine.stats().kernel_backend == "counting"
    assert kernels.active_backend() is not counting  # the engine's choice stays inside its steps
    # the KV codecs quantise through the seam: the FP8 rows' nope dims as [rows, nope] with act_quant's 64-blocks,
    # the FP4 indexer keys as [rows, index_head_dim] with fp4_quant
    nope = model.args.head_dim - model.args.rope_head_dim
    assert any(a[0].shape[1:] == (nope,) and a[1:] == (64,) for a in counting.arguments["act_quant"])
    assert any(a[0].shape[1:] == (model.args.index_head_dim,) for a in counting.arguments["fp4_quant"])
    # compressed layers get their entries as pages left in place, in the production byte layout
    paged = [run_ for args in counting.arguments["sparse_attn"] for run_ in args[1] if isinstance(run_, PagedRows)]
    assert paged and all(p.pool.dtype == torch.uint8 and p.codec.format == "fp8" for p in paged)
    assert {p.codec.kind for p in paged} == {"kv"}
    # a step computes the requests that have work, not every slot
    assert max(args[0].shape[0] for args in counting.arguments["sparse_attn"]) <= len(prompts)


def test_a_decode_step_norms_its_cache_rows_straight_into_the_pages(counting):
    """Over an engine's paged cache a decode step's new rows go into the pages as the op that makes them
    (`norm_rope_store`): each layer's window row into its ring, and each compressor's finished entry into its pages
    (a batch of one row finishes every entry it pools), so no other `store_rows` is left; the reference's attention asks
    for the fp8 rings decoded (`attends_in_place`); each pair of projections of one input is one op (`linears`).
    The tokens are the reference engine's, and the model's own decode over its dense cache (the fp8 codec
    round-trips exact numerics' rows)."""
    model = tiny(torch.bfloat16, "exact", seed=3)
    prompt = tokens(1, 13, seed=4)[0].tolist()
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    engine = Engine(model, max_batch=1, max_seq_len=64, kv_format="fp8", kernel_backend="counting")
    engine.add_request(prompt, params)
    out, decode_steps = [], 0
    csa_layers = sum(model.args.layer_ratio(i) == 4 for i in range(model.args.n_layers))
    assert csa_layers
    while engine.has_unfinished():
        counting.reset()
        for u in engine.step():
            out += u.new_token_ids
        if counting.calls["sparse_attn"] and all(a[0].shape[1] == 1 for a in counting.arguments["sparse_attn"]):
            decode_steps += 1
            rings = [a for a in counting.arguments["norm_rope_store"] if a[7] is None]  # (rows None: ring slots)
            assert len(rings) == model.args.n_layers
            # (the reference's norm_rope_store stores through store_rows, counted as a call of its own)
            assert counting.calls["store_rows"] == counting.calls["norm_rope_store"]
            assert counting.calls["attends_in_place"] == model.args.n_layers
            finished = [a for a in counting.arguments["norm_rope_store"] if a[7] is not None]
            assert all(a[6].pool.dtype == torch.uint8 for a in finished)
            # two projections of one input as one op: every layer's wq_a and wkv, a CSA layer's two wq_b too
            assert counting.calls["linears"] == model.args.n_layers + csa_layers
    assert decode_steps >= 7
    reference = Engine(model, max_batch=1, max_seq_len=64, kv_format="fp8", kernel_backend="reference")
    reference.add_request(prompt, params)
    want = []
    while reference.has_unfinished():
        want += [t for u in reference.step() for t in u.new_token_ids]
    assert out == want
    with torch.no_grad(), kernels.use_backend("reference"):  # the model's own cache: dense, written row by row
        cache = model.new_cache(1, 64)
        logits, own = model(torch.tensor([prompt]), cache)[:, -1], []
        for _ in range(len(out)):
            own.append(int(logits.argmax()))
            logits = model(torch.tensor([[own[-1]]]), cache)[:, -1]
    assert own == out


def test_a_sublayer_norm_is_made_by_the_collapse_only_when_it_is_a_plain_rmsnorm(counting):
    """`norm_weight` hands a plain RMSNorm's weight to `hc_pre_norm` (the norm in the collapse's op); a norm whose
    forward was replaced is called as the module it is, after `hc_pre`, and what it returns is what the sublayer
    reads."""
    from dsv4.model.layers import RMSNorm, norm_weight

    model = tiny()
    block = model.layers[0]
    assert norm_weight(block.attn_norm) is block.attn_norm.weight
    counting.reset()
    with kernels.use_backend("counting"), torch.no_grad():
        want = model(tokens())
    assert counting.calls["hc_pre_norm"] == 2 * model.args.n_layers
    calls = []
    block.attn_norm.forward = lambda u, quantize=False: (calls.append(u.shape), RMSNorm.forward(
        block.attn_norm, u, quantize))[1]
    assert norm_weight(block.attn_norm) is None
    counting.reset()
    with kernels.use_backend("counting"), torch.no_grad():
        same = model(tokens())
    assert calls and counting.calls["hc_pre_norm"] == 2 * model.args.n_layers - 1
    assert torch.equal(same, want)
    block.attn_norm.forward = lambda u, quantize=False: RMSNorm.forward(block.attn_norm, u) * 2.0  # (plain: no
    with torch.no_grad():  # quantisation asked for)
        assert not torch.allclose(model(tokens()), want)


def test_overriding_one_op_changes_every_op_built_on_it():
    """A backend overriding `fp8_gemm` alone is used by the `linear` it inherits (the seam is real: rebinding
    an op changes what the model computes)."""

    class ZeroGemm(ReferenceBackend):
        def fp8_gemm(self, xq, xs, w, ws, out_dtype=torch.bfloat16):
            return torch.zeros(*xq.shape[:-1], w.shape[0], dtype=out_dtype)

    kernels.register_backend("zero-gemm", ZeroGemm)
    layer = Linear(256, 128)
    q, s = quantize_fp8_weight(torch.randn(128, 256))
    layer.weight, layer.scale = torch.nn.Parameter(q, requires_grad=False), s
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert layer(x).abs().sum() > 0
    with kernels.use_backend("zero-gemm"):
        assert layer(x).abs().sum() == 0


def test_only_plain_quantised_linears_are_handed_a_quantisation():
    """`reads_quantized`: a Linear with FP8 weights and its own forward takes act_quant of its input from the caller;
    a float one, one whose forward a training recipe replaced, and a subclass with a forward of its own (tensor
    parallelism's row-parallel linear) do not."""
    from dsv4.model.layers import reads_quantized
    from dsv4.parallel.tensor_parallel import RowParallelLinear

    plain = Linear(256, 128)
    assert not reads_quantized(plain)  # float weights
    w, s = quantize_fp8_weight(torch.randn(128, 256))
    plain.weight = torch.nn.Parameter(w, requires_grad=False)
    plain.scale = s
    assert reads_quantized(plain)
    row_parallel = RowParallelLinear.__new__(RowParallelLinear)
    torch.nn.Module.__init__(row_parallel)
    row_parallel.weight = plain.weight
    row_parallel.register_buffer("scale", s)
    assert not reads_quantized(row_parallel) and not reads_quantized(plain, row_parallel)
    plain.forward = lambda x: x
    assert not reads_quantized(plain)


def test_a_decode_steps_compressor_projects_in_the_op_only_for_plain_float_linears(monkeypatch):
    """`float_weight` hands a plain float Linear's weight to `project_ring_pool` (which then makes the projections);
    a Linear whose forward was replaced is called as the module it is, then `ring_pool`. Both decode the same
    logits as the model's full forward, and a replaced forward is really run."""
    from dsv4.model.compressor import Compressor
    from dsv4.model.layers import float_weight

    plain = Linear(64, 32, dtype=torch.float32)
    assert float_weight(plain) is plain.weight
    w, s = quantize_fp8_weight(torch.randn(32, 64))
    quantised = Linear(64, 32)
    quantised.weight = torch.nn.Parameter(w, requires_grad=False)
    quantised.scale = s
    assert float_weight(quantised) is None
    replaced = Linear(64, 32, dtype=torch.float32)
    replaced.forward = lambda x: x
    assert float_weight(replaced) is None

    base = preset("small")
    args = base.replace(n_layers=2, n_hash_layers=0, max_seq_len=256,
                        compress_ratios=(4, 128, *base.compress_ratios[base.n_layers:]))
    model = init_weights(Transformer(args, torch.float32), seed=0).eval()
    tokens = torch.randint(0, args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    calls = {"project_ring_pool": 0, "ring_pool": 0, "wrapped": 0}
    reference = ReferenceBackend()

    def counted(op):
        real = getattr(reference, op)
        return lambda *a: (calls.__setitem__(op, calls[op] + 1), real(*a))[1]

    for op in ("project_ring_pool", "ring_pool"):
        monkeypatch.setattr(reference, op, counted(op))

    def decode_last(model):
        with torch.no_grad(), kernels.use_backend(reference):
            cache = model.new_cache(1, 256)
            model(tokens[:, :8], cache)
            return model(tokens[:, 8:], cache)[:, -1]

    with torch.no_grad():
        want = model(tokens)[:, -1]
    plain_logits = decode_last(model)
    assert calls["project_ring_pool"] == 3 and calls["ring_pool"] == 3  # CSA's two compressors, HCA's one
    torch.testing.assert_close(plain_logits, want, rtol=1e-4, atol=1e-4)
    for module in model.layers.modules():
        if isinstance(module, Compressor):
            wkv = module.wkv
            wkv.forward = lambda x, _wkv=wkv: (calls.__setitem__("wrapped", calls["wrapped"] + 1),
                                               Linear.forward(_wkv, x))[1]
    calls.update(project_ring_pool=0, ring_pool=0)
    wrapped_logits = decode_last(model)
    assert calls["project_ring_pool"] == 0 and calls["ring_pool"] == 3 and calls["wrapped"] >= 3
    assert torch.equal(wrapped_logits, plain_logits)
