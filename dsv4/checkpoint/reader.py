"""Lazy, validated access to a checkpoint on disk.

`Checkpoint(path)` accepts what users actually have:
* a Hugging Face release directory: `config.json` (+ `inference/config.json`), and either
  `model.safetensors.index.json` with its shards or a single `model.safetensors`; the root
  `config.json` may be in either dialect (HF or the inference code's);
* a directory written by `dsv4 convert` (per-rank `model{r}-mp{N}.safetensors` or a plain export);
* a single `.safetensors` file whose directory holds the config.

FP4 expert weights come as the release's I8 `[out, in/2]` or, in files the official `convert.py`
wrote, as "F4" (`torch.float4_e2m1fn_x2`, logical `[out, in]` in the header); `tensor` returns them as
stored, so callers that want the packed bytes view them as int8 (same bytes, no copy).

Opening reads only the config and the safetensors headers (which also catches truncated or corrupt
shards). Tensors come back zero-copy: safetensors memory-maps each shard, so a tensor costs RAM
only for the pages a computation actually touches, and a process that needs a few tensors (one
rank, `dsv4 inspect`) never reads the rest. Every problem is reported with the file and tensor it
concerns, as a `CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import INFERENCE_ONLY_FIELDS, ConfigError, ModelArgs, config_dialect
from .schema import DTYPES

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MP_FILE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or does not match its config; the message names what and where."""


@dataclass(frozen=True)
class StoredTensor:
    """Header entry of one tensor: where it lives, how it is stored."""

    name: str
    file: Path
    dtype: str  # safetensors dtype name, e.g. F8_E4M3
    shape: tuple[int, ...]  # as the header has it: for F4 the logical shape (the torch tensor's last dim is half)


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_args(root: Path) -> tuple[ModelArgs, dict]:
    """ModelArgs from `config.json` and/or `inference/config.json`, each in either dialect (told apart by its
    keys, `config_dialect`): users keep the inference config at the root too. The two must agree when both
    exist, and the second may set what the HF dialect cannot (`INFERENCE_ONLY_FIELDS`: max_seq_len, ...).

    Returns the args and the HF-dialect `config.json` dict (empty when the root has none in that dialect)."""
    paths = [p for p in (root / "config.json", root / "inference" / "config.json") if p.exists()]
    if not paths:
        raise CheckpointError(f"{root}: no config.json (or inference/config.json) next to the weights")
    fields = [f.name for f in dataclasses.fields(ModelArgs)]
    hf_cfg: dict = {}
    args = None
    try:
        for path in paths:
            values = read_json(path)
            dialect = config_dialect(values)
            these = ModelArgs.from_config(values)
            if args is None:
                args, first = these, path
                if dialect == "hf" and path == root / "config.json":
                    hf_cfg = values
                continue
            # what the second config states: an inference config its keys (the rest are defaults), an HF one all
            stated = set(values) if dialect == "inference" else set(fields) - set(INFERENCE_ONLY_FIELDS)
            diff = [f for f in fields if f in stated and f not in INFERENCE_ONLY_FIELDS
                    and getattr(these, f) != getattr(args, f)]
            if diff:
                raise CheckpointError(f"{first} and {path} disagree on {', '.join(diff)}")
            args = args.replace(**{f: getattr(these, f) for f in INFERENCE_ONLY_FIELDS if f in stated})
    except ConfigError as err:
        raise CheckpointError(f"{root}: invalid config: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{root}: invalid config: {err!r}") from None
    return args, hf_cfg


