"""The paged hybrid KV cache: byte accounting equals the planner, pages come and go, the production formats are
lossless, and a saved state resumes exactly."""

import pytest
import torch

from dsv4.config import preset
from dsv4.engine.kv_cache import CacheFullError, KVCacheManager, default_page_tokens, measure_layout
from dsv4.model import Transformer, init_weights
from dsv4.plan import kv_plan


def meta_model(name, **kw):
    with torch.device("meta"):
        return Transformer(preset(name), **kw)


@pytest.mark.parametrize("name", ["tiny", "small", "flash"])
@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
def test_sequence_bytes_equal_the_planner(name, kv_format):
    model = meta_model(name, dtype=torch.bfloat16, numerics="exact")
    kv = KVCacheManager(model, max_batch=1, max_seq_len=4096, kv_format=kv_format, num_pages=1)
    for length in (1, 127, 128, 1000, 4096):
        plan = kv_plan(model.args, length, kv_format=kv_format)
        measured = kv.sequence_bytes(length)
        expected = {row.kind: row.layers * row.state_bytes + row.growing_bytes(length)
                    for row in plan.rows if row.layers}
        assert measured == expected, (length, measured, expected)
        assert sum(measured.values()) == plan.bytes_per_sequence
    # one page of every main layer = page_tokens x the planner's amortised bytes per token
    assert kv.layout.page_bytes == kv.page_tokens * kv_plan(model.args, 1, kv_format=kv_format).bytes_per_token
    assert kv.layout.state_bytes == kv_plan(model.args, 1, kv_format=kv_format).state_bytes_per_sequence


def test_flash_layout_is_the_production_one():
    lay = measure_layout(preset("flash"), torch.bfloat16, "fp8", 128, mtp=True)
    assert default_page_tokens(preset("flash")) == 128
    # 21 CSA layers x (32 entries x 584 B + 32 keys x 68 B) + 20 HCA layers x 1 entry x 584 B
    assert lay.page_bytes == 21 * 32 * (584 + 68) + 20 * 584
    assert lay.mtp_state_bytes == kv_plan(preset("flash"), 1).mtp_state_bytes


def test_budget_sizes_the_pool_and_bad_sizes_are_refused():
    model = meta_model("tiny")
    kv = KVCacheManager(model, max_batch=2, max_seq_len=256, kv_format="bf16", num_pages=3)
    budget = kv.total_bytes
    again = KVCacheManager(model, max_batch=2, max_seq_len=256, kv_format="bf16", budget_bytes=budget + 1)
    assert again.num_pages == 3 and again.total_bytes <= budget + 1
    with pytest.raises(ValueError, match="per-sequence state"):
        KVCacheManager(model, max_batch=2, max_seq_len=256, budget_bytes=10)
    with pytest.raises(ValueError, match="multiple"):
        KVCacheManager(model, max_batch=2, max_seq_len=256, page_tokens=6)
    with pytest.raises(ValueError, match="KV format"):
        KVCacheManager(model, max_batch=2, max_seq_len=256, kv_format="int4")
    with pytest.raises(ValueError, match="exact"):
        KVCacheManager(model, max_batch=2, max_seq_len=256, kv_format="fp8")


def test_pages_are_allocated_on_demand_and_released():
    model = meta_model("tiny")
    kv = KVCacheManager(model, max_batch=2, max_seq_len=256, num_pages=4, page_tokens=16)
    assert [kv.pages_for(n) for n in (0, 3, 4, 16, 19, 20, 64)] == [0, 0, 1, 1, 1, 2, 4]
    kv.ensure(0, 20)
    kv.ensure(1, 19)
    assert kv.pool.free == 1 and kv.slot_pages == [[0, 1], [2]]
    with pytest.raises(CacheFullError):
        kv.ensure(1, 64)
    assert kv.pool.free == 1  # a failed request allocates nothing
    kv.release(0)
    assert kv.pool.free == 3 and kv.slot_pages[0] == []


def tokens(model, n, seed=0):
    return torch.randint(0, model.args.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("kv_format", ["model", "fp8"])
def test_paged_forward_equals_dense(kv_format):
    """Two sequences in paged storage (pages interleaved between them) give the dense cache's logits; the fp8
    format on an exact bf16 model is bit-identical to bf16 rows."""
    dtype, numerics = (torch.float32, "plain") if kv_format == "model" else (torch.bfloat16, "exact")
    model = init_weights(Transformer(preset("tiny"), dtype=dtype, numerics=numerics), seed=3)
    seq = torch.cat((tokens(model, 50, 1), tokens(model, 50, 2)))
    dense = model.new_cache(2, 64)
    ref = model(seq, dense)
    kv = KVCacheManager(model, max_batch=2, max_seq_len=64, kv_format=kv_format, num_pages=12, page_tokens=8)
    got = []
    for lo, hi in ((0, 9), (9, 30), (30, 50)):
        for slot in (0, 1):
            kv.ensure(slot, hi)
        got.append(model(seq[:, lo:hi], kv.cache))
    got = torch.cat(got, dim=1)
    if kv_format == "fp8":
        mirror = KVCacheManager(model, max_batch=2, max_seq_len=64, kv_format="model", num_pages=12, page_tokens=8)
        for slot in (0, 1):
            mirror.ensure(slot, 50)
        ref = torch.cat([model(seq[:, lo:hi], mirror.cache) for lo, hi in ((0, 9), (9, 30), (30, 50))], dim=1)
        assert torch.equal(got, ref)
        assert kv.cache.layers[1].window.dtype == torch.uint8
    else:
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert sorted(kv.slot_pages[0] + kv.slot_pages[1]) == list(range(len(kv.slot_pages[0]) * 2))


@torch.no_grad()
def test_saved_state_resumes_in_another_slot_and_shares_full_pages():
    model = init_weights(Transformer(preset("tiny")), seed=3)
    seq = tokens(model, 60, 4)
    kv = KVCacheManager(model, max_batch=2, max_seq_len=64, num_pages=16, page_tokens=8)
    kv.ensure(0, 37)
    batch = torch.zeros(2, 37, dtype=torch.long)
    batch[0] = seq[0, :37]
    model(batch, kv.cache, lengths=torch.tensor([37, 0]))
    saved = kv.save(0)
    assert saved.length == 37 and saved.pages == kv.slot_pages[0][:4] and saved.partial is not None
    assert all(kv.pool.refs[p] == 2 for p in saved.pages)
    kv.release(0)  # the sequence goes; its full pages stay with the saved state
    assert kv.pool.free == 16 - 4
    kv.load(1, saved)
    kv.ensure(1, 60)
    rest = torch.zeros(2, 23, dtype=torch.long)
    rest[1] = seq[0, 37:]
    got = model(rest, kv.cache, lengths=torch.tensor([0, 23]))[1]
    ref = model(seq)[0, 37:]
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    kv.release(1)
    kv.drop(saved)
    assert kv.pool.free == 16
