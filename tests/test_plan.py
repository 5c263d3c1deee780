"""`dsv4 plan`: the deployment arithmetic reproduces spec §4.3 and rejects bad input."""

import json

import pytest

from dsv4.cli import main
from dsv4.config import preset
from dsv4.plan import (
    GIB,
    V32,
    flops_per_token,
    gpus_needed,
    kv_entry_bytes,
    kv_plan,
    v32_reference,
    weights_plan,
)

L = 1_048_576  # the spec's context


# ---------------------------------------------------------------------- spec §4.2 entry formats
def test_entry_bytes_match_the_production_formats():
    assert kv_entry_bytes(preset("pro"), "fp8") == (584, 68)
    assert kv_entry_bytes(preset("flash"), "bf16") == (512 * 2, 128 * 2)
    assert V32().kv_entry_bytes("fp8") == (656, 132)
    assert V32().kv_entry_bytes("bf16") == (576 * 2, 128 * 2)


# ---------------------------------------------------------------------- spec §4.3 KV table
@pytest.mark.parametrize("name, kv_format, v4, v32, pct, gib", [
    ("pro", "fp8", 5031, 48068, 10.5, 4.91),
    ("pro", "bf16", 9848, 85888, 11.5, 9.62),
    ("flash", "fp8", 3514, 48068, 7.3, 3.43),
    ("flash", "bf16", 6880, 85888, 8.0, 6.72),
])
def test_kv_bytes_per_token_reproduce_the_spec(name, kv_format, v4, v32, pct, gib):
    plan = kv_plan(preset(name), L, 1, kv_format)
    ref = v32_reference(L, 1, kv_format)
    assert round(plan.bytes_per_token) == v4
    assert ref.bytes_per_token == v32
    assert round(100 * plan.bytes_per_token / ref.bytes_per_token, 1) == pct
    assert round(plan.bytes_per_token * L / GIB, 2) == gib


def test_v32_kv_memory_at_1m_tokens():
    assert round(v32_reference(L, 1, "fp8").total_bytes / GIB, 1) == 46.9
    assert round(v32_reference(L, 1, "bf16").total_bytes / GIB, 1) == 83.9


def test_layer_types_and_constant_state_of_pro():
    plan = kv_plan(preset("pro"), L, 1, "fp8")
    rows = {r.kind: r for r in plan.rows}
    assert (rows["SWA-only"].layers, rows["CSA"].layers, rows["HCA"].layers) == (0, 30, 31)
    assert rows["CSA"].bytes_per_token_per_layer + rows["CSA indexer"].bytes_per_token_per_layer == 163
    assert round(rows["HCA"].bytes_per_token_per_layer, 2) == 4.56
    # spec: ring 128 x 584 B per layer, HCA state 512 KiB, CSA 64 + indexer 16 KiB: ~23 MB, < 0.5 % of the cache
    assert rows["HCA"].state_bytes == 128 * 584 + 512 * 1024
    assert rows["CSA"].state_bytes + rows["CSA indexer"].state_bytes == 128 * 584 + 80 * 1024
    assert 23e6 < plan.state_bytes_per_sequence < 23.5e6
    assert plan.state_bytes_per_sequence < 0.005 * plan.growing_bytes_per_sequence
    assert plan.growing_bytes_per_sequence == plan.bytes_per_token * L  # L is a multiple of 128


# ---------------------------------------------------------------------- spec §4.3 FLOPs table
def _g(x: float) -> float:
    return round(x / 1e9, 1)


def test_flops_per_token_reproduce_the_spec():
    pro, flash, v32 = flops_per_token(preset("pro"), L), flops_per_token(preset("flash"), L), v32_reference(L).flops
    assert (_g(v32.linear), _g(v32.attention_total), _g(v32.indexer), _g(v32.total)) == (72.1, 34.8, 1048.0, 1154.9)
    assert (_g(pro.linear), _g(pro.attention["CSA"]), _g(pro.attention["HCA"]), _g(pro.indexer)) == (
        97.7, 9.1, 67.6, 128.8)
    assert _g(pro.total) == 303.2 and round(100 * pro.total / v32.total, 1) == 26.3
    assert (_g(flash.linear), _g(flash.attention["CSA"]), _g(flash.attention["HCA"]), _g(flash.indexer)) == (
        26.5, 1.8, 21.8, 90.2)
    # the spec's 12.1 % divides the rounded totals (140.3 / 1154.9); unrounded it is 12.15 %
    assert _g(flash.total) == 140.3 and abs(100 * flash.total / v32.total - 12.1) < 0.06


