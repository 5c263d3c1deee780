"""Production KV-cache byte formats (spec §4.2): sizes, layouts and exact round trips."""

import pytest
import torch

from dsv4 import kernels
from dsv4.config import preset
from dsv4.formats import to_official_formats
from dsv4.kv_formats import get_format
from dsv4.kv_formats.fp8 import index_key_layout, kv_layout, pack_index_key, pack_kv, unpack_index_key, unpack_kv
from dsv4.model import Transformer, init_weights
from dsv4.plan import kv_entry_bytes as plan_entry_bytes


def kv_entry_bytes(args) -> int:
    return get_format("fp8").entry_bytes(args, "kv")


def index_key_bytes(args) -> int:
    return get_format("fp8").entry_bytes(args, "index")


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16)


def kv_sim(rows: torch.Tensor, rope: int) -> torch.Tensor:
    nope = rows.shape[-1] - rope
    return torch.cat((kernels.fp8_simulate(rows[:, :nope]), rows[:, nope:]), dim=-1)


def random_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # per-row magnitudes over many octaves, so scales vary and some values go subnormal in e4m3
    mag = torch.exp2(torch.randint(-20, 12, (n, 1), generator=gen).float())
    return (torch.randn(n, d, generator=gen) * mag).to(torch.bfloat16)


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_sizes_match_spec_and_plan(name):
    args = preset(name)
    assert (args.head_dim, args.rope_head_dim, args.index_head_dim) == (512, 64, 128)
    assert kv_entry_bytes(args) == 584
    assert index_key_bytes(args) == 68
    assert kv_layout(512, 64) == (448, 128, 8, 584)
    assert index_key_layout(128) == (64, 4, 68)
    assert (kv_entry_bytes(args), index_key_bytes(args)) == plan_entry_bytes(args, "fp8")


@pytest.mark.parametrize("d,r,i", [(32, 8, 16), (128, 32, 64), (136, 8, 32), (1024, 64, 256)])
def test_general_sizes_match_plan(d, r, i):
    args = preset("tiny").replace(head_dim=d, rope_head_dim=r, index_head_dim=i)
    assert (kv_entry_bytes(args), index_key_bytes(args)) == plan_entry_bytes(args, "fp8")
    rows = random_rows(5, d)
    packed = pack_kv(rows, r)
    assert packed.shape == (5, kv_entry_bytes(args)) and packed.dtype == torch.uint8
    assert torch.equal(bits(unpack_kv(packed, d, r)), bits(kv_sim(rows, r)))
    keys = random_rows(5, i, seed=1)
    packed = pack_index_key(keys)
    assert packed.shape == (5, index_key_bytes(args))
    assert torch.equal(bits(unpack_index_key(packed, i)), bits(kernels.fp4_simulate(keys)))


def test_kv_unrounded_rows_decode_to_fp8_simulation():
    rows = random_rows(64, 512)
    out = unpack_kv(pack_kv(rows))
    assert out.dtype == torch.bfloat16 and out.shape == (64, 512)
    assert torch.equal(bits(out), bits(kv_sim(rows, 64)))
    assert not torch.equal(bits(out), bits(rows))  # the codec really rounds


def test_kv_rounded_rows_are_lossless():
    rounded = kv_sim(random_rows(64, 512, seed=3), 64)
    assert torch.equal(bits(unpack_kv(pack_kv(rounded))), bits(rounded))
    # packing is idempotent on its own output
    assert torch.equal(bits(unpack_kv(pack_kv(unpack_kv(pack_kv(rounded))))), bits(rounded))


def test_kv_layout_bytes():
    rows = random_rows(4, 512, seed=5)
    packed = pack_kv(rows)
    # rope dims are the raw little-endian bf16 bytes at offset 448
    assert torch.equal(packed[:, 448:576], rows[:, 448:].contiguous().view(torch.uint8))
    lo, hi = packed[:, 448:576:2].to(torch.int32), packed[:, 449:576:2].to(torch.int32)
    assert torch.equal(((hi << 8) | lo).to(torch.int16), rows[:, 448:].contiguous().view(torch.int16))
    # nope dims: e4m3 codes at offset 0, one ue8m0 scale per 64 dims at 576..582, pad byte 583 zero
    scales = torch.ldexp(torch.ones(4, 7), packed[:, 576:583].to(torch.int32) - 127)
    q = packed[:, :448].contiguous().view(torch.float8_e4m3fn).float().view(4, 7, 64)
    expect = kernels.fp8_simulate(rows[:, :448]).float().view(4, 7, 64)
    assert torch.equal(q * scales.unsqueeze(-1), expect)
    amax = rows[:, :448].float().abs().view(4, 7, 64).amax(-1).clamp(min=1e-4)  # fp8sim64 amax floor
    assert torch.equal(scales, torch.exp2(torch.ceil(torch.log2(amax / 448))))  # 2**ceil(log2(amax/448))
    assert (packed[:, 583] == 0).all()


