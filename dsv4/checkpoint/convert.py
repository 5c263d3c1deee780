"""Convert checkpoints between the official formats, per-rank model-parallel files and plain float exports.

`convert(src, dst, to=...)` reads any checkpoint `Checkpoint` opens (the HF release, a `converted`
or `plain` directory, or a directory of per-rank `model{r}-mp{N}.safetensors`) and writes:

* ``"mp"``: N per-rank files exactly as the official `inference/convert.py` does (spec §5.3): tensors
  split with `dsv4.parallel.rules.split_for_rank` (FP8 weights only at whole 128x128 tiles), routed
  experts whole on their owner rank, `wo_a` dequantised to BF16 without its scale, FP4 expert weights
  re-viewed as `float4_e2m1fn_x2` (safetensors "F4", logical `[out, in]` in the header, the download's
  bytes unchanged), i.e. each rank's file is the ``"converted"`` layout of its part. With
  ``expert_dtype="fp8"`` the FP4 experts are re-encoded losslessly as FP8 (`fp4_to_fp8_weight`) and
  `expert_dtype` leaves the config (§5.1).
* ``"bf16"`` / ``"fp32"``: a ``"plain"`` export, every FP8/FP4 weight dequantised (exact: an e4m3 or
  e2m1 value times a power-of-two scale is a bf16 number; this is checked, tensor by tensor), F32
  tensors staying F32 in a bf16 export. `config.json` keeps the quantisation info, so the loader and
  the way back know the official formats.
* ``"official"``: one checkpoint in the official formats: a plain export is re-quantised with the
  canonical quantisers of `dsv4.quant` (``"hf"`` layout, `wo_a` FP8 again), per-rank files are merged
  back (concatenation along the split dim, union of the experts; ``"converted"`` layout), a full
  official checkpoint keeps its layout unless `layout` asks for the other one.

Because the quantisers are canonical (quantize(dequantize(q, s)) == (q, s)), official -> plain ->
official and official -> mp -> official reproduce every byte of an official checkpoint written by
dsv4; a third-party checkpoint whose blocks are not in canonical form comes back value-exact.

Everything streams tensor by tensor: the source is memory-mapped, and the output files are written
by a small safetensors writer that emits the header first (every shape is known from the schema) and
then each tensor as it is produced, so memory stays at about one tensor (plus its dequantised copy)
whatever the model size - a Flash-sized conversion never holds a shard, let alone a rank, in RAM.
Output is written under temporary names and renamed only once complete; the source is validated
first (every problem listed at once), and tokenizer / generation files next to the weights are copied.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import INFERENCE_ONLY_FIELDS, ConfigError, ModelArgs
from ..parallel.rules import ShardingError, expert_id, split_for_rank
from ..quant import (
    dequantize_fp4_weight,
    dequantize_fp8_weight,
    fp4_to_fp8_weight,
    quantize_fp4_weight,
    quantize_fp8_weight,
)
from .reader import INDEX_FILE, MP_FILE, SINGLE_FILE, Checkpoint, CheckpointError, format_problems
from .schema import DTYPE_BITS, DTYPE_NAMES, DTYPES, FP8_TILE, PACKED_FP4, TensorSpec, expected_tensors
from .validate import FLOAT_KEY, LAYOUT_KEY, model_parallel_rank, rank_specs, validate

TARGETS = ("mp", "bf16", "fp32", "official")
EXPERT_DTYPES = ("fp8",)
WORLD_KEY, RANK_KEY = "dsv4_world_size", "dsv4_rank"
_QUANTISED = ("F8_E4M3", "F4", *PACKED_FP4)
_SHARD_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


# ---------------------------------------------------------------------------------------------- source


class _Source:
    """A validated checkpoint read as full (unsplit) tensors: one checkpoint, or the N per-rank files."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_file() and MP_FILE.match(path.name) and int(MP_FILE.match(path.name).group(2)) > 1:
            path = path.parent  # one rank's file: the conversion needs all of them
        worlds = {int(MP_FILE.match(p.name).group(2)) for p in path.glob("model*-mp*.safetensors")
                  if MP_FILE.match(p.name)} if path.is_dir() else set()
        self.world = max(worlds) if len(worlds) == 1 else 1
        if self.world > 1:
            self.ranks = [Checkpoint(path, rank=r) for r in range(self.world)]
        else:
            self.ranks = [Checkpoint(path)]  # reports several world sizes, missing files, ... itself
        first = self.ranks[0]
        self.root, self.args, self.hf_config = first.root, first.args, first.hf_config
        layouts = {validate(ckpt) for ckpt in self.ranks}
        if len(layouts) > 1:
            raise CheckpointError(f"{self.root}: per-rank files disagree on their layout: {sorted(layouts)}")
        self.layout = layouts.pop()
        floats = {m.get(FLOAT_KEY, "BF16") for ckpt in self.ranks for m in ckpt.metadata.values()}
        self.float_dtype = floats.pop() if self.layout == "plain" and len(floats) == 1 else "BF16"
        if self.world == 1 and model_parallel_rank(first)[1] > 1:
            raise CheckpointError(f"{first.files[0]}: a single rank's file; convert the directory holding all ranks")
        self.specs = expected_tensors(self.args, self.layout, self.float_dtype)  # the full (unsplit) tensors

    def dtype(self, name: str) -> str:
        """The dtype `name` is stored with (F4 or I8 for an FP4 weight; whichever rank holds it)."""
        for ckpt in self.ranks:
            if name in ckpt.tensors:
                return ckpt.tensors[name].dtype
        return self.specs[name].dtype

    def has(self, name: str) -> bool:
        return name in self.specs

    def get(self, name: str) -> torch.Tensor:
        """The full tensor: memory-mapped from the one file, or assembled from its rank parts."""
        if self.world == 1:
            return self.ranks[0].tensor(name)
        spec = self.specs[name]
        tile = FP8_TILE if spec.dtype == "F8_E4M3" else 1
        parts, dim = [], None
        for rank, ckpt in enumerate(self.ranks):
            part = split_for_rank(name, spec.shape, rank, self.world, self.args.n_routed_experts, tile)
            if not part.keep:
                continue
            if part.dim is None:  # replicated (every rank has it) or a whole expert (its owner has it)
                return ckpt.tensor(name)
            parts.append(ckpt.tensor(name))
            dim = part.dim
        return torch.cat(parts, dim=dim)

    def close(self) -> None:
        for ckpt in self.ranks:
            ckpt.close()