def test_parameter_counts_match_spec_2_3():
    pro, flash = weights_plan(preset("pro")), weights_plan(preset("flash"))
    assert pro.params_total == 1_598_837_347_742 and flash.params_total == 290_942_289_362
    assert round(pro.params_active / 1e9, 2) == 49.78 and round(flash.params_active / 1e9, 2) == 13.80
    assert weights_plan(preset("pro"), "converted").bytes_total > pro.bytes_total  # wo_a in bf16
    assert weights_plan(preset("pro"), "converted").params_total == pro.params_total


# ---------------------------------------------------------------------- properties
@pytest.mark.parametrize("name", ["nano", "tiny", "small", "flash"])
def test_kv_total_is_linear_in_batch_and_grows_with_context(name):
    args = preset(name)
    one = kv_plan(args, 5000, 1)
    for batch in (2, 3, 17):
        assert kv_plan(args, 5000, batch).total_bytes == batch * one.total_bytes
    sizes = [kv_plan(args, n).bytes_per_sequence for n in range(1, 600, 7)]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]


@pytest.mark.parametrize("name", ["nano", "tiny", "small", "flash"])
def test_flops_grow_with_position(name):
    args = preset(name)
    totals = [flops_per_token(args, p).total for p in range(1, 3000, 13)]
    assert totals == sorted(totals)
    assert flops_per_token(args, 4096).total > flops_per_token(args, 2048).total


def test_v32_grows_with_context_too():
    assert v32_reference(4096).flops.total > v32_reference(2048).flops.total
    assert v32_reference(100, batch=3).total_bytes == 3 * 100 * 48068


def test_gpus_needed_rounds_up_after_headroom():
    usable = 80 * GIB * 0.9
    assert gpus_needed(usable, 80, 0.1) == 1
    assert gpus_needed(usable + 1, 80, 0.1) == 2
    assert gpus_needed(0, 80) == 1
    with pytest.raises(ValueError, match="GPU memory"):
        gpus_needed(1, 0)
    with pytest.raises(ValueError, match="headroom"):
        gpus_needed(1, 80, 1.0)


def test_api_rejects_bad_input():
    with pytest.raises(ValueError, match="context"):
        kv_plan(preset("tiny"), 0)
    with pytest.raises(ValueError, match="KV format"):
        kv_plan(preset("tiny"), 10, 1, "fp16")
    with pytest.raises(ValueError, match="position"):
        flops_per_token(preset("tiny"), 0)


# ---------------------------------------------------------------------- CLI
def test_plan_command_prints_the_spec_figures(capsys):
    assert main(["plan", "pro", "--gpu-memory", "141"]) == 0
    out = capsys.readouterr().out
    for text in ("5,031.44", "48,068", "10.5%", "303.2 G", "1,154.9 G", "26.3%", "4.94 GiB", "7 GPUs"):
        assert text in out, text
    assert main(["plan", "pro", "--kv-format", "bf16", "--compare", "none"]) == 0
    out = capsys.readouterr().out
    assert "9,848" in out and "V3.2" not in out
    assert main(["plan", "flash", "--kv-format", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "6,880" in out and "85,888" in out and "8.0%" in out and "140.3 G" in out


def test_plan_reads_a_checkpoint_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(preset("flash").to_hf_config()))
    assert main(["plan", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3,514.25" in out and "140.3 G" in out


def _usage_error(capsys, argv: list[str]) -> str:
    """The message of a rejected command line: status 2 from `run` or from argparse."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    return capsys.readouterr().err


def test_plan_rejects_bad_input(tmp_path, capsys):
    assert "unknown preset 'huge'" in _usage_error(capsys, ["plan", "huge"])
    assert "does not exist" in _usage_error(capsys, ["plan", str(tmp_path / "missing")])
    assert "no config.json" in _usage_error(capsys, ["plan", str(tmp_path)])
    (tmp_path / "config.json").write_text("{not json")
    assert "not readable JSON" in _usage_error(capsys, ["plan", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "invalid config" in _usage_error(capsys, ["plan", str(tmp_path)])
    err = _usage_error(capsys, ["plan", "tiny", "--context", "0"])
    assert "--context" in err and "must be >= 1" in err
    assert "--kv-format" in _usage_error(capsys, ["plan", "tiny", "--kv-format", "fp16"])
    for bad in ("0", "-80", "abc"):
        assert "--gpu-memory" in _usage_error(capsys, ["plan", "tiny", "--gpu-memory", bad])
    assert "--headroom" in _usage_error(capsys, ["plan", "tiny", "--gpu-memory", "80", "--headroom", "1"])