def test_kv_zero_and_signed_zero_rows():
    rows = torch.zeros(3, 512, dtype=torch.bfloat16)
    rows[1] = -0.0
    packed = pack_kv(rows)
    assert torch.equal(bits(unpack_kv(packed)), bits(rows))
    assert torch.equal(bits(unpack_kv(packed)), bits(kv_sim(rows, 64)))
    # the scale of an all-zero block follows the 1e-4 amax floor: 2**ceil(log2(1e-4/448)) = 2**-22
    assert (packed[:, 576:583] == 127 - 22).all()


def test_index_key_round_trips():
    keys = random_rows(64, 128, seed=7)
    sim = kernels.fp4_simulate(keys)
    out = unpack_index_key(pack_index_key(keys))
    assert out.dtype == torch.bfloat16 and out.shape == (64, 128)
    assert torch.equal(bits(out), bits(sim))
    assert torch.equal(bits(unpack_index_key(pack_index_key(sim))), bits(sim))  # lossless on rounded keys


def test_index_key_layout_bytes():
    # hand-placed values with known e2m1 codes and ue8m0 scales in each 32-block
    keys = torch.zeros(1, 128)
    keys[0, 0], keys[0, 1] = 0.5, -6.0  # block 0: amax 6 -> scale 1; codes 1 (0.5) and 0xF (-6)
    keys[0, 32] = 12.0  # block 1: scale 2, code 7
    keys[0, 65] = 1.0 / 16  # block 2: amax 1/16 -> scale 2**ceil(log2(1/96)) = 2**-6, value 4 -> code 6
    packed = pack_index_key(keys.to(torch.bfloat16))
    assert packed.shape == (1, 68)
    assert packed[0, 0].item() == 0x1 | (0xF << 4)  # low nibble = element 0, high nibble = element 1
    assert packed[0, 16].item() == 0x7  # element 32 in the low nibble of byte 16
    assert packed[0, 32].item() == 0x6 << 4  # element 65: high nibble of byte 32
    word = packed[:, 64:68].contiguous().view(torch.int32).item()  # little-endian, scale k in byte k
    assert [(word >> (8 * k)) & 0xFF for k in range(4)] == [127, 128, 127 - 6, 127 - 126]  # block 3: amax floor
    assert torch.equal(unpack_index_key(packed), keys.to(torch.bfloat16))


def test_index_key_zero_rows():
    keys = torch.zeros(2, 128, dtype=torch.bfloat16)
    keys[1] = -0.0
    assert torch.equal(bits(unpack_index_key(pack_index_key(keys))), bits(keys))


@torch.no_grad()
def test_exact_model_cache_rows_are_lossless():
    args = preset("tiny").replace(head_dim=72, rope_head_dim=8, index_head_dim=64)
    model = to_official_formats(init_weights(Transformer(args, dtype=torch.bfloat16, numerics="exact")))
    cache = model.new_cache(1, 64)
    model(torch.randint(0, args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0)), cache)
    checked = 0
    for layer in cache.layers[: args.n_layers]:
        rows = [layer.window[0]]
        if layer.compressor is not None:
            rows.append(layer.compressor.entries.data[0])
        for r in rows:
            assert r.dtype == torch.bfloat16 and r.abs().amax() > 0
            assert torch.equal(bits(unpack_kv(pack_kv(r, 8), 72, 8)), bits(r))
            checked += 1
        if layer.indexer is not None:
            keys = layer.indexer.entries.data[0]
            assert keys.abs().amax() > 0
            assert torch.equal(bits(unpack_index_key(pack_index_key(keys), 64)), bits(keys))
            checked += 1
    assert checked > args.n_layers


def test_bad_shapes():
    with pytest.raises(ValueError):
        unpack_kv(torch.zeros(2, 583, dtype=torch.uint8))
    with pytest.raises(ValueError):
        pack_kv(torch.zeros(512))
    with pytest.raises(ValueError):
        pack_index_key(torch.zeros(2, 127))
