"""Official checkpoints: schema, random maker, lazy reader, validation of every kind of damage, loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4.checkpoint.loader import load_model
from dsv4.checkpoint.maker import make_random_checkpoint
from dsv4.checkpoint.reader import INDEX_FILE, Checkpoint, CheckpointError
from dsv4.checkpoint.schema import DTYPES, dtype_histogram, expected_tensors
from dsv4.checkpoint.validate import validate
from dsv4.config import preset
from dsv4.formats import to_official_formats


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset("tiny"), seed=3, shards=3)


@pytest.fixture
def damaged(tiny_ckpt, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may break."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "copy"))


def _shard_of(root: Path, name: str) -> Path:
    return root / json.loads((root / INDEX_FILE).read_text())["weight_map"][name]


def _rewrite(root: Path, name: str, new_name: str | None = None, new_tensor: torch.Tensor | None = None,
             update_index: bool = True) -> None:
    """Replace (or drop, with new_name=None and no tensor) one tensor of a shard, keeping the index consistent."""
    shard = _shard_of(root, name)
    tensors = load_file(str(shard))
    old = tensors.pop(name)
    if new_tensor is not None or new_name is not None:
        tensors[new_name or name] = old if new_tensor is None else new_tensor
    save_file(tensors, str(shard), metadata={"format": "pt"})
    if update_index:
        index = json.loads((root / INDEX_FILE).read_text())
        index["weight_map"].pop(name)
        if new_tensor is not None or new_name is not None:
            index["weight_map"][new_name or name] = shard.name
        (root / INDEX_FILE).write_text(json.dumps(index))


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


# ---------------------------------------------------------------------------------------------- schema, maker


def test_schema_reproduces_the_released_flash_index():
    specs = expected_tensors(preset("flash"))
    assert len(specs) == 69_187
    assert dtype_histogram(specs) == {"BF16": 433, "F32": 417, "F8_E4M3": 375, "F8_E8M0": 34_167, "I8": 33_792,
                                      "I64": 3}
    assert specs["layers.2.attn.compressor.ape"].shape == (4, 1024)  # CSA: overlapping, 2 x head_dim
    assert specs["layers.3.attn.compressor.ape"].shape == (128, 512)  # HCA
    assert specs["layers.0.ffn.experts.0.w1.weight"].shape == (2048, 2048)  # FP4: two per byte
    assert specs["layers.0.ffn.experts.0.w1.scale"].shape == (2048, 128)  # one per 32 inputs
    assert specs["layers.0.attn.wo_a.weight"].dtype == "F8_E4M3"  # download; bf16 after convert
    assert expected_tensors(preset("flash"), "converted")["layers.0.attn.wo_a.weight"].dtype == "BF16"
    assert len(expected_tensors(preset("pro"))) == 145_116
    assert sum(s.parameters for s in specs.values()) == 290_942_289_362


def test_converted_schema_stores_fp4_experts_as_f4():
    """After the official convert: experts float4_e2m1fn_x2 ("F4", logical [out, in] in the header) - the
    same bytes and parameters as the download's I8 [out, in/2]; only wo_a (bf16, no scale) differs."""
    hf, conv = expected_tensors(preset("flash")), expected_tensors(preset("flash"), "converted")
    w1 = conv["layers.0.ffn.experts.0.w1.weight"]
    assert (w1.dtype, w1.shape, w1.torch_shape) == ("F4", (2048, 4096), (2048, 2048))
    assert w1.nbytes == hf[w1.name].nbytes == 2048 * 2048 and w1.parameters == hf[w1.name].parameters == 2048 * 4096
    assert conv["layers.0.ffn.experts.0.w1.scale"] == hf["layers.0.ffn.experts.0.w1.scale"]
    histogram = dtype_histogram(conv)
    assert histogram["F4"] == 33_792 and "I8" not in histogram
    assert sum(s.parameters for s in conv.values()) == sum(s.parameters for s in hf.values()) == 290_942_289_362
    wo_a = [n for n in hf if ".wo_a." in n]
    assert sum(s.nbytes for s in conv.values()) - sum(conv[n].nbytes for n in wo_a if n in conv) == \
        sum(s.nbytes for s in hf.values()) - sum(hf[n].nbytes for n in wo_a)
    fp8_experts = preset("flash").replace(expert_dtype="fp8")  # --expert-dtype fp8: no F4 at all
    assert "F4" not in dtype_histogram(expected_tensors(fp8_experts, "converted"))


