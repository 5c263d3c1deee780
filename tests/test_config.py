import json

import pytest

from dsv4.config import ConfigError, ModelArgs, config_dialect, preset


def test_released_flash_configs_agree(shared_dir):
    hf = ModelArgs.from_hf_config(shared_dir / "golden" / "config_flash_hf.json")
    ref = ModelArgs.from_dict(json.loads((shared_dir / "golden" / "config_flash_inference.json").read_text()))
    assert hf == ref
    assert hf == preset("flash")
    assert hf.compress_ratios[:4] == (0, 0, 4, 128) and hf.compress_ratios[-1] == 0
    assert (hf.rope_factor, hf.original_seq_len, hf.expert_dtype) == (16, 65536, "fp4")


def test_hf_dialect_round_trip():
    for name in ("flash", "pro", "tiny", "small", "nano"):
        args = preset(name)
        assert ModelArgs.from_hf_config(args.to_hf_config()).replace(
            max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size) == args


def test_pro_schedule():
    pro = preset("pro")
    ratios = pro.compress_ratios
    assert len(ratios) == 62 and ratios[:2] == (128, 128) and ratios[-1] == 0
    assert ratios.count(4) == 30 and ratios.count(128) == 31


@pytest.mark.parametrize("changes, field", [
    ({"dim": 0}, "dim"),
    ({"n_heads": 5}, "o_groups"),
    ({"compress_ratios": (0, 4)}, "compress_ratios"),
    ({"score_func": "relu"}, "score_func"),
    ({"index_head_dim": 96}, "index_head_dim"),
    ({"n_activated_experts": 9}, "n_activated_experts"),
    ({"rope_head_dim": 7}, "rope_head_dim"),
    ({"expert_dtype": "int4"}, "expert_dtype"),
])
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"ModelArgs\.{field}="):
        preset("tiny").replace(**changes)


def test_unknown_fields_and_presets():
    with pytest.raises(ConfigError, match="unknown ModelArgs fields: dimm"):
        ModelArgs.from_dict({"dimm": 3})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="model_type"):
        ModelArgs.from_hf_config({"model_type": "llama"})


# the fields of the official inference `ModelArgs` (inference/model.py of deepseek-ai/DeepSeek-V4-Flash, the same at
# every official revision from 2b88d47 to 60d8d70): every one is a key `ModelArgs.from_dict` must accept
OFFICIAL_FIELDS = (
    "max_batch_size max_seq_len dtype scale_fmt expert_dtype scale_dtype vocab_size dim moe_inter_dim n_layers "
    "n_hash_layers n_mtp_layers n_heads n_routed_experts n_shared_experts n_activated_experts score_func route_scale "
    "swiglu_limit q_lora_rank head_dim rope_head_dim norm_eps o_groups o_lora_rank window_size compress_ratios "
    "compress_rope_theta original_seq_len rope_theta rope_factor beta_fast beta_slow index_n_heads index_head_dim "
    "index_topk hc_mult hc_sinkhorn_iters hc_eps"
).split()


def _golden_inference(shared_dir) -> dict:
    return json.loads((shared_dir / "golden" / "config_flash_inference.json").read_text())


def test_every_official_field_is_accepted():
    flash = preset("flash").to_dict()
    assert ModelArgs.from_dict({name: flash[name] for name in OFFICIAL_FIELDS}) == preset("flash")


@pytest.mark.parametrize("name", ["flash", "pro", "tiny", "small", "nano"])
def test_to_dict_and_from_dict_are_inverse(name):
    for args in (preset(name), preset(name).replace(scale_dtype="fp32", max_seq_len=8192, max_batch_size=2)):
        assert ModelArgs.from_dict(json.loads(json.dumps(args.to_dict()))) == args


@pytest.mark.parametrize("scale_dtype", ["fp32", "fp8"])
def test_scale_dtype_is_accepted(shared_dir, scale_dtype):
    """The official default is "fp8" (the released inference config leaves it out); "fp32" only changes how the
    official kernels store the power-of-two activation scales, so the rest of the args is the released model."""
    args = ModelArgs.from_config(_golden_inference(shared_dir) | {"scale_dtype": scale_dtype})
    assert args.scale_dtype == scale_dtype
    assert args.replace(scale_dtype="fp8") == preset("flash")
    assert preset("tiny").replace(scale_dtype=scale_dtype, scale_fmt="ue8m0").scale_dtype == scale_dtype


def test_bad_or_unimplemented_scale_dtype_names_the_field(shared_dir):
    with pytest.raises(ConfigError, match=r"ModelArgs\.scale_dtype='bf16': must be 'fp32' or 'fp8'"):
        ModelArgs.from_dict(_golden_inference(shared_dir) | {"scale_dtype": "bf16"})
    # fp32 scales without ue8m0 rounding: the official act_quant then uses amax/448, not a power of two
    with pytest.raises(ConfigError, match=r"ModelArgs\.scale_dtype='fp32'.*not powers of two"):
        preset("tiny").replace(scale_dtype="fp32", scale_fmt=None)
    assert preset("tiny").replace(scale_fmt=None).scale_dtype == "fp8"  # fp8 scales force ue8m0: implemented


def test_released_configs_parse_by_dialect(shared_dir):
    """Both released Flash configs, read from the shared golden files by `from_config` (path or dict)."""
    golden = shared_dir / "golden"
    hf_path, ref_path = golden / "config_flash_hf.json", golden / "config_flash_inference.json"
    assert config_dialect(json.loads(hf_path.read_text())) == "hf"
    assert config_dialect(json.loads(ref_path.read_text())) == "inference"
    assert ModelArgs.from_config(hf_path) == ModelArgs.from_config(json.loads(ref_path.read_text())) == preset("flash")
    # transformers >= 4.56 writes `dtype` in place of `torch_dtype`: still the HF dialect
    assert config_dialect(json.loads(hf_path.read_text()) | {"dtype": "bfloat16"}) == "hf"


@pytest.mark.parametrize("config", [{}, {"vocab_size": 256, "compress_ratios": [0]}, {"dtype": "fp8"},
                                    {"architecture": "llama", "d_model": 64}])
def test_config_in_neither_dialect_is_a_clear_error(config):
    with pytest.raises(ConfigError, match="neither dialect") as err:
        ModelArgs.from_config(config)
    assert "hidden_size, num_hidden_layers" in str(err.value) and "dim, n_layers" in str(err.value)


def test_config_mixing_the_dialects_is_a_clear_error(shared_dir):
    mixed = _golden_inference(shared_dir) | {"hidden_size": 4096, "model_type": "deepseek_v4"}
    with pytest.raises(ConfigError, match=r"mixes Hugging Face keys \(hidden_size, model_type\) with inference keys"):
        ModelArgs.from_config(mixed)