# ---------------------------------------------------------------------------------------------- target


def _fmt_of(dtype: str) -> str:
    return "fp8" if dtype == "F8_E4M3" else "fp4" if dtype == "F4" or dtype in PACKED_FP4 else "float"


def _tile(spec: TensorSpec) -> int:
    """Parts of an FP8 weight must be whole 128x128 tiles (as `validate.rank_specs` assumes)."""
    return FP8_TILE if spec.fmt == "fp8" and spec.dtype == "F8_E4M3" else 1


class _Producer:
    """Target tensors from source tensors: copied, dequantised, re-quantised or re-encoded FP4 -> FP8."""

    def __init__(self, src: _Source, specs: dict[str, TensorSpec], args: ModelArgs) -> None:
        self.src, self.specs, self.args = src, specs, args
        self.partner: dict[str, torch.Tensor] = {}  # the scale made together with a weight (or vice versa)

    def get(self, name: str) -> torch.Tensor:
        if name in self.partner:
            return self.partner.pop(name)
        spec = self.specs[name]
        if spec.fmt in ("fp8", "fp4"):
            prefix = name.rsplit(".", 1)[0]
            weight, scale = self._linear(prefix, spec.fmt)
            mine, other = (weight, scale) if name.endswith(".weight") else (scale, weight)
            self.partner[f"{prefix}.scale" if name.endswith(".weight") else f"{prefix}.weight"] = other
            return mine
        if not self.src.has(name):
            raise CheckpointError(f"{self.src.root}: the target needs {name}, which the source lacks")
        value, stored = self.src.get(name), self.src.dtype(name)
        target = DTYPES[spec.dtype]
        if stored in _QUANTISED:  # a quantised linear stored in float by the target (plain, or wo_a converted)
            value = self._dequantize(name.removesuffix(".weight"), value, stored)
            out = value.to(target)
            if not torch.equal(out.float(), value):
                raise CheckpointError(f"{self.src.root}: {name} dequantised is not exactly representable as "
                                      f"{spec.dtype} (scales outside the {spec.dtype} range); use --to fp32")
            return out
        return value if value.dtype == target else value.to(target)

    def _dequantize(self, prefix: str, weight: torch.Tensor, stored: str) -> torch.Tensor:
        scale = self.src.get(f"{prefix}.scale")
        return (dequantize_fp8_weight if stored == "F8_E4M3" else dequantize_fp4_weight)(weight, scale)

    def _linear(self, prefix: str, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, scale) of linear `prefix` in target format fmt (fp8 / fp4)."""
        weight, scale = self._linear_values(prefix, fmt)
        if fmt == "fp4":  # the same packed bytes, as the target stores them: I8 (hf) or F4 (converted)
            weight = weight.view(DTYPES[self.specs[f"{prefix}.weight"].dtype])
        return weight, scale

    def _linear_values(self, prefix: str, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        name = f"{prefix}.weight"
        stored = self.src.dtype(name)
        have = _fmt_of(stored)
        weight = self.src.get(name)
        if have == fmt:
            return weight, self.src.get(f"{prefix}.scale")
        if have == "fp4" and fmt == "fp8":  # --expert-dtype fp8
            return self._fp4_to_fp8(name, weight, self.src.get(f"{prefix}.scale"))
        if have == "float":
            value = weight.float()
            if fmt == "fp4":
                return quantize_fp4_weight(value)
            if expert_id(name) is not None and self.src.args.routed_expert_dtype == "fp4":
                # a plain export of FP4 experts going to FP8 experts: the official route, FP4 then re-encoded
                return self._fp4_to_fp8(name, *quantize_fp4_weight(value))
            return quantize_fp8_weight(value)
        raise CheckpointError(f"{self.src.root}: {name} is stored as FP8; re-encoding FP8 as FP4 is not lossless "
                              "and not supported")

    def _fp4_to_fp8(self, name: str, packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, s = fp4_to_fp8_weight(packed, scale)
        if not torch.equal(dequantize_fp8_weight(q, s), dequantize_fp4_weight(packed, scale)):
            raise CheckpointError(f"{self.src.root}: {name}: FP4 -> FP8 is not lossless for this tensor (its "
                                  "block scales span more than 2**14 within one 128x128 tile)")
        return q, s


# ---------------------------------------------------------------------------------------------- writing


class _SafetensorsWriter:
    """Writes one .safetensors file tensor by tensor: the header (all shapes known) first, then the data."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str]) -> None:
        self.path = path
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for spec in specs:
            header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.expected = deque(specs)
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.expected.popleft()
        if spec.name != name:
            raise AssertionError(f"{self.path}: expected {spec.name}, got {name}")
        dtype = DTYPE_NAMES.get(tensor.dtype)
        if dtype != spec.dtype or tuple(tensor.shape) != spec.torch_shape:  # F4: the header's shape is logical
            raise CheckpointError(f"{self.path.name}: {name} came out {dtype} {list(tensor.shape)}, the schema says "
                                  f"{spec.dtype} {list(spec.torch_shape)}")
        if tensor.numel():
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            if data.numel() != spec.nbytes:
                raise AssertionError(f"{self.path}: {name} has {data.numel()} bytes, its header {spec.nbytes}")
            self.file.write(memoryview(data.numpy()))

    def close(self) -> None:
        if self.expected:
            raise AssertionError(f"{self.path}: {len(self.expected)} tensors not written")
        self.file.close()

    def abort(self) -> None:
        self.file.close()