def test_converted_random_checkpoint_holds_the_download_bytes(tiny_ckpt, tmp_path):
    conv = make_random_checkpoint(tmp_path / "conv", preset("tiny"), seed=3, shards=2, layout="converted")
    name = "layers.2.ffn.experts.1.w2.weight"
    with Checkpoint(conv) as c, Checkpoint(tiny_ckpt) as h:
        assert validate(c) == "converted"
        dim, inter = c.args.dim, c.args.moe_inter_dim
        assert c.tensors[name].dtype == "F4" and c.tensors[name].shape == (dim, inter)  # w2: [out, in], logical
        packed = c.tensor(name)
        assert packed.dtype == torch.float4_e2m1fn_x2 and packed.shape == (dim, inter // 2)
        for n in c.tensors:
            if ".wo_a." not in n:
                assert torch.equal(_u8(c.tensor(n)), _u8(h.tensor(n))), n
        # slices along either dim (in the header's logical shape) read the same bytes
        assert torch.equal(_u8(c.tensor_slice(name, 0, 4, 12)), _u8(h.tensor(name)[4:12]))
        assert torch.equal(_u8(c.tensor_slice(name, 1, 8, 24).contiguous()), _u8(h.tensor(name)[:, 4:12]))
        with pytest.raises(CheckpointError, match="even bounds"):
            c.tensor_slice(name, 1, 1, 9)
        index = json.loads((conv / INDEX_FILE).read_text())
        assert index["metadata"]["total_size"] == sum(s.nbytes for s in expected_tensors(c.args, "converted").values())


def test_converted_layout_loads_f4_as_the_download_and_saves_it_back(tiny_ckpt, tmp_path):
    from dsv4.checkpoint.saver import save_model

    model = load_model(tiny_ckpt, numerics="exact", dtype=torch.bfloat16)
    out = save_model(model, tmp_path / "conv", layout="converted", shards=2)
    with Checkpoint(out) as c, Checkpoint(tiny_ckpt) as h:
        assert validate(c) == "converted" and c.tensors["layers.0.ffn.experts.3.w1.weight"].dtype == "F4"
        for n in c.tensors:
            if ".wo_a." not in n:
                assert torch.equal(_u8(c.tensor(n)), _u8(h.tensor(n))), n
    again = load_model(out, numerics="exact", dtype=torch.bfloat16)
    expert = again.layers[0].ffn.experts[3].w1
    assert expert.weight.dtype == torch.int8 and expert.weight.shape == (again.args.moe_inter_dim, again.args.dim // 2)
    assert expert.weight.data_ptr() == again.checkpoint.tensor("layers.0.ffn.experts.3.w1.weight").data_ptr()
    a, b = model.state_dict(), again.state_dict()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(_u8(a[name]), _u8(b[name])), name
    resaved = save_model(again, tmp_path / "again", layout="converted", shards=2)
    back = save_model(again, tmp_path / "hf", layout="hf", shards=3)
    for x, y in ((out, resaved), (tiny_ckpt, back)):
        with Checkpoint(x) as cx, Checkpoint(y) as cy:
            assert {n: (t.dtype, t.shape) for n, t in cx.tensors.items()} == \
                {n: (t.dtype, t.shape) for n, t in cy.tensors.items()}
            for n in cx.tensors:
                assert torch.equal(_u8(cx.tensor(n)), _u8(cy.tensor(n))), n


def test_converted_layout_accepts_i8_experts(tiny_ckpt, tmp_path):
    """A converted checkpoint whose experts are still the release's I8 bytes (dsv4 wrote them so before F4)."""
    root = tmp_path / "legacy"
    root.mkdir()
    state = {}
    with Checkpoint(tiny_ckpt) as h:
        model = load_model(tiny_ckpt, numerics="exact", dtype=torch.bfloat16)
        for name in expected_tensors(h.args, "converted"):
            state[name] = h.tensor(name) if ".wo_a." not in name else model.state_dict()[name].to(torch.bfloat16)
    save_file(state, str(root / "model0-mp1.safetensors"), metadata={"format": "pt", "dsv4_layout": "converted"})
    shutil.copy(tiny_ckpt / "config.json", root / "config.json")
    with Checkpoint(root) as ckpt:
        assert ckpt.tensors["layers.0.ffn.experts.0.w1.weight"].dtype == "I8" and validate(ckpt) == "converted"
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(load_model(root)(tokens), model(tokens))


def test_maker_writes_the_release_layout(tiny_ckpt):
    names = sorted(p.name for p in tiny_ckpt.iterdir())
    assert names == sorted(["config.json", INDEX_FILE, "model-00001-of-00003.safetensors",
                            "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"])
    with Checkpoint(tiny_ckpt) as ckpt:
        assert validate(ckpt) == "hf"
        assert ckpt.args == preset("tiny").replace(max_seq_len=ckpt.args.max_seq_len)
        specs = expected_tensors(ckpt.args)
        assert list(ckpt.tensors) != [] and set(ckpt.tensors) == set(specs)
        for name, spec in specs.items():
            assert ckpt.tensors[name].dtype == spec.dtype and ckpt.tensors[name].shape == spec.shape
        # FP4: low nibble is the even element; values decode inside the e2m1 grid; scales are powers of two
        packed = ckpt.tensor("layers.2.ffn.experts.1.w2.weight")
        assert packed.dtype == torch.int8
        index = json.loads((tiny_ckpt / INDEX_FILE).read_text())
        assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs.values())


def test_maker_is_deterministic_and_independent_of_sharding(tmp_path):
    a = make_random_checkpoint(tmp_path / "a", preset("tiny"), seed=5, shards=1)
    b = make_random_checkpoint(tmp_path / "b", preset("tiny"), seed=5, shards=4)
    c = make_random_checkpoint(tmp_path / "c", preset("tiny"), seed=6, shards=1)
    with Checkpoint(a) as ca, Checkpoint(b) as cb, Checkpoint(c) as cc:
        assert len(cb.files) == 4 and len(ca.files) == 1
        for name in ca.tensors:
            assert torch.equal(_u8(ca.tensor(name)), _u8(cb.tensor(name)))
        assert not torch.equal(ca.tensor("embed.weight"), cc.tensor("embed.weight"))


# ---------------------------------------------------------------------------------------------- loading


def test_exact_load_keeps_official_formats_memory_mapped(tiny_ckpt):
    model = load_model(tiny_ckpt, numerics="exact", dtype=torch.bfloat16)
    ckpt = model.checkpoint
    wq_a = model.layers[1].attn.wq_a
    assert wq_a.weight.dtype == torch.float8_e4m3fn and wq_a.scale.dtype == torch.float8_e8m0fnu
    assert wq_a.weight.data_ptr() == ckpt.tensor("layers.1.attn.wq_a.weight").data_ptr()  # zero-copy
    expert = model.layers[0].ffn.experts[3].w1
    assert expert.weight.dtype == torch.int8 and expert.scale.shape == (32, 2)
    assert model.layers[0].attn.wo_a.weight.dtype == torch.bfloat16  # dequantised at load
    wo_a = ckpt.tensor("layers.0.attn.wo_a.weight").float() * \
        ckpt.tensor("layers.0.attn.wo_a.scale").float().repeat_interleave(128, 0)[:32].repeat_interleave(128, 1)[:, :64]
    assert torch.equal(model.layers[0].attn.wo_a.weight.float(), wo_a)
    assert torch.equal(model.layers[0].ffn.gate.tid2eid, ckpt.tensor("layers.0.ffn.gate.tid2eid"))
    tokens = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, 19, 256) and bool(logits.isfinite().all()) and float(logits.std()) > 0.1


