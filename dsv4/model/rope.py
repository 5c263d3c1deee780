"""Rotary position embedding as DeepSeek-V4 uses it.

Interleaved pairs (x[2i], x[2i+1]) on the *last* `rope_head_dim` dims of a vector, math in fp32.
Sliding-only layers rotate with base `rope_theta` and no scaling; compressed layers (CSA/HCA, their
compressors and indexer) with base `compress_rope_theta` and YaRN frequency interpolation. There is
no YaRN attention temperature (mscale) anywhere: the softmax scale stays head_dim^-0.5.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import ModelArgs


def rope_frequencies(args: ModelArgs, compressed: bool) -> Tensor:
    """Per-pair angular frequencies [rope_head_dim // 2] (fp32) for a layer type."""
    dim = args.rope_head_dim
    base = args.compress_rope_theta if compressed else args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not compressed or args.original_seq_len == 0:
        return freqs

    def correction_dim(rotations: float) -> float:
        # the dim index whose wavelength fits `rotations` times into the original context
        return dim * math.log(args.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(correction_dim(args.beta_fast)), 0)
    hi = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    # high-frequency pairs (ramp 0) extrapolate, low-frequency pairs (ramp 1) interpolate by the factor
    return freqs / args.rope_factor * ramp + freqs * (1 - ramp)


def rope_cos_sin(freqs: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin of the rotation angles: positions [...] -> two fp32 tensors [..., rope_head_dim // 2].

    Taken from torch.polar like the reference's table: its cos/sin round differently from
    torch.cos/torch.sin in the last bit, which can flip a bf16 rounding of the rotated vector."""
    # (an integer position times the fp32 frequency: the product promotes the position to fp32 first, as a cast
    # would, in one kernel instead of two)
    angles = positions.unsqueeze(-1) * freqs.to(positions.device)
    rotation = torch.polar(torch.ones_like(angles), angles)
    # [2, ..., rope/2] in one copy: both halves contiguous once, not in every rope that reads them
    cos_sin = torch.view_as_real(rotation).movedim(-1, 0).contiguous()
    return cos_sin[0], cos_sin[1]
