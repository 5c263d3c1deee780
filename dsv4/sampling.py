"""Token sampling as the official generate.py does it: softmax(logits / T) divided by i.i.d.
Exp(1) noise, then argmax (an exact categorical sample without a cumulative sum); T <= 0 is greedy."""

from __future__ import annotations

import torch
from torch import Tensor


def sample(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] -> token ids [B]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.to(torch.float32) / max(temperature, 1e-5), dim=-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)