@torch.no_grad()
def test_exact_load_equals_plain_load_requantised(tiny_ckpt):
    """Two independent paths to the official numerics agree bit for bit: keeping the stored FP8/FP4
    tensors, and dequantising to bf16 then re-quantising with dsv4's formats."""
    exact = load_model(tiny_ckpt, numerics="exact", dtype=torch.bfloat16)
    via_plain = to_official_formats(load_model(tiny_ckpt, numerics="plain", dtype=torch.bfloat16))
    via_plain.numerics = "exact"
    a, b = exact.state_dict(), via_plain.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(_u8(a[name]), _u8(b[name])), name
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(exact(tokens), via_plain(tokens))
    plain = load_model(tiny_ckpt, numerics="plain", dtype=torch.float32)
    assert plain.layers[1].attn.wq_a.weight.dtype == torch.float32 and plain.layers[1].attn.wq_a.scale is None
    assert not torch.allclose(plain(tokens), exact(tokens).float(), atol=1e-3)  # the numerics do differ


def test_single_file_and_file_path(tiny_ckpt, tmp_path):
    root = tmp_path / "single"
    root.mkdir()
    with Checkpoint(tiny_ckpt) as ckpt:
        save_file({n: ckpt.tensor(n).contiguous() for n in ckpt.tensors}, str(root / "model.safetensors"))
    shutil.copy(tiny_ckpt / "config.json", root / "config.json")
    for path in (root, root / "model.safetensors"):
        with Checkpoint(path) as ckpt:
            assert validate(ckpt) == "hf" and len(ckpt.tensors) == len(expected_tensors(ckpt.args))


