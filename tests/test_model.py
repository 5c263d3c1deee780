"""The model against independent references: transformers' DeepSeek-V4, released parameter counts."""

import pytest
import torch
import torch.nn.functional as F

from dsv4.config import preset
from dsv4.model import Transformer, init_weights
from dsv4.model.cache import ForwardTrace
from dsv4.model.mhc import composite_gain


def random_model(name="tiny", seed=1, **changes) -> Transformer:
    """A model whose every mechanism matters: mHC mixing far from identity, non-zero sinks, ape and
    balancing bias (the training init starts those at near-neutral values)."""
    model = init_weights(Transformer(preset(name).replace(**changes)), seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_.endswith(("attn_sink", "ape", "_base")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name_.endswith("_scale"):
                p.copy_(torch.randn(p.shape, generator=gen).abs() + 0.5)
        for name_, b in model.named_buffers():
            if name_.endswith("gate.bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model


@torch.no_grad()
def test_logits_match_transformers():
    from hf_reference import hf_twin

    model = random_model()
    args = model.args
    assert {0, 4, 8} <= set(args.compress_ratios) and args.n_layers >= 5 and args.n_hash_layers >= 1
    tokens = torch.randint(0, args.vocab_size, (2, 5 * args.window_size))  # 5 windows, 10 CSA / 5 HCA entries
    hf = hf_twin(model)
    ours, ref = model(tokens), hf(tokens).logits
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 1e-4, rel
    # negative control: the comparison sees the indexer's selection (top-3 of up to 10 entries)
    model_topk = random_model(index_topk=args.index_topk + 2)
    assert (model_topk(tokens) - ref).norm() / ref.norm() > 1e-3


def test_released_parameter_counts_on_meta_device():
    expected = {"flash": (284_332_240_471, 290_942_289_362), "pro": (1_572_997_201_763, 1_598_837_347_742)}
    for name, (main, with_mtp) in expected.items():
        with torch.device("meta"):
            model = Transformer(preset(name), dtype=torch.bfloat16)
        counts = model.parameter_counts()
        assert (counts["main"], counts["total"]) == (main, with_mtp), name
    assert abs(counts["active"] / 1e9 - 49.78) < 0.01


def test_every_trainable_parameter_gets_a_finite_gradient():
    model = random_model()
    tokens = torch.randint(0, model.args.vocab_size, (2, 48))
    trace = ForwardTrace()
    indexer_losses = trace.indexer_losses
    streams = model.forward_streams(tokens, trace=trace)
    ce = F.cross_entropy(model.logits(streams)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    mtp = F.cross_entropy(model.mtp_logits(streams[:, :-2], tokens[:, 1:-1]).flatten(0, 1), tokens[:, 2:].flatten())
    assert len(indexer_losses) == model.args.compress_ratios.count(4)
    (ce + 0.3 * mtp + sum(indexer_losses)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.isfinite().all() and p.grad.abs().sum() > 0, name
    assert all(not b.requires_grad for b in model.buffers())  # tid2eid, gate bias


def test_bad_input_is_rejected():
    model = random_model()
    vocab = model.args.vocab_size
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.tensor([[1, vocab]]))
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.tensor([[-1, 2]]))
    from dsv4.model.transformer import FEW_IDS
    long = torch.ones(1, FEW_IDS + 1, dtype=torch.int32)  # a longer chunk is checked by its least and greatest id
    for at, bad in ((0, -1), (FEW_IDS, vocab)):
        with pytest.raises(ValueError, match=f"token ids must lie in .*got min {min(bad, 1)}, max {max(bad, 1)}"):
            model(long.index_fill(1, torch.tensor([at]), bad))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(2, 3))
    cache = model.new_cache(2, 32)
    with torch.no_grad():
        model(torch.ones(2, 4, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="must follow the cache position"):
            model(torch.ones(2, 1, dtype=torch.long), cache, start_pos=7)
        with pytest.raises(ValueError, match="exceed the cache capacity"):
            model(torch.ones(2, 29, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="cache holds 2 sequences"):
            model(torch.ones(3, 1, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="lengths"):
            model(torch.ones(2, 2, dtype=torch.long), cache, lengths=torch.tensor([3, 1]))
        assert cache.lengths.tolist() == [4, 4]  # failed calls left the cache untouched
        model(torch.ones(2, 1, dtype=torch.long), cache, start_pos=4)
    with pytest.raises(ValueError, match="numerics"):
        Transformer(preset("tiny"), numerics="fast")


@torch.no_grad()
def test_two_models_live_in_one_process():
    """No module-level state: an exact bf16 model and a plain fp32 model interleave without interference."""
    from dsv4.formats import to_official_formats

    plain = random_model()
    exact = to_official_formats(init_weights(Transformer(plain.args, torch.bfloat16, "exact"), seed=7))
    tokens = torch.randint(0, plain.args.vocab_size, (1, 24))
    first_plain, first_exact = plain(tokens), exact(tokens)
    cache_p, cache_e = plain.new_cache(1, 32), exact.new_cache(1, 32)
    for lo, hi in ((0, 10), (10, 24)):
        exact(tokens[:, lo:hi], cache_e)
        plain(tokens[:, lo:hi], cache_p)
    assert torch.equal(plain(tokens), first_plain) and torch.equal(exact(tokens), first_exact)
    assert not torch.allclose(first_plain, first_exact, atol=1e-2)


def test_routing_records_expose_each_moe_layers_choice():
    """`trace.routing` collects one record per MoE layer (main blocks, then the MTP block when it runs), whose ids
    are the experts the forward used and whose scores carry gradient to the gate."""
    args = preset("tiny")
    model = init_weights(Transformer(args), seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    trace = ForwardTrace()
    routing = trace.routing
    streams = model.forward_streams(tokens, trace=trace)
    model.mtp_logits(streams[:, :-1], tokens[:, 1:], trace=trace)
    assert [r.layer_id for r in routing] == list(range(args.n_layers + args.n_mtp_layers))
    assert [r.hashed for r in routing[:args.n_layers]] == [args.is_hash_layer(i) for i in range(args.n_layers)]
    first = routing[0]
    assert first.scores.shape == (18, args.n_routed_experts) and first.ids.shape == (18, args.n_activated_experts)
    assert torch.equal(first.ids, model.layers[0].ffn.gate.tid2eid[tokens.flatten()])
    learned = next(r for r in routing if not r.hashed)
    gate = model.layers[learned.layer_id].ffn.gate
    assert torch.equal(learned.ids, (learned.scores + gate.bias).topk(args.n_activated_experts).indices)
    learned.scores.sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_composite_gain_of_known_maps():
    eye = torch.eye(4).expand(1, 3, 4, 4)
    assert [float(g) for g in composite_gain([eye, eye])] == [1.0, 1.0]
    doubled = [2 * eye] * 3
    assert [float(g) for g in composite_gain(doubled)] == [8.0, 8.0]
    skew = torch.tensor([[1.0, 2.0], [0.0, 1.0]]).expand(1, 1, 2, 2)  # stream 0 feeds 1 twice
    # H = skew^T: rows [1, 0], [2, 1] -> forward gain 3; columns [1, 2], [0, 1] -> backward gain 3
    assert [float(g) for g in composite_gain([skew])] == [3.0, 3.0]


@pytest.mark.parametrize("hc_mode", ["mhc", "hc", "residual"])
def test_hc_modes_train_and_record_their_maps(hc_mode):
    args = preset("tiny")
    model = init_weights(Transformer(args, hc_mode=hc_mode), seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    trace = ForwardTrace()
    logits = model(tokens, trace=trace)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert len(trace.hc_maps) == 2 * args.n_layers
    if hc_mode == "residual":
        assert all(m is None for m in trace.hc_maps)
        assert model.layers[0].hc_attn_fn.grad is None  # the mixing parameters are out of the graph
        plain = model.layers[0].attn.wq_a.weight.grad
        assert plain is not None and plain.abs().sum() > 0
        return
    forward, backward = composite_gain(trace.hc_maps)
    if hc_mode == "mhc":  # Sinkhorn keeps every map (nearly) doubly stochastic
        assert abs(float(forward) - 1) < 0.05 and abs(float(backward) - 1) < 0.05
    else:  # unconstrained maps start at the identity plus the dynamic term, nothing holds their sums at 1
        assert float(forward) != pytest.approx(1.0, abs=1e-3)
    assert model.layers[0].hc_attn_fn.grad.abs().sum() > 0


def test_dense_indexer_attends_to_every_entry_and_trains_the_indexer():
    args = preset("tiny").replace(index_topk=1)
    model = init_weights(Transformer(args), seed=0)
    tokens = torch.randint(0, args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    sparse, dense = ForwardTrace(), ForwardTrace(dense_indexer=True)
    a, b = model(tokens, trace=sparse), model(tokens, trace=dense)
    assert not torch.allclose(a, b)  # top-1 of up to 10 entries vs all of them
    sum(dense.indexer_losses).backward()
    indexer = next(layer.attn.indexer for layer in model.layers if hasattr(layer.attn, "indexer"))
    assert indexer.wq_b.weight.grad.abs().sum() > 0
    assert model.layers[0].attn.wq_a.weight.grad is None  # the KL loss never reaches the backbone
    with pytest.raises(ValueError, match="hc_mode"):
        Transformer(args, hc_mode="none")


@pytest.mark.parametrize("rows", [40, 5000])  # H * N <= K * D: scores of every row; more rows: gathered
def test_the_indexer_losss_slot_logits_are_the_gathered_rows_products(rows, monkeypatch):
    """The KL loss's attention logits, by one GEMM a block of queries over every row (then picked) or over the
    gathered rows, are q . rows[idx] for every slot (-1 slots: row 0's), in blocks smaller than the chunk too."""
    from dsv4.model import attention

    monkeypatch.setattr(attention, "SLOT_SCORES_BYTES", 4096)
    gen = torch.Generator().manual_seed(5)
    q, kv = torch.randn(2, 9, 4, 16, generator=gen), torch.randn(2, rows, 16, generator=gen)
    idx = torch.randint(-1, rows, (2, 9, 40), generator=gen)
    want = torch.einsum("bshd,bskd->bshk", q, kv[torch.arange(2).view(2, 1, 1), idx.clamp_min(0)])
    torch.testing.assert_close(attention._slot_logits(q, kv, idx), want, rtol=1e-6, atol=1e-6)


def test_indexer_loss_ignores_right_padding():
    """A padded row's indexer KL equals the unpadded row's: padding queries are left out of the mean."""
    args = preset("tiny")
    model = init_weights(Transformer(args), seed=0)
    tokens = torch.randint(0, args.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    alone, padded = ForwardTrace(), ForwardTrace()
    model(tokens, trace=alone)
    junk = torch.randint(0, args.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    model(torch.cat((tokens, junk), dim=1), lengths=torch.tensor([30]), trace=padded)
    for a, b in zip(alone.indexer_losses, padded.indexer_losses, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def _memos_seen(model, monkeypatch) -> list[dict]:
    """The `ForwardContext.memo` each forward of `model` runs with, in call order."""
    seen = []
    share = type(model)._shared_memo

    def recording(self, key):
        seen.append(share(self, key))
        return seen[-1]

    monkeypatch.setattr(type(model), "_shared_memo", recording)
    return seen


@pytest.mark.parametrize("mtp_start", [20, 19])
def test_a_forward_over_the_chunk_just_seen_reuses_its_memo_and_computes_the_same(monkeypatch, mtp_start):
    """A speculative step's MTP call runs over the chunk its main call just ran over (same starts, lengths and
    width): it reads the main call's RoPE rows and window indices instead of building them; a call at another
    start builds its own. Either way its output is the bits of a call that built everything itself."""
    model = random_model()
    assert model.args.layer_ratio(model.args.n_layers) == 0  # the MTP block never builds the compressed RoPE rows
    gen = torch.Generator().manual_seed(5)
    seq = torch.randint(0, model.args.vocab_size, (1, 24), generator=gen)
    with torch.inference_mode():
        cache = model.new_cache(1, 64)
        streams = model.forward_streams(seq[:, :20], cache)
        model.mtp_streams(streams[:, :mtp_start], seq[:, 1:mtp_start + 1], cache)  # the MTP side at mtp_start
        streams = model.forward_streams(seq[:, 20:22], cache)  # the main side's two tokens, at 20 and 21
        seen = _memos_seen(model, monkeypatch)
        snap = cache.snapshot(2)
        out = model.mtp_streams(streams, seq[:, 21:23], cache)
        cache.rollback(snap, cache.lengths, snap.mtp_lengths)  # the same call again, nothing left to reuse
        model._last_memo = None
        fresh = model.mtp_streams(streams, seq[:, 21:23], cache)
    assert torch.equal(out, fresh)
    assert seen[1] is not seen[0] and ("rope", True) not in seen[1]
    if mtp_start == 20:  # the main call's memo, compressed layers' RoPE rows included, was handed on
        assert ("rope", True) in seen[0]
    else:  # another start: a memo of its own
        assert ("rope", True) not in seen[0]


def test_no_memo_is_kept_outside_inference_mode():
    """Training and no-grad forwards build their own memo each time (an inference tensor cannot enter autograd)."""
    model = random_model()
    tokens = torch.randint(0, model.args.vocab_size, (1, 12))
    with torch.inference_mode():
        model.forward_streams(tokens, model.new_cache(1, 32))
    assert model._last_memo is not None
    with torch.no_grad():
        model.forward_streams(tokens, model.new_cache(1, 32))
    assert model._last_memo is None
    logits = model(tokens)  # training forward: gradients flow
    logits.sum().backward()
    assert model._last_memo is None
