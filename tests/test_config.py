import json

import pytest

from dsv4.config import ConfigError, ModelArgs, preset


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