def test_inference_config_sets_runtime_limits_and_must_agree(damaged):
    (damaged / "inference").mkdir()
    ref = preset("tiny").to_dict() | {"max_seq_len": 1024}
    (damaged / "inference" / "config.json").write_text(json.dumps(ref))
    with Checkpoint(damaged) as ckpt:
        assert ckpt.args.max_seq_len == 1024
    ref["n_heads"] = 2
    (damaged / "inference" / "config.json").write_text(json.dumps(ref))
    with pytest.raises(CheckpointError, match="disagree on n_heads"):
        Checkpoint(damaged)


@torch.no_grad()
def test_inference_dialect_config_at_the_root(damaged, shared_dir):
    """A checkpoint directory whose `config.json` is the inference code's dialect (the released Flash
    inference config's keys, with the tiny preset's values): the same args, the same logits."""
    hf_args = Checkpoint(damaged).args
    tokens = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(4))
    hf_logits = load_model(damaged, numerics="exact", dtype=torch.bfloat16)(tokens)
    released = json.loads((shared_dir / "golden" / "config_flash_inference.json").read_text())
    tiny = preset("tiny").to_dict()
    (damaged / "config.json").write_text(json.dumps({key: tiny[key] for key in released}, indent=4))
    with Checkpoint(damaged) as ckpt:
        assert ckpt.args == hf_args and ckpt.hf_config == {}
        assert validate(ckpt) == "hf"
    assert torch.equal(load_model(damaged, numerics="exact", dtype=torch.bfloat16)(tokens), hf_logits)


def test_inference_dialect_config_at_the_root_with_an_inference_config(damaged):
    """Both files in the inference dialect: they must agree, and the inference/ one sets the runtime fields."""
    root_config = {k: v for k, v in preset("tiny").to_dict().items() if k not in ("max_seq_len", "scale_dtype")}
    (damaged / "config.json").write_text(json.dumps(root_config))
    (damaged / "inference").mkdir()
    (damaged / "inference" / "config.json").write_text(json.dumps(root_config | {"max_seq_len": 512,
                                                                                 "scale_dtype": "fp32"}))
    with Checkpoint(damaged) as ckpt:
        assert ckpt.args == preset("tiny").replace(max_seq_len=512, scale_dtype="fp32")
    (damaged / "inference" / "config.json").write_text(json.dumps(root_config | {"dim": 128}))
    with pytest.raises(CheckpointError, match="disagree on dim"):
        Checkpoint(damaged)


def test_config_in_neither_dialect(damaged):
    (damaged / "config.json").write_text(json.dumps({"d_model": 64, "num_layers": 5, "vocab_size": 256}))
    with pytest.raises(CheckpointError, match="invalid config: config is in neither dialect") as err:
        Checkpoint(damaged)
    assert "hidden_size" in str(err.value) and "n_layers" in str(err.value)


# ---------------------------------------------------------------------------------------------- damage


def test_missing_unexpected_misshaped_mistyped_are_all_listed_at_once(damaged):
    _rewrite(damaged, "layers.1.attn.wq_a.scale")  # missing
    _rewrite(damaged, "layers.2.attn.kv_norm.weight", new_name="layers.2.attn.kv_norm.bias")  # renamed
    _rewrite(damaged, "layers.3.attn.attn_sink", new_tensor=torch.zeros(5))  # shape
    _rewrite(damaged, "norm.weight", new_tensor=torch.ones(64))  # F32 instead of BF16
    with Checkpoint(damaged) as ckpt, pytest.raises(CheckpointError) as err:
        validate(ckpt)
    text = str(err.value)
    assert "4 problems" not in text  # the rename is two problems: a missing and an unexpected tensor
    assert "5 problems" in text
    assert "missing layers.1.attn.wq_a.scale [1, 1] F8_E8M0" in text
    assert "missing layers.2.attn.kv_norm.weight" in text
    assert "unexpected layers.2.attn.kv_norm.bias" in text
    assert "layers.3.attn.attn_sink" in text and "shape [5], expected [4]" in text
    assert "norm.weight" in text and "dtype F32, expected BF16" in text
    with pytest.raises(CheckpointError, match="wq_a.scale"):
        load_model(damaged)


