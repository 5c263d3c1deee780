"""How the official code splits a checkpoint across N model-parallel ranks (spec §3.10, §5.3).

One rule set serves the offline converter (per-rank shard files) and the runtime sharding of a model,
so the two can never disagree:

* column-parallel (dim 0): `embed`, `head` (vocab), attention `wq_b` (heads), indexer `wq_b` and
  `weights_proj` (index heads), `wo_a` (output groups), `attn_sink` (heads);
* row-parallel (dim 1): `wo_b` (its input is the concatenation of the groups);
* routed experts whole, expert e on rank e // (E / N);
* everything else replicated (`wq_a`, `wkv`, norms, compressors, gates and `tid2eid`, shared expert,
  mHC parameters, MTP projections).

A block `.scale` follows its weight along the same dim; an FP8 weight can only be split where every
rank's part is a whole number of 128-row (or column) tiles, which `split_for_rank` checks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_COLUMN = ("embed.weight", "head.weight", ".wq_b.weight", ".wq_b.scale", ".wo_a.weight", ".wo_a.scale",
           ".attn_sink", ".weights_proj.weight")
_ROW = (".wo_b.weight", ".wo_b.scale")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


class ShardingError(ValueError):
    """A tensor cannot be split evenly across the requested number of ranks."""


def split_dim(name: str) -> int | None:
    """The dim along which `name` is split, or None when it is replicated (or a whole expert)."""
    if name.startswith("mtp.") and name.endswith(("embed.weight", "head.weight")):
        return None  # MTP blocks share the main embed/head; the release has no such keys
    if name.endswith(_COLUMN) or name in ("embed.weight", "head.weight"):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


def expert_id(name: str) -> int | None:
    """The routed-expert index a key belongs to (None for non-expert keys, incl. the shared expert)."""
    match = _EXPERT.search(name)
    return int(match.group(1)) if match else None


def expert_owner(expert: int, n_experts: int, world_size: int) -> int:
    if n_experts % world_size:
        raise ShardingError(f"{n_experts} routed experts cannot be split across {world_size} ranks")
    return expert // (n_experts // world_size)


def local_experts(rank: int, n_experts: int, world_size: int) -> range:
    per_rank = n_experts // world_size
    if n_experts % world_size:
        raise ShardingError(f"{n_experts} routed experts cannot be split across {world_size} ranks")
    return range(rank * per_rank, (rank + 1) * per_rank)


@dataclass(frozen=True)
class RankSlice:
    """What rank `rank` holds of a tensor: all of it (dim None), a contiguous slice, or nothing."""

    keep: bool
    dim: int | None = None
    start: int = 0
    stop: int = 0


def split_for_rank(name: str, shape: tuple[int, ...], rank: int, world_size: int, n_experts: int,
                   tile: int = 1) -> RankSlice:
    """Rank `rank`'s part of tensor `name`; `tile` = 128 for a block-quantised FP8 weight, whose parts
    must be whole tiles so that each rank's slice of `.scale` covers exactly its slice of the weight."""
    if not 0 <= rank < world_size:
        raise ShardingError(f"rank {rank} outside [0, {world_size})")
    expert = expert_id(name)
    if expert is not None:
        return RankSlice(keep=expert_owner(expert, n_experts, world_size) == rank)
    dim = split_dim(name)
    if dim is None or world_size == 1:
        return RankSlice(keep=True)
    if dim >= len(shape) or shape[dim] % world_size:
        raise ShardingError(f"{name}: dim {dim} of shape {list(shape)} is not divisible by {world_size} ranks")
    part = shape[dim] // world_size
    if part % tile:
        raise ShardingError(f"{name}: {world_size} parts of {part} along dim {dim} split its {tile}x{tile} "
                            "scale tiles; choose a world size that keeps whole tiles")
    return RankSlice(keep=True, dim=dim, start=rank * part, stop=(rank + 1) * part)
