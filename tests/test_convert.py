"""`dsv4 convert`: per-rank model-parallel files, plain exports, re-quantisation, merging - all bit-exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv4.checkpoint.convert import convert
from dsv4.checkpoint.inspect import summarize_checkpoint
from dsv4.checkpoint.loader import load_model
from dsv4.checkpoint.maker import make_random_checkpoint
from dsv4.checkpoint.reader import INDEX_FILE, Checkpoint, CheckpointError
from dsv4.checkpoint.schema import FP8_TILE, expected_tensors
from dsv4.checkpoint.validate import FLOAT_KEY, LAYOUT_KEY, validate
from dsv4.cli import main
from dsv4.config import preset
from dsv4.parallel.rules import ShardingError, split_for_rank
from dsv4.quant import dequantize_fp4_weight, dequantize_fp8_weight


def mp_args():
    """Dims of 128-multiples, so the FP8 tiles split 2 ways."""
    return preset("tiny").replace(dim=256, head_dim=128, rope_head_dim=32, n_heads=4, o_groups=2, o_lora_rank=128,
                                  q_lora_rank=128, index_n_heads=4, index_head_dim=64, moe_inter_dim=128,
                                  vocab_size=512)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: thread start-up would dominate (and be slow on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    root = make_random_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", preset("tiny"), seed=7, shards=2)
    (root / "tokenizer.json").write_text('{"model": "stand-in"}')
    (root / "generation_config.json").write_text('{"temperature": 1.0}')
    (root / "encoding").mkdir()
    (root / "encoding" / "encoding_dsv4.py").write_text("# chat template\n")
    return root


@pytest.fixture(scope="module")
def mp_hf(tmp_path_factory) -> Path:
    root = make_random_checkpoint(tmp_path_factory.mktemp("mp") / "hf", mp_args(), seed=11, shards=3)
    (root / "tokenizer.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def mp2(mp_hf, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("mp2") / "mp2"
    convert(mp_hf, dst, "mp", world_size=2)
    return dst


@pytest.fixture(scope="module")
def mp_converted(mp_hf, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("conv") / "converted"
    convert(mp_hf, dst, "official", layout="converted")
    return dst


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def assert_same_tensors(a: Path, b: Path) -> None:
    """Same names, dtypes, shapes and bytes."""
    with Checkpoint(a) as ca, Checkpoint(b) as cb:
        assert set(ca.tensors) == set(cb.tensors)
        for name in ca.tensors:
            x, y = ca.tensor(name), cb.tensor(name)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(_u8(x), _u8(y)), name


def _metadata(root: Path, rank: int | None = None) -> dict:
    with Checkpoint(root, rank=rank) as ckpt:
        return next(iter(ckpt.metadata.values()))


# ---------------------------------------------------------------------------------------------- plain exports


@pytest.mark.parametrize("to,float_dtype", [("bf16", "BF16"), ("fp32", "F32")])
def test_plain_export_and_back_is_bit_exact(tiny_hf, tmp_path, to, float_dtype):
    plain = tmp_path / "plain"
    result = convert(tiny_hf, plain, to)
    assert result.layout == "plain" and result.float_dtype == float_dtype
    with Checkpoint(plain) as ckpt, Checkpoint(tiny_hf) as src:
        assert validate(ckpt) == "plain"
        assert ckpt.args == src.args  # the config keeps the official quantisation
        assert ckpt.hf_config["quantization_config"]["quant_method"] == "fp8"
        assert ckpt.hf_config["expert_dtype"] == "fp4"
        assert next(iter(ckpt.metadata.values()))[FLOAT_KEY] == float_dtype
        # dequantised exactly: FP8 (incl. wo_a) and FP4 values times their power-of-two scales
        for prefix in ("layers.1.attn.wq_b", "layers.0.attn.wo_a", "mtp.0.e_proj"):
            want = dequantize_fp8_weight(src.tensor(f"{prefix}.weight"), src.tensor(f"{prefix}.scale"))
            assert torch.equal(ckpt.tensor(f"{prefix}.weight").float(), want) and f"{prefix}.scale" not in ckpt
        expert = "layers.3.ffn.experts.5.w2"
        want = dequantize_fp4_weight(src.tensor(f"{expert}.weight"), src.tensor(f"{expert}.scale"))
        assert torch.equal(ckpt.tensor(f"{expert}.weight").float(), want)
        assert ckpt.tensor("layers.1.attn.attn_sink").dtype == torch.float32  # F32 stays F32
        assert ckpt.tensor("embed.weight").dtype == getattr(torch, {"BF16": "bfloat16", "F32": "float32"}[float_dtype])
    for aux in ("tokenizer.json", "generation_config.json", "encoding/encoding_dsv4.py"):
        assert (plain / aux).read_text() == (tiny_hf / aux).read_text()

    back = tmp_path / "official"
    result = convert(plain, back, "official")
    assert result.layout == "hf"
    with Checkpoint(back) as ckpt:
        assert validate(ckpt) == "hf"
    assert_same_tensors(tiny_hf, back)
    assert json.loads((back / "config.json").read_text()) == json.loads((tiny_hf / "config.json").read_text())


@torch.no_grad()
def test_model_from_plain_export_gives_identical_logits(tiny_hf, tmp_path):
    convert(tiny_hf, tmp_path / "plain", "bf16")
    original = load_model(tiny_hf, numerics="exact")
    exported = load_model(tmp_path / "plain", numerics="exact")
    a, b = original.state_dict(), exported.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(_u8(a[name]), _u8(b[name])), name
    tokens = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(3))
    assert torch.equal(original(tokens), exported(tokens))


# ---------------------------------------------------------------------------------------------- model parallel


def test_mp_files_hold_the_official_split(mp2, mp_converted):
    with pytest.raises(CheckpointError, match="model-parallel checkpoint of 2 ranks; open one rank"):
        Checkpoint(mp2)
    assert sorted(p.name for p in mp2.glob("*.safetensors")) == ["model0-mp2.safetensors", "model1-mp2.safetensors"]
    assert not (mp2 / INDEX_FILE).exists() and (mp2 / "tokenizer.json").exists()
    args = mp_args()
    full = expected_tensors(args, "converted")
    with Checkpoint(mp_converted) as whole:
        assert validate(whole) == "converted"
        for rank in range(2):
            with Checkpoint(mp2, rank=rank) as part:
                assert validate(part) == "converted"
                assert part.metadata[part.files[0]][LAYOUT_KEY] == "converted"
                assert part.tensors["layers.0.attn.wo_a.weight"].dtype == "BF16"
                assert "layers.0.attn.wo_a.scale" not in part
                held = set()
                for name, spec in full.items():
                    tile = FP8_TILE if spec.dtype == "F8_E4M3" else 1
                    piece = split_for_rank(name, spec.shape, rank, 2, args.n_routed_experts, tile)
                    if not piece.keep:
                        continue
                    held.add(name)
                    want = whole.tensor(name)
                    if piece.dim is not None:
                        want = want.narrow(piece.dim, piece.start, piece.stop - piece.start)
                    got = part.tensor(name)
                    assert got.dtype == want.dtype and torch.equal(_u8(got), _u8(want)), name
                assert held == set(part.tensors)
                experts = {int(n.split(".")[4]) for n in part.tensors if ".ffn.experts." in n}
                assert experts == set(range(4 * rank, 4 * rank + 4))  # 8 experts, whole, on their owner


def _header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) as the file's header has them."""
    with safe_open(str(path), framework="pt") as handle:
        return {n: (handle.get_slice(n).get_dtype(), handle.get_slice(n).get_shape()) for n in handle.keys()}