def test_truncated_shard_is_named(damaged):
    shard = _shard_of(damaged, "embed.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=shard.name) as err:
        Checkpoint(damaged)
    assert "damaged" in str(err.value)


def test_corrupt_header_is_named(damaged):
    shard = _shard_of(damaged, "head.weight")
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!!!"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=shard.name):
        Checkpoint(damaged)


def test_bad_index_files(damaged):
    index = damaged / INDEX_FILE
    good = index.read_text()
    index.write_text(good[:100])
    with pytest.raises(CheckpointError, match="not readable JSON"):
        Checkpoint(damaged)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        Checkpoint(damaged)
    data = json.loads(good)
    data["weight_map"]["embed.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="model-00009-of-00009.safetensors .*does not exist"):
        Checkpoint(damaged)
    data = json.loads(good)
    shard_of_head = data["weight_map"]["head.weight"]
    data["weight_map"]["head.weight"] = next(v for v in data["weight_map"].values() if v != shard_of_head)
    data["weight_map"]["ghost.weight"] = shard_of_head
    del data["weight_map"]["norm.weight"]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(damaged)
    text = str(err.value)
    assert "head.weight: index says" in text and "ghost.weight: listed in" in text
    assert "norm.weight: stored in" in text and "missing from" in text


def test_config_that_does_not_match_the_tensors(damaged):
    config = json.loads((damaged / "config.json").read_text())
    config["n_routed_experts"] = 4
    (damaged / "config.json").write_text(json.dumps(config))
    with Checkpoint(damaged) as ckpt, pytest.raises(CheckpointError) as err:
        validate(ckpt)
    text = str(err.value)
    assert "unexpected layers.0.ffn.experts.4.w1.weight" in text
    assert "layers.0.ffn.gate.weight" in text and "shape [8, 64], expected [4, 64]" in text


def test_missing_or_invalid_config(damaged):
    config = damaged / "config.json"
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not readable JSON"):
        Checkpoint(damaged)
    config.write_text(json.dumps(preset("tiny").to_hf_config() | {"num_hidden_layers": 0}))
    with pytest.raises(CheckpointError, match="invalid config.*n_layers"):
        Checkpoint(damaged)
    config.unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(damaged)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        Checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        Checkpoint(tmp_path / "notes.txt")


def test_stored_dtype_names_cover_the_release():
    assert {"F8_E4M3", "F8_E8M0", "BF16", "F32", "I8", "I64"} <= set(DTYPES)
    assert DTYPES["F4"] == torch.float4_e2m1fn_x2  # what the official convert.py writes the experts as


# ---------------------------------------------------------------------------------------------- saving


def test_load_then_save_reproduces_the_checkpoint_bit_for_bit(tiny_ckpt, tmp_path):
    from dsv4.checkpoint.saver import save_model

    model = load_model(tiny_ckpt, numerics="exact", dtype=torch.bfloat16)
    out = save_model(model, tmp_path / "resaved", shards=2)
    with Checkpoint(tiny_ckpt) as a, Checkpoint(out) as b:
        assert validate(b) == "hf" and a.tensors.keys() == b.tensors.keys()
        for name in a.tensors:  # incl. wo_a, dequantised at load and re-quantised to FP8 here
            assert a.tensors[name].dtype == b.tensors[name].dtype
            assert torch.equal(_u8(a.tensor(name)), _u8(b.tensor(name))), name


@torch.no_grad()
def test_saving_a_float_model_quantises_with_the_official_formats(tmp_path):
    from dsv4.checkpoint.saver import save_model
    from dsv4.model import Transformer, init_weights
    from dsv4.quant import dequantize_fp8_weight, quantize_fp8_weight

    trained = init_weights(Transformer(preset("tiny")), seed=4)  # fp32, plain: what training produces
    out = save_model(trained, tmp_path / "export", layout="converted")
    with Checkpoint(out) as ckpt:
        assert validate(ckpt) == "converted"
    loaded = load_model(out, numerics="plain", dtype=torch.float32)
    wq_b = trained.layers[2].attn.wq_b.weight
    assert torch.equal(loaded.layers[2].attn.wq_b.weight, dequantize_fp8_weight(*quantize_fp8_weight(wq_b)))
    assert torch.equal(loaded.layers[2].attn.wo_a.weight, trained.layers[2].attn.wo_a.weight.bfloat16().float())
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    ref, got = trained(tokens).flatten(), loaded(tokens).flatten()
    other = init_weights(Transformer(preset("tiny")), seed=5)(tokens).flatten()
    # only weight quantisation (FP4 experts: ~10% per weight) separates the two; another model is unrelated
    assert float(torch.corrcoef(torch.stack([ref, got]))[0, 1]) > 0.9
    assert abs(float(torch.corrcoef(torch.stack([ref, other]))[0, 1])) < 0.3
