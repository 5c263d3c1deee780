"""Save a dsv4 model as an official checkpoint (the inverse of the loader).

Whatever the model holds - float weights after training, or the official FP8/FP4 formats after a
load - each tensor is written in the storage format the layout prescribes: float weights are
quantised with the canonical block rule, stored FP8/FP4 weights are written as they are, `wo_a`
(bf16 in the model) is re-quantised to FP8 for the `hf` layout and kept for `converted`, packed FP4
experts (int8 in the model) are written as I8 for `hf` and as F4 (the same bytes viewed as
float4_e2m1fn_x2, as the official convert.py writes them) for `converted`, and the bf16-stored tensors
the model computes in fp32 (norms, gate, compressor projections, head) are written as bf16. A model
loaded from a checkpoint and saved again reproduces it bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..model import Transformer
from ..quant import (
    dequantize_fp4_weight,
    dequantize_fp8_weight,
    is_packed_fp4_dtype,
    quantize_fp4_weight,
    quantize_fp8_weight,
)
from .maker import write_checkpoint
from .schema import DTYPES, expected_tensors


def _float_weight(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if weight.dtype == torch.float8_e4m3fn:
        return dequantize_fp8_weight(weight, scale)
    if weight.dtype in (torch.int8, torch.uint8) or is_packed_fp4_dtype(weight.dtype):
        return dequantize_fp4_weight(weight, scale)
    return weight.detach().float()


def model_tensors(model: Transformer, layout: str = "hf") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of `model` in the official storage formats of `layout`, in schema order."""
    if getattr(model, "tensor_parallel", None) is not None and model.tensor_parallel.world_size > 1:
        raise ValueError("save the full model: this one is one rank's shard")
    state = model.state_dict()
    specs = expected_tensors(model.args, layout)
    for name, spec in specs.items():
        if name.endswith(".scale") and spec.fmt in ("fp8", "fp4"):
            continue  # written with its weight
        tensor = state[name]
        if spec.fmt in ("fp8", "fp4"):
            scale_name = name.removesuffix(".weight") + ".scale"
            if spec.fmt == "fp8":
                stored = tensor.dtype == torch.float8_e4m3fn
            else:  # packed FP4 (int8 in a loaded model; uint8 or float4_e2m1fn_x2 in a state dict)
                stored = tensor.dtype == torch.uint8 or is_packed_fp4_dtype(tensor.dtype)
            if stored:
                q, s = tensor, state[scale_name]
            else:
                quantize = quantize_fp8_weight if spec.fmt == "fp8" else quantize_fp4_weight
                q, s = quantize(_float_weight(tensor, state.get(scale_name)))
            if spec.fmt == "fp4":  # the packed bytes as the layout stores them: I8 (hf) or F4 (converted)
                q = q.view(DTYPES[spec.dtype])
            yield name, q
            yield scale_name, s
        else:
            yield name, tensor.detach().to(DTYPES[spec.dtype]).contiguous()


def save_model(model: Transformer, path: str | Path, *, layout: str = "hf", shards: int | None = None,
               max_shard_bytes: int = 4 << 30) -> Path:
    """Write `model` as config.json + index + shards in the official `layout` ("hf" or "converted")."""
    if layout not in ("hf", "converted"):
        raise ValueError(f"save_model writes the official layouts hf or converted, not {layout!r}")
    return write_checkpoint(path, model.args, model_tensors(model, layout), layout=layout, shards=shards,
                            max_shard_bytes=max_shard_bytes)
