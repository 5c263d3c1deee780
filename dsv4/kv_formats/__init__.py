"""KV-cache storage formats: one registry entry per format, with its row layout, its codec and its bytes per entry.

A format decides how the cached rows are stored; there are two kinds of row: "kv" (the sliding-window ring rows
and the compressed entries of CSA and HCA layers, head_dim wide) and "index" (the CSA indexer's compressed
keys, index_head_dim wide). The compressors' fp32 tails are state, not rows, and stay fp32 in every format.

* "model": rows in the model's own dtype (the reference; fp32 for a float32 model);
* "bf16": rows in bf16 (the spec's all-bf16 accounting; lossless for a bf16 model);
* "fp8": the production layouts of the official kernels (spec §4.2, `fp8.py`): 584-byte main entries with
  FP8 nope dims, 68-byte FP4 indexer keys; lossless only for rows the exact numerics already rounded, so only
  for a bf16 model in exact numerics.

The engine's paged cache allocates pools and rings from `layout` and stores through `codec`
(`dsv4.engine.kv_cache`), and the planner takes its bytes per entry from `entry_bytes` (`dsv4.plan`): one byte
formula for both. A new format is one `KVFormat` subclass and one line in `FORMATS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelArgs
from ..kernels import RowCodec
from .fp8 import PackedCodec, index_key_layout, kv_layout

KINDS = ("kv", "index")


@dataclass(frozen=True)
class RowLayout:
    """One stored row: `width` elements of `dtype`."""

    width: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.width * self.dtype.itemsize


def row_dim(args: ModelArgs, kind: str) -> int:
    """The compute width of a row of `kind`: head_dim for "kv", index_head_dim for "index"."""
    if kind not in KINDS:
        raise ValueError(f"unknown KV row kind {kind!r}; choose from {', '.join(KINDS)}")
    return args.head_dim if kind == "kv" else args.index_head_dim


class CastCodec:
    """Rows stored in a narrower float dtype than the compute dtype (bf16 rows under an fp32 model)."""

    def __init__(self, format: str, kind: str, stored: torch.dtype, compute: torch.dtype) -> None:
        self.format, self.kind, self.stored, self.compute = format, kind, stored, compute

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(self.stored)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.compute)

    def round_trips(self, dtype: torch.dtype, exact: bool) -> bool:
        return dtype == self.stored


class KVFormat:
    """A storage format of KV rows. `compute` is the dtype rows are computed in (the model's)."""

    name: str
    summary: str

    def layout(self, args: ModelArgs, kind: str, compute: torch.dtype) -> RowLayout:
        raise NotImplementedError

    def codec(self, args: ModelArgs, kind: str, compute: torch.dtype) -> RowCodec | None:
        """How rows are stored and read back; None when the stored rows are the compute rows."""
        raise NotImplementedError

    def check_model(self, dtype: torch.dtype, numerics: str) -> None:
        """Raise ValueError if this format would lose information for a model of `dtype` and `numerics`."""

    def entry_bytes(self, args: ModelArgs, kind: str, compute: torch.dtype = torch.bfloat16) -> int:
        """Bytes of one stored row (the planner's unit; `compute` defaults to V4's activation dtype, bf16)."""
        return self.layout(args, kind, compute).nbytes


class ModelDtype(KVFormat):
    name = "model"
    summary = "rows in the model's dtype (the reference)"

    def layout(self, args: ModelArgs, kind: str, compute: torch.dtype) -> RowLayout:
        return RowLayout(row_dim(args, kind), compute)

    def codec(self, args: ModelArgs, kind: str, compute: torch.dtype) -> RowCodec | None:
        return None


class Bf16(KVFormat):
    name = "bf16"
    summary = "rows in bf16"

    def layout(self, args: ModelArgs, kind: str, compute: torch.dtype) -> RowLayout:
        return RowLayout(row_dim(args, kind), torch.bfloat16)

    def codec(self, args: ModelArgs, kind: str, compute: torch.dtype) -> RowCodec | None:
        return None if compute == torch.bfloat16 else CastCodec(self.name, kind, torch.bfloat16, compute)


class Fp8(KVFormat):
    name = "fp8"
    summary = "production layouts: FP8 nope dims + bf16 rope dims + ue8m0 scales; FP4 indexer keys"

    def layout(self, args: ModelArgs, kind: str, compute: torch.dtype) -> RowLayout:
        if kind == "kv":
            return RowLayout(kv_layout(args.head_dim, args.rope_head_dim)[3], torch.uint8)
        return RowLayout(index_key_layout(row_dim(args, kind))[2], torch.uint8)

    def codec(self, args: ModelArgs, kind: str, compute: torch.dtype) -> RowCodec | None:
        return PackedCodec(kind, row_dim(args, kind), args.rope_head_dim, compute)

    def check_model(self, dtype: torch.dtype, numerics: str) -> None:
        if numerics != "exact" or dtype != torch.bfloat16:
            raise ValueError("the fp8 KV format is lossless only for a bf16 model in exact numerics "
                             f"(this model: {dtype}, {numerics})")


FORMATS: dict[str, KVFormat] = {f.name: f for f in (ModelDtype(), Bf16(), Fp8())}


def format_names() -> tuple[str, ...]:
    return tuple(FORMATS)


def get_format(name: str) -> KVFormat:
    """The registered format `name`; ValueError naming the choices otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown KV format {name!r}; choose from {', '.join(FORMATS)}") from None


__all__ = ["FORMATS", "KINDS", "CastCodec", "KVFormat", "RowLayout", "format_names", "get_format", "row_dim"]
