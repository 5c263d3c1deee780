"""Check an opened checkpoint against what its config says it must contain.

All problems are collected and reported together - missing, unexpected, mis-shaped and mis-typed
tensors - so a damaged download is diagnosed in one run instead of one failure at a time, and a
load never proceeds on a partial or inconsistent set of tensors. Shapes are compared as the header has
them (for an F4 tensor the logical `[out, in]`); where the converted layout has an F4 expert weight,
the release's I8 `[out, in/2]` of the same bytes is accepted too.
"""

from __future__ import annotations

import dataclasses

from ..parallel.rules import ShardingError, expert_id, split_for_rank
from .reader import MP_FILE, Checkpoint, CheckpointError, StoredTensor, format_problems
from .schema import FP8_TILE, LAYOUTS, PACKED_FP4, TensorSpec, expected_tensors

LAYOUT_KEY = "dsv4_layout"  # safetensors metadata written by dsv4 (the release has none)
FLOAT_KEY = "dsv4_float_dtype"


def detect_layout(ckpt: Checkpoint) -> tuple[str, str]:
    """(layout, float dtype) of a checkpoint: from dsv4's metadata, else from how it is stored.

    A download (hf) has FP8 `wo_a` and I8 FP4 experts; the official convert.py output (converted) has
    BF16 `wo_a` (when the model is FP8 at all) and F4 experts."""
    layouts = {m.get(LAYOUT_KEY) for m in ckpt.metadata.values()} - {None}
    if len(layouts) > 1:
        raise CheckpointError(f"{ckpt.root}: shards disagree on their layout: {sorted(layouts)}")
    if layouts:
        layout = layouts.pop()
        if layout not in LAYOUTS:
            raise CheckpointError(f"{ckpt.root}: unknown {LAYOUT_KEY} {layout!r} in the shard metadata")
        floats = {m.get(FLOAT_KEY, "BF16") for m in ckpt.metadata.values()}
        return layout, floats.pop() if len(floats) == 1 else "BF16"
    first_wo_a = next((n for n in ckpt.tensors if n.endswith(".attn.wo_a.weight")), None)
    if first_wo_a is not None and ckpt.tensors[first_wo_a].dtype == "BF16" and ckpt.args.dtype == "fp8":
        return "converted", "BF16"
    if any(t.dtype == "F4" and expert_id(n) is not None for n, t in ckpt.tensors.items()):
        return "converted", "BF16"
    return "hf", "BF16"


def _same_packed_fp4(stored: StoredTensor, spec: TensorSpec) -> bool:
    """A converted-layout F4 expert weight stored the release's way, as I8 `[out, in/2]` (the same bytes;
    per-rank files dsv4 wrote before it used F4 look like this)."""
    return spec.dtype == "F4" and stored.dtype in PACKED_FP4 and stored.shape == spec.torch_shape


def model_parallel_rank(ckpt: Checkpoint) -> tuple[int, int]:
    """(rank, world size) of a per-rank file checkpoint opened for one rank; (0, 1) otherwise."""
    if len(ckpt.files) == 1:
        match = MP_FILE.match(ckpt.files[0].name)
        if match:
            return int(match.group(1)), int(match.group(2))
    return 0, 1


def rank_specs(specs: dict[str, TensorSpec], rank: int, world_size: int, n_experts: int) -> dict[str, TensorSpec]:
    """The tensors rank `rank` holds when `specs` is split the official way across `world_size` ranks."""
    out = {}
    for name, spec in specs.items():
        tile = FP8_TILE if spec.fmt == "fp8" and spec.dtype == "F8_E4M3" else 1
        part = split_for_rank(name, spec.shape, rank, world_size, n_experts, tile)
        if not part.keep:
            continue
        if part.dim is not None:
            shape = list(spec.shape)
            shape[part.dim] = part.stop - part.start
            spec = dataclasses.replace(spec, shape=tuple(shape))
        out[name] = spec
    return out


def expected_for(ckpt: Checkpoint) -> tuple[str, dict[str, TensorSpec]]:
    layout, float_dtype = detect_layout(ckpt)
    specs = expected_tensors(ckpt.args, layout, float_dtype)
    rank, world = model_parallel_rank(ckpt)
    if world > 1:
        try:
            specs = rank_specs(specs, rank, world, ckpt.args.n_routed_experts)
        except ShardingError as err:
            raise CheckpointError(f"{ckpt.files[0]}: config cannot be split {world} ways: {err}") from None
    return layout, specs


def validate(ckpt: Checkpoint) -> str:
    """Raise one `CheckpointError` listing every mismatch; return the layout when all is well."""
    layout, specs = expected_for(ckpt)
    problems = []
    for name, spec in specs.items():
        stored = ckpt.tensors.get(name)
        if stored is None:
            problems.append(f"missing {name} {list(spec.shape)} {spec.dtype}")
            continue
        if _same_packed_fp4(stored, spec):
            continue
        if stored.shape != spec.shape:
            problems.append(f"{name} in {stored.file.name}: shape {list(stored.shape)}, expected {list(spec.shape)}")
        if stored.dtype != spec.dtype:
            problems.append(f"{name} in {stored.file.name}: dtype {stored.dtype}, expected {spec.dtype}")
    for name, stored in ckpt.tensors.items():
        if name not in specs:
            problems.append(f"unexpected {name} {list(stored.shape)} {stored.dtype} in {stored.file.name}")
    if problems:
        raise CheckpointError(format_problems(ckpt.root, f"does not match its config ({layout} layout)", problems))
    return layout
