"""Allocation-free summaries of a checkpoint (from its headers) or of a config (from the schema).

Counts per component - tensors, bytes, parameters (a packed FP4 byte holds two, whether stored as the
release's I8 or as convert.py's F4 with its logical shape; block scales and the `tid2eid` table hold
none) and parameters used per token (routed experts contribute k/E of theirs) - separately for the
main model and the MTP block, plus the dtype histogram. For a preset this is the release's own
arithmetic (Flash: 69,187 tensors, 290,942,289,362 parameters); for a directory it is what is
actually on disk, whatever the layout.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from ..config import ModelArgs
from .reader import Checkpoint
from .schema import TensorSpec, active_parameters, expected_tensors
from .validate import detect_layout

COMPONENTS = ("embed", "attention", "compressor", "indexer", "gate", "routed_experts", "shared_expert", "mhc", "norm",
              "mtp_proj", "head", "other")


@dataclass
class Tally:
    tensors: int = 0
    bytes: int = 0
    parameters: int = 0
    active: float = 0.0

    def add(self, spec: TensorSpec, args: ModelArgs) -> None:
        self.tensors += 1
        self.bytes += spec.nbytes
        self.parameters += spec.parameters
        self.active += active_parameters(spec, args)


@dataclass
class Summary:
    """What `dsv4 inspect` prints."""

    args: ModelArgs
    layout: str
    files: int
    main: dict[str, Tally] = field(default_factory=dict)  # component -> tally
    mtp: dict[str, Tally] = field(default_factory=dict)
    dtypes: Counter = field(default_factory=Counter)  # dtype -> tensors
    dtype_bytes: Counter = field(default_factory=Counter)

    @property
    def tensors(self) -> int:
        return sum(self.dtypes.values())

    @property
    def bytes(self) -> int:
        return sum(self.dtype_bytes.values())

    def total(self, part: str) -> Tally:
        out = Tally()
        for t in getattr(self, part).values():
            out.tensors += t.tensors
            out.bytes += t.bytes
            out.parameters += t.parameters
            out.active += t.active
        return out


def summarize_specs(args: ModelArgs, specs: list[TensorSpec], layout: str, files: int = 0) -> Summary:
    summary = Summary(args, layout, files)
    for spec in specs:
        part = summary.mtp if spec.block.startswith("mtp.") else summary.main
        part.setdefault(spec.component, Tally()).add(spec, args)
        summary.dtypes[spec.dtype] += 1
        summary.dtype_bytes[spec.dtype] += spec.nbytes
    return summary


def summarize_config(args: ModelArgs, layout: str = "hf") -> Summary:
    """The release's tensors for `args`, from the schema alone."""
    return summarize_specs(args, list(expected_tensors(args, layout).values()), layout)


def summarize_checkpoint(ckpt: Checkpoint) -> Summary:
    """What the checkpoint's headers say, classified with the schema's components.

    Tensors are taken as stored (their real shapes and dtypes), so a per-rank file or a damaged
    download is described as it is; names the schema does not know are counted under "other"."""
    layout, float_dtype = detect_layout(ckpt)
    known = expected_tensors(ckpt.args, layout, float_dtype)
    specs = []
    for name, stored in ckpt.tensors.items():
        ref = known.get(name)
        block = name.split(".")[0] + "." + name.split(".")[1] if name.startswith(("layers.", "mtp.")) else "top"
        if ref is None:
            ref = TensorSpec(name, stored.shape, stored.dtype, "other", block)
        # the stored header's shape and dtype: an I8 FP4 weight counts two parameters per byte, an F4 one
        # (logical shape) one per element and half a byte each
        specs.append(dataclasses.replace(ref, shape=stored.shape, dtype=stored.dtype))
    return summarize_specs(ckpt.args, specs, layout, len(ckpt.files))