def _narrow(value: torch.Tensor, spec: TensorSpec, dim: int, start: int, stop: int) -> torch.Tensor:
    """`value`[start:stop] along `dim` of `spec.shape` (F4: two logical columns per stored element)."""
    if spec.dtype == "F4" and dim == len(spec.shape) - 1:
        if start % 2 or stop % 2:
            raise ShardingError(f"{spec.name}: F4 columns {start}:{stop} split a byte")
        start, stop = start // 2, stop // 2
    return value.narrow(dim, start, stop - start)


def _aligned(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """Largest elements first (stable), so every tensor starts aligned to its element size."""
    return sorted(specs, key=lambda s: -DTYPE_BITS[s.dtype])


def _shard_plan(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive (schema order) groups; a shard closes once the total reaches a multiple of max_bytes."""
    groups: list[list[TensorSpec]] = [[]]
    done = 0
    for spec in specs:
        groups[-1].append(spec)
        done += spec.nbytes
        if done >= len(groups) * max_bytes:
            groups.append([])
    return [_aligned(g) for g in groups if g]


@dataclass
class ConvertResult:
    """What `convert` wrote."""

    dst: Path
    target: str
    layout: str
    float_dtype: str
    world_size: int
    files: list[Path] = field(default_factory=list)
    tensors: int = 0
    nbytes: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- config, aux files


def _target_config(src: _Source, args: ModelArgs) -> dict:
    """The source's config.json with what the conversion changed (only `expert_dtype` can change)."""
    if not src.hf_config:
        return args.to_hf_config()
    config = json.loads(json.dumps(src.hf_config))
    if args.expert_dtype != src.args.expert_dtype:
        config.pop("expert_dtype", None)
        if isinstance(config.get("quantization_config"), dict):
            config["quantization_config"].pop("expert_dtype", None)
        if args.expert_dtype is not None:
            config["expert_dtype"] = args.expert_dtype
    try:
        same = ModelArgs.from_hf_config(config).replace(
            **{f: getattr(args, f) for f in INFERENCE_ONLY_FIELDS}) == args
    except (ConfigError, KeyError, TypeError, ValueError):
        same = False
    if not same:  # the source config said something the edit could not carry: write it from the args
        config = {**src.hf_config, **args.to_hf_config()}
        if args.expert_dtype is None:
            config.pop("expert_dtype", None)
    return config


def _copy_aux_files(src: _Source, dst: Path, args: ModelArgs) -> list[Path]:
    """Copy tokenizer, generation config, code, encoding/ ... (everything but weights, index and config)."""
    copied = []
    dst_resolved = dst.resolve()
    for path in sorted(src.root.rglob("*")):
        rel = path.relative_to(src.root)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        resolved = path.resolve()
        if resolved == dst_resolved or dst_resolved in resolved.parents or not path.is_file():
            continue
        if path.suffix == ".safetensors" or rel in (Path(INDEX_FILE), Path("config.json")):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel == Path("inference") / "config.json" and args.expert_dtype != src.args.expert_dtype:
            ref = json.loads(path.read_text())
            ref["expert_dtype"] = args.expert_dtype  # null: the official ModelArgs default (experts like dtype)
            target.write_text(json.dumps(ref, indent=2) + "\n")
        else:
            shutil.copy2(path, target)
        copied.append(target)
    return copied


def _prepare_dst(dst: Path, src: _Source, overwrite: bool) -> None:
    src_root = src.root.resolve()
    if dst.exists():
        if not dst.is_dir():
            raise CheckpointError(f"{dst}: exists and is not a directory")
        if dst.resolve() == src_root:
            raise CheckpointError(f"{dst}: is the source checkpoint; write the conversion elsewhere")
        if any(dst.iterdir()) and not overwrite:
            raise CheckpointError(f"{dst}: exists and is not empty; choose another directory or pass --overwrite")
    dst.mkdir(parents=True, exist_ok=True)


def _remove_old_weights(dst: Path) -> None:
    """With overwrite: drop weight files a previous conversion left, so the reader sees only the new ones."""
    for path in dst.iterdir():
        if path.is_file() and (MP_FILE.match(path.name) or _SHARD_FILE.match(path.name)
                               or path.name in (INDEX_FILE, SINGLE_FILE)):
            path.unlink()


def _check_split(specs: dict[str, TensorSpec], world: int, n_experts: int, where: Path) -> None:
    """Every reason `world` ranks cannot split the checkpoint, one line per kind of tensor."""
    problems: dict[str, str] = {}
    for name, spec in specs.items():
        if name.endswith(".scale") and any(name.removesuffix(".scale") + ".weight" in p for p in problems.values()):
            continue  # its weight is already reported
        try:
            split_for_rank(name, spec.shape, 0, world, n_experts, _tile(spec))
        except ShardingError as err:
            key = re.sub(r"(layers|mtp|experts)\.\d+", r"\1.*", str(err))
            problems.setdefault(key, str(err))
    if problems:
        raise ShardingError(format_problems(where, f"cannot be split across {world} model-parallel ranks",
                                    list(problems.values())))


def _check_space(dst: Path, nbytes: int) -> None:
    free = shutil.disk_usage(dst).free
    if free < nbytes:
        raise CheckpointError(f"{dst}: the conversion writes {nbytes / 2**30:.2f} GiB, only {free / 2**30:.2f} GiB "
                              "free")


# ---------------------------------------------------------------------------------------------- convert


def convert(src: str | Path, dst: str | Path, to: str, *, world_size: int | None = None,
            expert_dtype: str | None = None, shards: int | None = None, max_shard_bytes: int = 4 << 30,
            layout: str | None = None, overwrite: bool = False,
            progress: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Convert checkpoint `src` into directory `dst` (see the module docstring for the targets).

    `world_size`: ranks for ``to="mp"``. `expert_dtype="fp8"`: FP4 experts re-encoded as FP8 (mp and
    official targets). `shards` / `max_shard_bytes`: how a single-checkpoint output is split into files.
    `layout` ("hf" or "converted"): the official layout to write (default: the source's; "hf" from a
    plain export; always "converted" per rank). `progress(done_bytes, total_bytes)` is called per tensor."""
    start = time.perf_counter()
    if to not in TARGETS:
        raise ValueError(f"unknown conversion target {to!r}; choose from {', '.join(TARGETS)}")
    if to == "mp":
        if world_size is None or world_size < 1:
            raise ValueError(f"--to mp needs a world size >= 1, got {world_size}")
        if shards is not None:
            raise ValueError("--shards does not apply to --to mp (one file per rank, as the official convert)")
    elif world_size is not None:
        raise ValueError(f"--world-size applies only to --to mp, not --to {to}")
    if expert_dtype is not None and expert_dtype not in EXPERT_DTYPES:
        raise ValueError(f"unknown expert dtype {expert_dtype!r}; only {', '.join(EXPERT_DTYPES)} is supported")
    if expert_dtype is not None and to in ("bf16", "fp32"):
        raise ValueError(f"--expert-dtype applies to the official formats (--to mp / official), not --to {to}")
    if layout is not None and (to != "official" or layout not in ("hf", "converted")):
        raise ValueError(f"layout {layout!r}: only 'hf' or 'converted', and only with --to official")
    if shards is not None and shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")

    source = _Source(src)
    try:
        args = source.args
        if expert_dtype == "fp8" and args.routed_expert_dtype == "fp4":
            args = args.replace(expert_dtype=None)
        if to in ("bf16", "fp32"):
            out_layout, float_dtype = "plain", "F32" if to == "fp32" else "BF16"
        elif to == "mp":
            out_layout, float_dtype = "converted", "BF16"
        else:
            out_layout = layout or ("hf" if source.layout == "plain" else source.layout)
            float_dtype = "BF16"
        if out_layout == "converted" and args.dtype != "fp8" and args.routed_expert_dtype != "fp4":
            out_layout = "hf"  # no FP8 wo_a to dequantise, no FP4 expert to view as F4: the layouts are the same
        full = expected_tensors(args, out_layout, float_dtype)
        dst = Path(dst)
        world = world_size if to == "mp" else 1
        if to == "mp":
            _check_split(full, world, args.n_routed_experts, source.root)
        _prepare_dst(dst, source, overwrite)
        result = ConvertResult(dst, to, out_layout, float_dtype, world)
        metadata = {"format": "pt", LAYOUT_KEY: out_layout, FLOAT_KEY: float_dtype}
        if to == "mp":
            per_rank = [rank_specs(full, r, world, args.n_routed_experts) for r in range(world)]
            files = [(f"model{r}-mp{world}.safetensors", _aligned(per_rank[r].values()),
                      {**metadata, WORLD_KEY: str(world), RANK_KEY: str(r)}) for r in range(world)]
        else:
            total = sum(s.nbytes for s in full.values())
            max_bytes = -(-total // shards) if shards is not None else max_shard_bytes
            groups = _shard_plan(list(full.values()), max_bytes)
            files = [(f"model-{k:05d}-of-{len(groups):05d}.safetensors", g, metadata)
                     for k, g in enumerate(groups, start=1)]
        total = sum(s.nbytes for _, specs, _ in files for s in specs)
        _check_space(dst, total)
        _write(source, full, args, dst, files, world if to == "mp" else 0, progress, total)
        if overwrite:
            _remove_old_weights(dst)
        for final, _, _ in files:
            (dst / f".partial-{final}").rename(dst / final)
        if to != "mp":
            index = {"metadata": {"total_size": total},
                     "weight_map": {s.name: final for final, specs, _ in files for s in specs}}
            (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (dst / "config.json").write_text(json.dumps(_target_config(source, args), indent=2) + "\n")
        _copy_aux_files(source, dst, args)
        result.files = [dst / final for final, _, _ in files]
        result.tensors = len(full)
        result.nbytes = total
        result.seconds = time.perf_counter() - start
        return result
    finally:
        source.close()


def _write(source: _Source, full: dict[str, TensorSpec], args: ModelArgs, dst: Path,
           files: list[tuple[str, list[TensorSpec], dict[str, str]]], world: int,
           progress: Callable[[int, int], None] | None, total: int) -> None:
    """Produce every tensor once and write it (or each rank's slice of it) to the temporary files.

    world = 0: `files` are consecutive shards of one checkpoint, written one after the other; world >= 1:
    `files` are the per-rank files, written side by side."""
    producer = _Producer(source, full, args)
    writers: list[_SafetensorsWriter] = []
    done = 0
    try:
        if world:
            writers = [_SafetensorsWriter(dst / f".partial-{final}", specs, meta) for final, specs, meta in files]
            holders: dict[str, list[int]] = {}
            for r, (_, specs, _) in enumerate(files):
                for spec in specs:
                    holders.setdefault(spec.name, []).append(r)
            for spec in _aligned(full.values()):  # the same relative order as in every rank's file
                ranks = holders.get(spec.name)
                if not ranks:
                    continue
                value = producer.get(spec.name)
                for r in ranks:
                    part = split_for_rank(spec.name, spec.shape, r, world, args.n_routed_experts, _tile(spec))
                    piece = value if part.dim is None else _narrow(value, spec, part.dim, part.start, part.stop)
                    writers[r].write(spec.name, piece)
                    done += piece.numel() * piece.element_size()
                if progress:
                    progress(done, total)
        else:
            for final, specs, meta in files:
                writer = _SafetensorsWriter(dst / f".partial-{final}", specs, meta)
                writers.append(writer)
                for spec in specs:
                    writer.write(spec.name, producer.get(spec.name))
                    done += spec.nbytes
                    if progress:
                        progress(done, total)
                writer.close()
        for writer in writers:
            if not writer.file.closed:
                writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
            writer.path.unlink(missing_ok=True)
        raise
