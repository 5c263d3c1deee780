"""Precision recipes (dsv4.train.precision): the fake quantisers are the checkpoint codecs, gradients pass
straight through, recipes install and uninstall cleanly on a model, and an FP8+FP4-trained model exports
to the official format without changing a single weight.

"Codec round trip" below always means: quantise with dsv4.quant / act_quant, pack the bytes into a
safetensors blob as a checkpoint holds them, read them back, dequantise - so the comparison covers
everything between a training step and a loaded checkpoint.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4.checkpoint.loader import load_model
from dsv4.checkpoint.schema import expected_tensors
from dsv4.config import preset
from dsv4.kernels import act_quant
from dsv4.model import Transformer, init_weights
from dsv4.model.layers import Linear
from dsv4.quant import (
    ACT_AMAX_FLOOR,
    FP4_AMAX_FLOOR,
    dequantize_fp4_weight,
    dequantize_fp8_weight,
    e8m0_to_float,
    fp4_to_fp8_weight,
    quantize_fp4_weight,
    quantize_fp8_weight,
    scale_to_e8m0,
)
from dsv4.train.precision import (
    apply_precision,
    bf16_fake_quant,
    export_quantized,
    fp4_weight_fake_quant,
    fp8_act_fake_quant,
    fp8_weight_fake_quant,
    precision_of,
    remove_precision,
)

# ------------------------------------------------------------------------------------------- codecs


def _through_checkpoint(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Write tensors to a safetensors file and read them back, as a checkpoint save + load does (a file:
    safetensors' in-memory `load` does not know F8_E8M0, its file reader does)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/t.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k).clone() for k in f.keys()}


def _act_codec(x: torch.Tensor) -> torch.Tensor:
    """act_quant -> e4m3 bytes + ue8m0 scales through safetensors -> dequantised fp32."""
    q, s = act_quant(x)
    back = _through_checkpoint(q=q, s=scale_to_e8m0(s))
    scale = e8m0_to_float(back["s"])
    assert torch.equal(scale, s)  # activation scales are powers of two, so ue8m0 holds them exactly
    return back["q"].float() * scale.repeat_interleave(128, dim=-1)[..., : x.shape[-1]]


def _fp8_codec(w: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_fp8_weight(w)
    back = _through_checkpoint(weight=q, scale=scale)
    return dequantize_fp8_weight(back["weight"], back["scale"])


def _fp4_codec(w: torch.Tensor) -> torch.Tensor:
    packed, scale = quantize_fp4_weight(w)
    back = _through_checkpoint(weight=packed, scale=scale)
    assert back["weight"].dtype == torch.int8  # the release's I8 [out, in/2]
    return dequantize_fp4_weight(back["weight"], back["scale"])


def _fp4_fp8_codec(w: torch.Tensor) -> torch.Tensor:
    """MXFP4 codec, then the official FP4 -> FP8 128x128 re-encoding through its own codec."""
    packed, scale = quantize_fp4_weight(w)
    q, s = fp4_to_fp8_weight(packed, scale)
    back = _through_checkpoint(weight=q, scale=s)
    return dequantize_fp8_weight(back["weight"], back["scale"])


# e4m3 neighbours and the midpoints between them (ties go to the even mantissa): normal, top and subnormal
E4M3_TIES = [1.0625, 1.1875, 248.0, 432.0, 2.0**-10, 3 * 2.0**-10, 0.5 + 2.0**-5]
# e2m1 midpoints: 0.25, 0.75, 1.25, 1.75 (range border), 2.5, 3.5 (range border), 5
E2M1_TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]


def _activation_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ties = torch.zeros(2, 128)
    ties[:, 0] = 448.0  # amax 448 exactly: scale 1, so the ties sit on e4m3 midpoints
    ties[0, 1 : 1 + len(E4M3_TIES)] = torch.tensor(E4M3_TIES)
    ties[1, 1 : 1 + len(E4M3_TIES)] = -torch.tensor(E4M3_TIES)
    floor = torch.zeros(4, 256)
    floor[0, :128] = ACT_AMAX_FLOOR  # amax exactly at the floor
    floor[1, :128] = ACT_AMAX_FLOOR / 2  # below it: the floor sets the scale, codes shrink
    floor[1, 5] = 1e-9  # far below: underflows e4m3's subnormals
    floor[2, :128] = ACT_AMAX_FLOOR * (1 + 2.0**-20)  # just above
    floor[3, 128:] = 448.0 * 2.0**-3 * (1 + 2.0**-23)  # one ulp past a power-of-two scale boundary
    floor[3, :128] = 448.0 * 2.0**-3  # on it
    return [
        torch.randn(3, 5, 256, generator=g) * torch.exp(3 * torch.randn(3, 5, 1, generator=g)),
        torch.zeros(2, 384),
        ties,
        floor,
        torch.randn(4, 200, generator=g),  # a partial last block (72 of 128)
        torch.randn(6, 100, generator=g) * 1e3,  # one partial block only
    ]


def test_fp8_act_fake_quant_equals_the_act_quant_codec():
    """Forward of fp8_act_fake_quant == act_quant -> bytes -> dequant, on random and adversarial inputs,
    fp32 and bf16 (the dtype of the official activations)."""
    for x in _activation_cases():
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            got = fp8_act_fake_quant(xd)
            assert got.dtype == dtype
            assert torch.equal(got.float(), _act_codec(xd)), (x.shape, dtype)
    ties = fp8_act_fake_quant(_activation_cases()[2])[0, 1:8].tolist()  # round-to-nearest-even really ran
    assert ties == [1.0, 1.25, 256.0, 448.0, 0.0, 2.0**-8, 0.5]


def _weight_cases_fp8() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    tiles = torch.randn(130, 260, generator=g)  # partial tiles on both dims
    tiles *= torch.exp2(torch.randint(-20, 20, (2, 3), generator=g).float()).repeat_interleave(128, 0)[:130] \
        .repeat_interleave(128, 1)[:, :260]
    special = torch.zeros(256, 256)  # tile (0,0) stays all zero
    special[128:, :128] = 230.0  # amax/scale in (224, 232): rounds to 224, canonical form halves the scale
    special[:128, 128:] = 448.0  # scale 1 with e4m3 midpoints
    special[:7, 129] = torch.tensor(E4M3_TIES)
    special[128:, 128:] = 1e-40  # fp32 subnormals: amax floored at the smallest normal
    return [tiles, special, torch.randn(64, 64, generator=g) * 1e-3]


def test_fp8_weight_fake_quant_equals_the_checkpoint_codec_and_is_a_fixed_point():
    """128x128 FP8 fake quant == quantize_fp8_weight -> safetensors -> dequantize, and applying it again
    changes nothing (what makes the export lossless)."""
    for w in _weight_cases_fp8():
        got = fp8_weight_fake_quant(w)
        assert torch.equal(got, _fp8_codec(w))
        assert torch.equal(fp8_weight_fake_quant(got), got)
        assert torch.equal(quantize_fp8_weight(got)[0].view(torch.uint8), quantize_fp8_weight(w)[0].view(torch.uint8))
    shrunk = _weight_cases_fp8()[1]
    assert float(e8m0_to_float(quantize_fp8_weight(shrunk)[1])[1, 0]) == 0.5  # the canonical case ran


def _weight_cases_fp4() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    groups = torch.randn(64, 96, generator=g) * torch.exp2(torch.randint(-4, 5, (64, 3), generator=g).float()) \
        .repeat_interleave(32, 1)  # group scales spanning 2**8: the FP8 step stays exact
    special = torch.zeros(8, 64)  # row 0 stays zero
    special[1, :32] = 6.0
    special[1, 1 : 1 + len(E2M1_TIES)] = torch.tensor(E2M1_TIES)
    special[1, 32:64] = -torch.tensor(E2M1_TIES * 5)[:32] * 0.5  # ties at scale 0.5, negative
    special[2, :32] = 3.1  # rounds to 3 = 6/2: the canonical form halves the scale
    special[3, :32] = FP4_AMAX_FLOOR  # on the amax floor
    special[4, :32] = FP4_AMAX_FLOOR / 4  # below it
    special[5, :32] = 6.0 * 2.0**-3 * (1 + 2.0**-23)  # one ulp past a scale boundary
    special[6, :32] = -0.01  # negatives that round to -0 in a group of amax 6
    special[6, 0] = 6.0
    return [groups, special]


def test_fp4_weight_fake_quant_equals_the_mxfp4_codec():
    """MXFP4 (1x32 along the input dim) fake quant == quantize_fp4_weight -> I8 bytes + ue8m0 through
    safetensors -> dequantize. Without the FP8 step on every case; the full chain equals the MXFP4 codec
    followed by the FP4 -> FP8 re-encoding codec on every case, and the plain MXFP4 codec on the random
    case, whose 1x32 scales span only 2**8 per tile (the special tile mixes the amax floor with 6, so its
    FP8 step rounds - see the next test)."""
    groups, special = _weight_cases_fp4()
    for w in (groups, special):
        plain = fp4_weight_fake_quant(w, fp8_step=False)
        assert torch.equal(plain, _fp4_codec(w))
        assert torch.equal(fp4_weight_fake_quant(plain, fp8_step=False), plain)
        assert torch.equal(fp4_weight_fake_quant(w), _fp4_fp8_codec(w))
    assert torch.equal(fp4_weight_fake_quant(groups), _fp4_codec(groups))
    ties = fp4_weight_fake_quant(special, fp8_step=False)
    assert ties[1, 1:8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # round-to-nearest-even at scale 1
    assert ties[2, 0].item() == 3.0 and float(e8m0_to_float(quantize_fp4_weight(special)[1])[2, 0]) == 0.5
    assert torch.signbit(ties[6, 1:32]).all() and (ties[6, 1:32] == 0).all()


def test_fp4_chain_fp8_step_is_the_canonical_fp8_quantiser_and_exact_up_to_a_scale_span_of_2_14():
    """The chain's second step (official FP4 -> FP8 re-encoding) equals the canonical FP8 quantiser applied
    to the MXFP4 values, always; it is exact while a tile's 1x32 scales span <= 2**14 and rounds beyond
    (0.5 * 2**-15 next to 6 needs e4m3 2**-10, below its smallest subnormal)."""
    g = torch.Generator().manual_seed(4)
    wild = torch.randn(256, 320, generator=g) * torch.exp(3 * torch.randn(256, 1, generator=g))
    for w in (wild, *_weight_cases_fp4()):
        mx = fp4_weight_fake_quant(w, fp8_step=False)
        assert torch.equal(fp4_weight_fake_quant(w), _fp8_codec(mx))
    assert not torch.equal(fp4_weight_fake_quant(wild), fp4_weight_fake_quant(wild, fp8_step=False))
    for span, exact in ((14, True), (15, False)):
        w = torch.zeros(128, 128)
        w[0, :32] = 6.0
        w[1, 32], w[1, 33] = 6 * 2.0**-span, 0.5 * 2.0**-span
        assert torch.equal(fp4_weight_fake_quant(w), fp4_weight_fake_quant(w, fp8_step=False)) == exact


@pytest.mark.parametrize("name", ["act", "fp8w", "fp4w", "fp4w-nofp8", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_pass_straight_through(name, dtype):
    """d/dx sum(fq(x) * g) == g exactly: the quantiser is the identity in the backward (no clipping mask:
    amax-derived scales never clip)."""
    fq = {"act": fp8_act_fake_quant, "fp8w": fp8_weight_fake_quant, "fp4w": fp4_weight_fake_quant,
          "fp4w-nofp8": lambda t: fp4_weight_fake_quant(t, fp8_step=False), "bf16": bf16_fake_quant}[name]
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(130, 96, generator=g) * 3).to(dtype).requires_grad_()
    upstream = torch.randn(130, 96, generator=g).to(dtype)
    (fq(x) * upstream).sum().backward()
    assert x.grad.dtype == dtype and torch.equal(x.grad, upstream)


# ------------------------------------------------------------------------------------------- recipes


def _args():
    """Tiny with fewer layers and experts, still every mechanism: sliding, CSA (indexer), HCA, hash and
    learned routing, MTP, FP4 experts."""
    return preset("tiny").replace(n_layers=3, n_hash_layers=1, compress_ratios=(0, 4, 8, 0), n_routed_experts=4)


def _model(seed: int = 0) -> Transformer:
    return init_weights(Transformer(_args()), seed=seed)


TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(6))


def _loss(model: Transformer) -> torch.Tensor:
    return F.cross_entropy(model(TOKENS)[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten())


def test_recipes_pick_the_linears_the_official_checkpoint_quantises():
    """fp8 on every FP8/FP4-stored Linear, fp4 QAT on the routed experts only, bf16-stored ones (wo_a,
    compressors, weights_proj, head) untouched; state_dict names unchanged; the forward is the fp32
    matmul of the fake-quantised operands."""
    model = _model()
    keys = list(model.state_dict())
    fp8 = apply_precision(model, "fp8")
    kinds = apply_precision(model, "fp8+fp4")
    assert list(model.state_dict()) == keys
    assert set(fp8) == set(kinds) and set(fp8.values()) == {"fp8"}
    assert {n for n, k in kinds.items() if k == "fp4"} == {n for n in kinds if ".experts." in n}
    for untouched in ("layers.1.attn.wo_a", "layers.1.attn.compressor.wkv", "layers.1.attn.indexer.weights_proj",
                      "head"):
        assert untouched not in kinds
    assert kinds["layers.1.attn.indexer.wq_b"] == "fp8" and kinds["layers.0.ffn.shared_experts.w2"] == "fp8"
    assert len(apply_precision(model, "bf16")) == sum(isinstance(m, Linear) for m in model.modules())
    apply_precision(model, "fp8+fp4")
    expert = model.layers[2].ffn.experts[1].w2
    x = torch.randn(5, expert.in_features)
    want = F.linear(fp8_act_fake_quant(x), fp4_weight_fake_quant(expert.weight))
    assert torch.equal(expert(x), want)
    with pytest.raises(ValueError, match="recipe"):
        apply_precision(model, "fp4")


def test_remove_precision_restores_the_plain_forward_exactly():
    model = _model()
    with torch.no_grad():
        plain = model(TOKENS)
        for recipe in ("bf16", "fp8+fp4"):
            apply_precision(model, recipe)
            assert not torch.equal(model(TOKENS), plain)
            remove_precision(model)
            assert precision_of(model) == {}
            assert torch.equal(model(TOKENS), plain)
        assert apply_precision(model, "fp32") == {} and torch.equal(model(TOKENS), plain)


@pytest.mark.parametrize("recipe", ["bf16", "fp8", "fp8+fp4"])
def test_training_under_a_recipe_lowers_the_loss_on_a_repeated_batch(recipe):
    """Gradients reach the fp32 master weights through the fake quantisers and AdamW makes progress."""
    model = _model()
    apply_precision(model, recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        loss = _loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5, losses
    assert model.layers[0].ffn.experts[0].w1.weight.dtype == torch.float32


def test_fp8_torchao_refuses_without_its_hardware(monkeypatch):
    """No silent fallback: without torchao, CUDA or FP8 tensor cores the recipe raises and installs nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _model()
    with pytest.raises(RuntimeError, match="fp8-torchao"):
        apply_precision(model, "fp8-torchao")
    assert precision_of(model) == {}


