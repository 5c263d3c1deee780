"""Load a checkpoint into a `Transformer` without ever holding two copies of the weights.

The model is built on the meta device (no allocation), validated against the checkpoint, and each
parameter is then *assigned* the stored tensor:

* `exact` numerics keep FP8 e4m3 and packed FP4 weights exactly as stored, with their ue8m0 block
  scales, memory-mapped from the shards (zero-copy: RAM is what the forward touches, bounded by the
  size on disk); float tensors whose dtype already matches are mapped too, others are cast.
* `plain` numerics dequantise every weight to the model dtype (for training or float reference runs).
* `wo_a` arrives as FP8 in the download and is dequantised to bf16 here, as the official convert does.
* FP4 experts stored as F4 (`float4_e2m1fn_x2`, as the official convert writes them) are viewed as the
  int8 `[out, in/2]` bytes of a download, so the model holds the same tensor whichever file it came from.
* a `plain` export loaded in `exact` mode is re-quantised with the official block rule.

For model parallelism a rank either opens its own per-rank file (`model{r}-mp{N}.safetensors`, as
`dsv4 convert` writes them) or reads just its slices of a full checkpoint; in both cases the caller
passes a function that shards the meta model first, so only the rank's part is ever materialised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..model import Transformer
from ..model.layers import Linear
from ..model.rope import rope_frequencies
from ..parallel.rules import split_for_rank
from ..quant import (
    dequantize_fp4_weight,
    dequantize_fp8_weight,
    is_packed_fp4_dtype,
    quantize_fp4_weight,
    quantize_fp8_weight,
)
from .reader import Checkpoint, CheckpointError, format_problems
from .schema import FP8_TILE
from .validate import model_parallel_rank, validate

QUANTISED = (torch.float8_e4m3fn, torch.int8, torch.uint8, torch.float4_e2m1fn_x2)


def _dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 value of a stored FP8 or packed-FP4 weight."""
    if weight.dtype == torch.float8_e4m3fn:
        return dequantize_fp8_weight(weight, scale)
    return dequantize_fp4_weight(weight, scale)


class _Source:
    """Tensors for one rank, from a checkpoint (whole, per-rank, or sliced from a full one) or from an
    in-memory state dict; remembers what was asked for, so one error can list everything wrong."""

    def __init__(self, source: Checkpoint | Mapping[str, torch.Tensor], rank: int, world_size: int) -> None:
        self.ckpt = source if isinstance(source, Checkpoint) else None
        self.where = str(source.root) if self.ckpt else "state dict"
        self.names = source.tensors if self.ckpt else source
        self.mapping = None if self.ckpt else source
        self.slice_ranks, self.rank = 1, rank
        self.n_experts = source.args.n_routed_experts if self.ckpt else 0
        if self.ckpt is not None:
            file_rank, file_world = model_parallel_rank(self.ckpt)
            if file_world > 1 and (file_rank, file_world) != (rank, world_size):
                raise CheckpointError(f"{self.ckpt.files[0]} holds rank {file_rank} of {file_world}, "
                                      f"but this process is rank {rank} of {world_size}")
            self.slice_ranks = world_size if file_world == 1 else 1
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.problems: list[str] = []

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str) -> torch.Tensor | None:
        if name not in self.names:
            self.missing.append(name)
            return None
        self.used.add(name)
        if self.mapping is not None:
            return self.mapping[name]
        if self.slice_ranks == 1:
            return self.ckpt.tensor(name)
        stored = self.ckpt.tensors[name]
        tile = FP8_TILE if stored.dtype == "F8_E4M3" else 1
        part = split_for_rank(name, stored.shape, self.rank, self.slice_ranks, self.n_experts, tile)
        if part.dim is None:
            return self.ckpt.tensor(name)
        return self.ckpt.tensor_slice(name, part.dim, part.start, part.stop)

    def check_shape(self, name: str, value: torch.Tensor, shape: tuple[int, ...]) -> bool:
        if tuple(value.shape) != tuple(shape):
            self.problems.append(f"{name}: shape {list(value.shape)}, the model expects {list(shape)}")
            return False
        return True

    def raise_problems(self) -> None:
        unexpected = sorted(set(self.names) - self.used) if self.mapping is not None else []
        lines = [f"missing {n}" for n in self.missing] + [f"unexpected {n}" for n in unexpected] + self.problems
        if lines:
            raise CheckpointError(format_problems(self.where, "does not fit the model", lines))


def _assign(module: nn.Module, attr: str, value: torch.Tensor, device: torch.device, buffer: bool) -> None:
    value = value.to(device)
    if buffer:
        module._buffers[attr] = value
    else:
        module._parameters[attr] = nn.Parameter(value, requires_grad=value.is_floating_point()
                                                and value.dtype not in QUANTISED)


