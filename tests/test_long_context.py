"""Long-context inference: the indexer's O(N) top-k equals the stable-sort rule, its query blocking
changes nothing, and the 1M-token `nano` preset runs chunked like the full forward."""

import pytest
import torch
from test_model import random_model

import dsv4.kernels.reference as reference_mod
import dsv4.model.indexer as indexer_mod
from dsv4 import kernels
from dsv4.config import preset
from dsv4.kernels.topk import stable_topk


def sort_rule(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The rule stable_topk replaces: a full stable descending sort, first k."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def adversarial_scores(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """[B,S,N] score sets where the choice among exact ties decides the result."""
    shape = (2, 7, 40)
    few_values = torch.randint(-2, 3, shape, generator=gen).float()  # 5 distinct values, ties everywhere
    visible = torch.arange(shape[-1]) < torch.randint(0, shape[-1] + 1, shape[:2], generator=gen).unsqueeze(-1)
    signed_zeros = torch.where(torch.rand(shape, generator=gen) < 0.5, -0.0, 0.0)  # -0.0 == 0.0
    return {
        "few values": few_values,
        "all zero": torch.zeros(shape),
        "signed zeros": signed_zeros,
        "all -inf": torch.full(shape, float("-inf")),
        "masked tails": few_values.masked_fill(~visible, float("-inf")),  # rows with fewer visible than k
        "distinct": torch.randn(shape, generator=gen),
        "late ties": torch.arange(shape[-1]).float().clamp(max=30).expand(shape),  # tied top 10 past 4k
        "relu-like": torch.randn(shape, generator=gen).relu() * torch.randn(shape[:2], generator=gen).unsqueeze(-1),
    }


@pytest.mark.parametrize("read_free", [False, True])  # the CPU's way (repair the rows a tie cuts), the GPU's
@pytest.mark.parametrize("k", [0, 1, 3, 8, 39, 40, 55])  # 40 = N, 55 > N
def test_stable_topk_equals_the_stable_sort_rule(k, read_free):
    gen = torch.Generator().manual_seed(k)
    for name, scores in adversarial_scores(gen).items():
        assert torch.equal(stable_topk(scores, k, read_free), sort_rule(scores, k)), (name, k)


def test_ties_make_plain_topk_differ():
    """Negative control: the inputs above do separate the rules (plain topk keeps arbitrary tied entries)."""
    gen = torch.Generator().manual_seed(0)
    scores = adversarial_scores(gen)["few values"]
    assert not torch.equal(scores.topk(8).indices, sort_rule(scores, 8))
    assert not torch.equal(scores.topk(8).indices.sort(-1).values, sort_rule(scores, 8).sort(-1).values)


def capture_indexer(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Collect every indexer call's (chosen, index scores)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in model.layers:
        if hasattr(layer.attn, "indexer"):
            layer.attn.indexer.register_forward_hook(lambda mod, args, out: seen.append(out))
    return seen


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny", "nano"])
def test_indexer_selection_and_query_blocks_match_the_dense_sort(monkeypatch, name):
    """The model's indexer on the default backend picks what a dense, unblocked stable sort on the reference
    backend picks (top-3 of up to 60 entries over 4 index heads; top-16 of up to 75 over one head, whose scores
    tie at 0 wherever its weight is < 0), also when every query is scored on its own."""
    model = random_model(name)
    tokens = torch.randint(0, model.args.vocab_size, (2, 240 if name == "tiny" else 300),
                           generator=torch.Generator().manual_seed(5))
    seen = capture_indexer(model)
    logits = model(tokens)
    fast = list(seen)
    seen.clear()
    monkeypatch.setattr(reference_mod, "stable_topk", sort_rule)
    monkeypatch.setattr(indexer_mod, "SCORE_BLOCK_BYTES", 1)  # one query per block
    with kernels.use_backend("reference"):
        ref_logits = model(tokens)
    assert len(fast) == len(seen) > 0
    for (chosen, scores), (ref_chosen, ref_scores) in zip(fast, seen, strict=True):
        assert torch.equal(chosen, ref_chosen)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)  # the backends' GEMMs round apart
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_nano_chunked_prefill_equals_full_forward():
    """The 1M-context preset, over a prompt that crosses HCA and many CSA boundaries (more entries than
    the top-k), in uneven chunks with tiny indexer query blocks, then decoding."""
    args = preset("nano")
    assert args.max_seq_len == 1 << 20 and {0, 4, 128} <= set(args.compress_ratios)
    assert args.n_mtp_layers and 0 < args.n_hash_layers < args.n_layers
    model = random_model("nano")
    tokens = torch.randint(0, args.vocab_size, (1, 300), generator=torch.Generator().manual_seed(7))
    ref = model(tokens)
    cache = model.new_cache(1, 512)
    chunks, pos = [], 0
    for size in (130, 97, 70, 1, 1, 1):
        chunks.append(model(tokens[:, pos:pos + size], cache))
        pos += size
    err = (torch.cat(chunks, dim=1) - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, err


def test_the_read_free_top_k_reads_nothing_on_the_host_where_ties_are_cut():
    """Off the CPU `stable_topk` must not ask the device which rows a tie cuts (a wait in every CSA layer of a GPU
    decode step); the CPU's way does ask, which is what the counter sees."""
    from host_reads import count_host_reads

    scores = torch.zeros(2, 3, 40)  # every row's k-th value tied
    with count_host_reads() as reads:
        stable_topk(scores, 8, read_free=True)
    assert not reads, reads
    with count_host_reads() as reads:
        stable_topk(scores, 8, read_free=False)
    assert reads, "the counter sees the tie test"
