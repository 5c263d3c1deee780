"""What the routed-experts op is given: each expert's SwiGLU weights as the checkpoint stores them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's w1 (gate), w3 (up) and w2 (down) weights with their block scales (None for float weights):
    y = w2((silu(min(w1 x, L)) * clamp(w3 x, -L, L)) * routing weight)."""

    w1: Tensor
    s1: Tensor | None
    w3: Tensor
    s3: Tensor | None
    w2: Tensor
    s2: Tensor | None