# ------------------------------------------------------------------------------------------- export


def test_fp8_fp4_trained_model_exports_losslessly(tmp_path):
    """Train under fp8+fp4, export to the official (converted) layout and load it back.

    Equalities asserted: (1) every FP8/FP4 weight, dequantised from the checkpoint, is bit-equal to the
    fake-quantised training weight; (2) the checkpoint loaded with float weights and the same recipe gives
    bit-equal logits (the fake quantisers are fixed points on their own output); (3) the checkpoint in the
    official exact numerics (real FP8/FP4 GEMMs, packed weights) matches the QAT model run with the same
    KV/indexer simulation up to fp32 summation order (the GEMMs sum per 128 / 32-wide K block, the fake
    quant in one matmul; bit-equal on this machine, asserted to 1e-4). The BF16-stored tensors are rounded
    to bf16 before the export, as any bf16 checkpoint would; that rounding is not part of the recipes."""
    model = _model()
    apply_precision(model, "fp8+fp4")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(2):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, spec in expected_tensors(model.args, "converted").items():
            if spec.dtype == "BF16":
                params[name].copy_(params[name].bfloat16().float())
        out = export_quantized(model, tmp_path / "qat")
        loaded = load_model(out, numerics="plain", dtype=torch.float32)
        kinds = precision_of(model)
        fake = {"fp8": fp8_weight_fake_quant, "fp4": fp4_weight_fake_quant}
        for name, kind in kinds.items():
            trained = fake[kind](model.get_submodule(name).weight)
            assert torch.equal(loaded.get_submodule(name).weight, trained), name
        apply_precision(loaded, "fp8+fp4")
        assert torch.equal(loaded(TOKENS), model(TOKENS))
        exact = load_model(out, numerics="exact", dtype=torch.float32)
        assert exact.layers[0].ffn.experts[0].w1.weight.dtype == torch.int8  # really the packed FP4 path
        model.numerics = "exact"
        torch.testing.assert_close(exact(TOKENS), model(TOKENS), rtol=1e-4, atol=1e-4)


def test_export_refuses_weights_the_checkpoint_cannot_reproduce(tmp_path):
    """FP8-trained experts (the checkpoint stores FP4) and an FP4 weight whose tile scales span 2**15
    (the FP8 step rounded) are reported instead of silently exported."""
    model = _model()
    apply_precision(model, "fp8")
    with pytest.raises(ValueError, match="trained with fp8 weights.*stores fp4"):
        export_quantized(model, tmp_path / "a")
    apply_precision(model, "fp8+fp4")
    with torch.no_grad():
        w = model.layers[0].ffn.experts[0].w1.weight
        w.zero_()
        w[0, :32], w[1, 32], w[1, 33] = 6.0, 6 * 2.0**-15, 0.5 * 2.0**-15
    with pytest.raises(ValueError, match=r"experts\.0\.w1: 1 weights differ"):
        export_quantized(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