def _stored_shape(module: Linear, weight: torch.Tensor) -> tuple[int, int]:
    """The torch shape a weight of `module` has in `weight`'s storage format: packed FP4 (int8, uint8 or
    float4_e2m1fn_x2, whose header shape is the logical one) holds two inputs per element."""
    packed = weight.dtype in (torch.int8, torch.uint8) or is_packed_fp4_dtype(weight.dtype)
    return (module.out_features, module.in_features // 2 if packed else module.in_features)


def _packed_as_int8(weight: torch.Tensor | None) -> torch.Tensor | None:
    """An F4 (float4_e2m1fn_x2) weight as the int8 bytes a download holds: a view, no copy."""
    if weight is not None and weight.dtype == torch.float4_e2m1fn_x2:
        return weight.view(torch.int8)
    return weight


def _load_linear(module: Linear, prefix: str, src: _Source, exact: bool, requantise_plain: bool,
                 routed_dtype: str, device: torch.device) -> None:
    weight = _packed_as_int8(src.get(f"{prefix}.weight"))
    scale = src.get(f"{prefix}.scale") if f"{prefix}.scale" in src else None
    if weight is None or not src.check_shape(f"{prefix}.weight", weight, _stored_shape(module, weight)):
        return
    if weight.dtype in QUANTISED and scale is None:
        src.problems.append(f"{prefix}.weight: {weight.dtype} weight without its .scale")
        return
    target = module.weight.dtype  # the model's compute dtype for this weight
    if exact and module.official_format in ("fp8", "fp4") and weight.dtype in QUANTISED:
        _assign(module, "weight", weight, device, buffer=False)  # stays packed, as stored
        _assign(module, "scale", scale, device, buffer=True)
        return
    fmt = module.official_format if module.official_format != "fp4" else routed_dtype
    if exact and requantise_plain and fmt in ("fp8", "fp4"):  # a plain export back to the official formats
        q, s = (quantize_fp8_weight if fmt == "fp8" else quantize_fp4_weight)(weight.to(torch.float32))
        _assign(module, "weight", q, device, buffer=False)
        _assign(module, "scale", s, device, buffer=True)
        return
    value = _dequantize(weight, scale) if weight.dtype in QUANTISED else weight
    if module.official_format == "bf16":  # stored (or converted to) bf16: keep exactly its bf16 values
        value = value.to(torch.bfloat16)
    _assign(module, "weight", value.to(target), device, buffer=False)
    module.scale = None


def load_weights(model: Transformer, source: Checkpoint | Mapping[str, torch.Tensor], *, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", layout: str | None = None) -> Transformer:
    """Assign every parameter and buffer of a (meta-device, possibly sharded) `model`.

    `source` is a checkpoint (validated against its config unless `layout` says it already was) or
    a state dict under the official names (e.g. one rank's part); either way every missing, surplus
    or mis-shaped tensor is reported in one `CheckpointError`, and nothing is left on the meta device."""
    if isinstance(source, Checkpoint):
        layout = layout or validate(source)
    device = torch.device(device)
    exact = model.numerics == "exact"
    src = _Source(source, rank, world_size)
    requantise_plain = layout == "plain" and model.args.dtype == "fp8"
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, Linear):
            _load_linear(module, mname, src, exact, requantise_plain, model.args.routed_expert_dtype, device)
            continue
        for pname, param in list(module._parameters.items()):
            value = src.get(prefix + pname) if param is not None else None
            if value is not None and src.check_shape(prefix + pname, value, param.shape):
                _assign(module, pname, value.to(param.dtype), device, buffer=False)
        for bname, buf in list(module._buffers.items()):
            if buf is None or bname in module._non_persistent_buffers_set:
                continue
            value = src.get(prefix + bname)
            if value is not None and src.check_shape(prefix + bname, value, buf.shape):
                _assign(module, bname, value.to(buf.dtype), device, buffer=True)
    src.raise_problems()
    _rebuild_rope_tables(model, device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{src.where}: not loaded: {', '.join(leftover[:10])}")
    return model


def _rebuild_rope_tables(model: Transformer, device: torch.device) -> None:
    """Derived, non-persistent buffers (RoPE frequencies) are computed, not stored."""
    for module in model.modules():
        if "freqs" in module._buffers and module._buffers["freqs"].is_meta:
            module._buffers["freqs"] = rope_frequencies(model.args, compressed=module.ratio > 0).to(device)


def load_model(path: str | Path, *, numerics: str = "exact", dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
               shard: Callable[[Transformer], None] | None = None) -> Transformer:
    """Open, validate and load a checkpoint (HF release, converted, per-rank or plain) into a Transformer.

    `shard(model)` (required when world_size > 1) turns the meta model into rank `rank`'s part
    before anything is read, e.g. `lambda m: shard_model(m, rank, world_size)`."""
    if world_size > 1 and shard is None:
        raise ValueError("world_size > 1 needs a `shard` function for the meta model")
    path = Path(path)
    per_rank = path.is_dir() and any(path.glob("model*-mp*.safetensors"))
    ckpt = Checkpoint(path, rank=rank if per_rank else None)
    layout = validate(ckpt)
    with torch.device("meta"):
        model = Transformer(ckpt.args, dtype=dtype, numerics=numerics)
    if shard is not None:
        shard(model)
    load_weights(model, ckpt, rank=rank, world_size=world_size, device=device, layout=layout)
    model.checkpoint = ckpt  # keeps the memory maps (and their file handles) alive with the model
    return model.eval()
