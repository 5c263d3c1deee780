"""Put a model's weights into the storage formats of the official checkpoint, from outside the model.

Every `Linear` records how the official release stores it (`official_format`): FP8 e4m3 with
128x128 ue8m0 block scales (most projections), packed FP4 e2m1 with 1x32 ue8m0 scales (routed
experts), or bf16 (wo_a after the official convert, compressor and indexer projections, the head).
Norms, the gate and the embedding are bf16 in the checkpoint too. `to_official_formats` converts a
float model into exactly what loading an official checkpoint produces, so random-weight tests can
exercise the `exact` numerics without a download; the checkpoint loader produces the same layout.
"""

from __future__ import annotations

import torch
from torch import nn

from .model.layers import Linear
from .model.transformer import Transformer
from .quant import quantize_fp4_weight, quantize_fp8_weight


def _round_through_bf16(param: torch.Tensor) -> None:
    param.copy_(param.to(torch.bfloat16).to(param.dtype))


@torch.no_grad()
def to_official_formats(model: Transformer, expert_dtype: str | None = None) -> Transformer:
    """Quantise in place: FP8/FP4 linears become packed weights + `scale`, bf16-stored tensors are
    rounded to bf16 values (kept in their compute dtype, as the reference upcasts them)."""
    expert_dtype = expert_dtype or model.args.routed_expert_dtype
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        fmt = module.official_format
        if fmt == "fp4" and expert_dtype != "fp4":
            fmt = expert_dtype
        if fmt == "fp8" and model.args.dtype == "bf16":
            fmt = "bf16"
        weight = module.weight.detach().to(torch.float32)
        if fmt == "fp8":
            q, scale = quantize_fp8_weight(weight)
        elif fmt == "fp4":
            q, scale = quantize_fp4_weight(weight)
        else:
            _round_through_bf16(module.weight)
            continue
        module.weight = nn.Parameter(q, requires_grad=False)
        module.scale = scale
    for name, param in model.named_parameters():
        if name.endswith(("norm.weight", "gate.weight", "embed.weight")):
            _round_through_bf16(param)
    return model