def test_mp_files_store_fp4_experts_as_f4_with_logical_shapes(mp2, mp_converted, mp_hf):
    """As the official convert.py: the expert I8 [out, in/2] re-viewed as float4_e2m1fn_x2, which safetensors
    stores as "F4" with the logical [out, in]; the scales stay F8_E8M0 [out, in/32]; the bytes are the download's."""
    args = mp_args()
    hf = expected_tensors(args, "hf")
    with Checkpoint(mp_hf) as download:
        for path in [mp2 / "model0-mp2.safetensors", mp2 / "model1-mp2.safetensors",
                     *sorted(mp_converted.glob("*.safetensors"))]:
            header = _header(path)
            experts = [n for n in header if ".ffn.experts." in n and n.endswith(".weight")]
            assert experts
            for name in experts:
                out_f, half = hf[name].shape
                assert header[name] == ("F4", [out_f, 2 * half]), name
                scale = name.removesuffix(".weight") + ".scale"
                assert header[scale] == ("F8_E8M0", [out_f, 2 * half // 32]), scale
            assert not any(dtype == "I8" for dtype, _ in header.values())
            part = load_file(str(path))
            for name in experts:
                assert part[name].dtype == torch.float4_e2m1fn_x2 and part[name].shape == hf[name].shape
                assert torch.equal(part[name].view(torch.uint8), download.tensor(name).view(torch.uint8)), name
    with Checkpoint(mp2, rank=1) as rank1:
        name = "layers.1.ffn.experts.6.w2.weight"
        assert rank1.tensors[name].dtype == "F4" and rank1.tensors[name].shape == (args.dim, args.moe_inter_dim)
        assert rank1.tensor(name).dtype == torch.float4_e2m1fn_x2


def _official_convert(download: Path, dst: Path, world: int) -> None:
    """What the official inference/convert.py writes (spec §5.3), written here by hand with safetensors'
    own `save_file`: each rank's split, wo_a dequantised to bf16 without its scale, the expert I8 tensors
    viewed as float4_e2m1fn_x2; no dsv4 metadata, config.json next to them."""
    dst.mkdir(parents=True)
    with Checkpoint(download) as ckpt:
        args = ckpt.args
        for rank in range(world):
            state = {}
            for name, stored in ckpt.tensors.items():
                if ".attn.wo_a." in name:
                    if name.endswith(".scale"):
                        continue
                    value = dequantize_fp8_weight(ckpt.tensor(name), ckpt.tensor(name.replace(".weight", ".scale")))
                    value = value.to(torch.bfloat16)
                elif ".ffn.experts." in name and stored.dtype == "I8":
                    value = ckpt.tensor(name).view(torch.float4_e2m1fn_x2)
                else:
                    value = ckpt.tensor(name)
                tile = FP8_TILE if stored.dtype == "F8_E4M3" else 1
                part = split_for_rank(name, tuple(value.shape), rank, world, args.n_routed_experts, tile)
                if not part.keep:
                    continue
                if part.dim is not None:
                    value = value.narrow(part.dim, part.start, part.stop - part.start)
                state[name] = value.contiguous()
            save_file(state, str(dst / f"model{rank}-mp{world}.safetensors"))
    shutil.copy(download / "config.json", dst / "config.json")


def test_official_convert_output_is_what_dsv4_writes(mp_hf, mp2, tmp_path):
    """Per-rank files written the official way hold exactly the tensors of dsv4's (dtype and shape in the
    header, bytes), validate as the converted layout without dsv4's metadata, and merge back to the download."""
    official = tmp_path / "official_mp2"
    _official_convert(mp_hf, official, 2)
    for rank in range(2):
        ours, theirs = mp2 / f"model{rank}-mp2.safetensors", official / f"model{rank}-mp2.safetensors"
        assert _header(ours) == _header(theirs)
        a, b = load_file(str(ours)), load_file(str(theirs))
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(_u8(a[name]), _u8(b[name])), name
        with Checkpoint(official, rank=rank) as part:
            assert not (part.metadata[part.files[0]].keys() - {"format"})
            assert validate(part) == "converted"
    convert(official, tmp_path / "hf", "official", layout="hf")
    assert_same_tensors(tmp_path / "hf", mp_hf)


@torch.no_grad()
def test_model_from_official_convert_gives_identical_logits(tiny_hf, tmp_path):
    """`model0-mp1.safetensors` + config.json as the official convert writes them loads into the same model
    as the download: experts F4 -> the download's int8 bytes (zero-copy), wo_a the bf16 dsv4 dequantises to."""
    official = tmp_path / "official_mp1"
    _official_convert(tiny_hf, official, 1)
    assert _header(official / "model0-mp1.safetensors")["layers.0.ffn.experts.1.w3.weight"][0] == "F4"
    original = load_model(tiny_hf, numerics="exact")
    converted = load_model(official, numerics="exact")
    with Checkpoint(official) as ckpt:
        assert validate(ckpt) == "converted"
    expert = converted.layers[2].ffn.experts[1].w1
    assert expert.weight.dtype == torch.int8 and expert.weight.shape == (preset("tiny").moe_inter_dim,
                                                                         preset("tiny").dim // 2)
    assert expert.weight.data_ptr() == converted.checkpoint.tensor("layers.2.ffn.experts.1.w1.weight").data_ptr()
    a, b = original.state_dict(), converted.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(_u8(a[name]), _u8(b[name])), name
    tokens = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(5))
    assert torch.equal(original(tokens), converted(tokens))
    plain_a = load_model(tiny_hf, numerics="plain", dtype=torch.float32)
    plain_b = load_model(official, numerics="plain", dtype=torch.float32)
    assert torch.equal(plain_a.layers[2].ffn.experts[1].w1.weight, plain_b.layers[2].ffn.experts[1].w1.weight)
    assert torch.equal(plain_a(tokens), plain_b(tokens))


def test_inspect_per_rank_files_count_the_download(mp_hf, mp2, capsys):
    """F4 experts (logical shape, half a byte each) count the parameters and bytes of the I8 download."""
    def experts(summary) -> tuple[int, int]:
        tallies = [part["routed_experts"] for part in (summary.main, summary.mtp) if "routed_experts" in part]
        return sum(t.parameters for t in tallies), sum(t.bytes for t in tallies)

    with Checkpoint(mp_hf) as ckpt:
        download = summarize_checkpoint(ckpt)
    ranks = []
    for rank in range(2):
        with Checkpoint(mp2, rank=rank) as ckpt:
            ranks.append(summarize_checkpoint(ckpt))
    assert all(r.layout == "converted" and r.dtypes["F4"] > 0 and "I8" not in r.dtypes for r in ranks)
    assert sum(r.dtypes["F4"] for r in ranks) == download.dtypes["I8"]
    assert sum(r.dtype_bytes["F4"] for r in ranks) == download.dtype_bytes["I8"]
    assert sum(experts(r)[0] for r in ranks) == experts(download)[0]  # parameters
    assert sum(experts(r)[1] for r in ranks) == experts(download)[1]  # bytes (weights and scales)
    args = mp_args()
    per_expert = 3 * args.dim * args.moe_inter_dim
    assert experts(download)[0] == (args.n_layers + args.n_mtp_layers) * args.n_routed_experts * per_expert
    assert main(["inspect", str(mp2), "--validate"]) == 0
    out = capsys.readouterr().out
    assert "rank 1 of 2" in out and "F4 " in out and "validated" in out


def test_mp_merge_is_the_inverse(mp2, mp_converted, tmp_path):
    merged = tmp_path / "merged"
    result = convert(mp2, merged, "official")
    assert result.layout == "converted"
    with Checkpoint(merged) as ckpt:
        assert validate(ckpt) == "converted"
    assert_same_tensors(merged, mp_converted)
    # and the plain export of the per-rank files is the plain export of the original
    convert(mp2, tmp_path / "plain_from_mp", "bf16")
    convert(mp_converted, tmp_path / "plain_from_full", "bf16")
    assert_same_tensors(tmp_path / "plain_from_mp", tmp_path / "plain_from_full")


def test_mp_back_to_hf_layout_is_the_download(mp2, mp_hf, tmp_path):
    """Merging into the hf layout re-quantises wo_a to the download's bytes."""
    convert(mp2, tmp_path / "hf", "official", layout="hf")
    assert_same_tensors(tmp_path / "hf", mp_hf)


@torch.no_grad()
def test_expert_dtype_fp8_reencodes_losslessly(mp_hf, tmp_path):
    dst = tmp_path / "mp2fp8"
    convert(mp_hf, dst, "mp", world_size=2, expert_dtype="fp8")
    config = json.loads((dst / "config.json").read_text())
    assert "expert_dtype" not in config and "expert_dtype" not in config["quantization_config"]
    with Checkpoint(mp_hf) as src:
        for rank in range(2):
            with Checkpoint(dst, rank=rank) as part:
                assert part.args.expert_dtype is None and part.args.routed_expert_dtype == "fp8"
                assert validate(part) == "converted"
                for name in [n for n in part.tensors if ".ffn.experts." in n and n.endswith(".weight")]:
                    prefix = name.removesuffix(".weight")
                    assert part.tensors[name].dtype == "F8_E4M3"
                    got = dequantize_fp8_weight(part.tensor(name), part.tensor(f"{prefix}.scale"))
                    want = dequantize_fp4_weight(src.tensor(name), src.tensor(f"{prefix}.scale"))
                    assert torch.equal(got, want), name
    # and the merged FP8-expert checkpoint loads
    merged = tmp_path / "merged"
    convert(dst, merged, "official")
    model = load_model(merged, numerics="exact")
    assert model.layers[0].ffn.experts[0].w1.weight.dtype == torch.float8_e4m3fn


def test_plain_fp8_experts_go_through_fp4(mp_hf, tmp_path):
    """plain -> official with --expert-dtype fp8 = hf -> official with --expert-dtype fp8."""
    convert(mp_hf, tmp_path / "plain", "fp32")
    convert(tmp_path / "plain", tmp_path / "a", "official", expert_dtype="fp8")
    convert(mp_hf, tmp_path / "b", "official", expert_dtype="fp8")
    assert_same_tensors(tmp_path / "a", tmp_path / "b")


# ---------------------------------------------------------------------------------------------- errors


def test_errors_name_the_problem(tiny_hf, mp_hf, mp2, tmp_path):
    with pytest.raises(ShardingError, match=r"(?s)cannot be split across 3 .*routed experts"):
        convert(mp_hf, tmp_path / "x", "mp", world_size=3)
    with pytest.raises(ShardingError, match=r"wq_b.weight: 2 parts of 64 .* 128x128"):
        convert(tiny_hf, tmp_path / "x", "mp", world_size=2)  # tiny dims < 128: FP8 tiles cannot be split
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not empty.*--overwrite"):
        convert(tiny_hf, tmp_path / "full", "bf16")
    with pytest.raises(CheckpointError, match="is the source checkpoint"):
        convert(tiny_hf, tiny_hf, "bf16", overwrite=True)
    with pytest.raises(ValueError, match="unknown conversion target 'gguf'"):
        convert(tiny_hf, tmp_path / "y", "gguf")
    with pytest.raises(ValueError, match="needs a world size"):
        convert(tiny_hf, tmp_path / "y", "mp")
    with pytest.raises(ValueError, match="--expert-dtype applies"):
        convert(tiny_hf, tmp_path / "y", "bf16", expert_dtype="fp8")
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        convert(tmp_path / "full", tmp_path / "y", "bf16")
    # overwrite replaces the old weights (here: per-rank files of another world size)
    convert(mp2, tmp_path / "full", "bf16", overwrite=True)
    assert (tmp_path / "full" / "notes.txt").exists() and not list((tmp_path / "full").glob("model*-mp*"))
    convert(mp_hf, tmp_path / "full", "mp", world_size=1, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "full").glob("*.safetensors")) == ["model0-mp1.safetensors"]
    assert validate(Checkpoint(tmp_path / "full")) == "converted"


# ---------------------------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse rejects unknown choices itself
        return exit_.code


def test_cli_convert_and_make_checkpoint(tmp_path, capsys):
    src = tmp_path / "src"
    assert _cli(["make-checkpoint", str(src), "--preset", "tiny", "--seed", "4", "--shards", "2"]) == 0
    assert "wrote" in capsys.readouterr().out and len(list(src.glob("*.safetensors"))) == 2
    assert validate(Checkpoint(src)) == "hf"
    (tmp_path / "cfg.json").write_text(json.dumps(mp_args().to_hf_config()))
    assert _cli(["make-checkpoint", str(tmp_path / "big"), "--config", str(tmp_path / "cfg.json"),
                 "--layout", "converted"]) == 0
    assert validate(Checkpoint(tmp_path / "big")) == "converted"
    (tmp_path / "inference.json").write_text(json.dumps(preset("tiny").to_dict()))  # the inference dialect
    assert _cli(["make-checkpoint", str(tmp_path / "inf"), "--config", str(tmp_path / "inference.json"),
                 "--seed", "4"]) == 0
    assert_same_tensors(src, tmp_path / "inf")

    assert _cli(["convert", str(src), str(tmp_path / "plain"), "--to", "bf16", "--shards", "3"]) == 0
    assert "3 shards" in capsys.readouterr().out
    assert _cli(["convert", str(tmp_path / "plain"), str(tmp_path / "back"), "--to", "official"]) == 0
    assert_same_tensors(src, tmp_path / "back")
    assert _cli(["convert", str(tmp_path / "big"), str(tmp_path / "mp"), "--to", "mp", "--world-size", "2"]) == 0
    assert "2 per-rank files" in capsys.readouterr().out

    capsys.readouterr()
    assert _cli(["convert", str(src), str(tmp_path / "plain"), "--to", "fp32"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert _cli(["convert", str(src), str(tmp_path / "z"), "--to", "mp", "--world-size", "2"]) == 2
    assert "cannot be split across 2" in capsys.readouterr().err
    assert _cli(["convert", str(src), str(tmp_path / "z"), "--to", "gguf"]) == 2
    assert "invalid choice: 'gguf'" in capsys.readouterr().err
    assert _cli(["convert", str(tmp_path / "nowhere"), str(tmp_path / "z"), "--to", "bf16"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert _cli(["make-checkpoint", str(src), "--preset", "tiny"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert _cli(["make-checkpoint", str(tmp_path / "q"), "--preset", "huge"]) == 2