def _weight_files(path: Path, rank: int | None) -> tuple[Path, list[Path], dict[str, str] | None]:
    """(root dir, shard files, weight_map from the index or None) for a path the user gave."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file or a checkpoint directory")
        return path.parent, [path], None
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    mp_files = sorted(p for p in path.glob("model*-mp*.safetensors") if MP_FILE.match(p.name))
    if mp_files:
        worlds = {int(MP_FILE.match(p.name).group(2)) for p in mp_files}
        if len(worlds) != 1:
            raise CheckpointError(f"{path}: per-rank files for several world sizes {sorted(worlds)}")
        world = worlds.pop()
        missing = [f"model{r}-mp{world}.safetensors" for r in range(world)
                   if not (path / f"model{r}-mp{world}.safetensors").exists()]
        if missing:
            raise CheckpointError(f"{path}: model-parallel checkpoint lacks {', '.join(missing)}")
        if rank is None:
            if world > 1:  # each file holds one rank's slices under the same names: they do not add up
                raise CheckpointError(f"{path}: a model-parallel checkpoint of {world} ranks; open one rank "
                                      f"(rank 0..{world - 1}) or merge them with `dsv4 convert --to official`")
            rank = 0
        if not 0 <= rank < world:
            raise CheckpointError(f"{path}: rank {rank} outside the checkpoint's {world} ranks")
        return path, [path / f"model{rank}-mp{world}.safetensors"], None
    index = path / INDEX_FILE
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: no valid 'weight_map' (tensor name -> shard file)")
        files = []
        for name in sorted(set(weight_map.values())):
            if Path(name).name != name:
                raise CheckpointError(f"{index}: shard name {name!r} must be a file in the same directory")
            if not (path / name).exists():
                users = [k for k, v in weight_map.items() if v == name]
                raise CheckpointError(f"{index}: shard {name} (holding {users[0]} and {len(users) - 1} more) "
                                      "does not exist")
            files.append(path / name)
        return path, files, weight_map
    if (path / SINGLE_FILE).exists():
        return path, [path / SINGLE_FILE], None
    raise CheckpointError(f"{path}: no {INDEX_FILE}, {SINGLE_FILE} or model{{rank}}-mp{{N}}.safetensors")


class Checkpoint:
    """An opened checkpoint: its config, its tensor headers, and zero-copy tensor access."""

    def __init__(self, path: str | Path, rank: int | None = None) -> None:
        self.path = Path(path)
        self.root, self.files, weight_map = _weight_files(self.path, rank)
        self.args, self.hf_config = read_args(self.root)
        self.metadata: dict[Path, dict[str, str]] = {}
        self.tensors: dict[str, StoredTensor] = {}
        self._handles: dict[Path, object] = {}
        for file in self.files:
            self._scan(file)
        if weight_map is not None:
            self._check_index(weight_map)

    # ------------------------------------------------------------------ headers
    def _open(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{file}: damaged or not a safetensors file ({err})") from None
            self._handles[file] = handle
        return handle

    def _scan(self, file: Path) -> None:
        handle = self._open(file)
        self.metadata[file] = handle.metadata() or {}
        for name in handle.keys():
            part = handle.get_slice(name)
            dtype = part.get_dtype()
            if dtype not in DTYPES:
                raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {dtype}")
            if name in self.tensors:
                raise CheckpointError(f"{file}: tensor {name} also stored in {self.tensors[name].file}")
            self.tensors[name] = StoredTensor(name, file, dtype, tuple(part.get_shape()))

    def _check_index(self, weight_map: dict[str, str]) -> None:
        problems = []
        for name, shard in weight_map.items():
            stored = self.tensors.get(name)
            if stored is None:
                problems.append(f"{name}: listed in {INDEX_FILE} under {shard}, but not in that shard")
            elif stored.file.name != shard:
                problems.append(f"{name}: index says {shard}, stored in {stored.file.name}")
        for name, stored in self.tensors.items():
            if name not in weight_map:
                problems.append(f"{name}: stored in {stored.file.name} but missing from {INDEX_FILE}")
        if problems:
            raise CheckpointError(format_problems(self.root / INDEX_FILE, "does not match its shards", problems))

    # ------------------------------------------------------------------ access
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str) -> torch.Tensor:
        """The stored tensor, memory-mapped (no copy); treat it as read-only."""
        stored = self.tensors.get(name)
        if stored is None:
            raise CheckpointError(f"{self.root}: no tensor {name}")
        try:
            return self._open(stored.file).get_tensor(name)
        except SafetensorError as err:
            raise CheckpointError(f"{stored.file}: cannot read {name} ({err})") from None

    def tensor_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows/columns [start, stop) of `name` along `dim` (in the header's shape), reading only that part."""
        stored = self.tensors[name]
        if stored.dtype == "F4":
            return self._f4_slice(stored, dim, start, stop)
        index = [slice(None)] * len(stored.shape)
        index[dim] = slice(start, stop)
        try:
            return self._open(stored.file).get_slice(name)[tuple(index)]
        except SafetensorError as err:
            raise CheckpointError(f"{stored.file}: cannot read {name}[{start}:{stop}] ({err})") from None

    def _f4_slice(self, stored: StoredTensor, dim: int, start: int, stop: int) -> torch.Tensor:
        """An F4 slice as a view of the memory-mapped tensor. safetensors' own slicing cannot do F4 (it
        shapes the bytes with the header's logical shape, twice the float4_e2m1fn_x2 elements); the
        logical columns along the last dim are two per stored element, so they must come in pairs."""
        dim = dim % len(stored.shape)
        if dim == len(stored.shape) - 1:
            if start % 2 or stop % 2:
                raise CheckpointError(f"{stored.file}: cannot read {stored.name}[{start}:{stop}] along its last "
                                      "dim: F4 packs two elements per byte, so a slice needs even bounds")
            start, stop = start // 2, stop // 2
        return self.tensor(stored.name).narrow(dim, start, stop - start)

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_problems(where: Path | str, what: str, problems: list[str], limit: int = 25) -> str:
    """The message of an error with many problems: `where: what (N problems):` then one line each, at most
    `limit` shown. A damaged checkpoint rarely has one problem, and the reader, validator, loader and
    converter all report every one they find at once, so a user fixes them in one round, not one per run."""
    shown = problems[:limit]
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{where}: {what} ({len(problems)} problems):\n  " + "\n  ".join(shown) + more
