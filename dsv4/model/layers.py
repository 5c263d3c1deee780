"""Basic layers: a Linear that dispatches on its weight's storage format, RMSNorm, and Embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels


class Linear(nn.Module):
    """y = x W^T with W stored as in the official checkpoint.

    The weight may be a float tensor (plain math, differentiable), FP8 e4m3 with a 128x128 block
    `scale`, or packed FP4 with a 1x32 `scale`; `dsv4.kernels.linear` picks the GEMM from the dtype.
    `official_format` records how the official checkpoint stores this weight ("fp8", "fp4",
    "bf16" or "fp32"), so quantizers and loaders outside the model know what to do with it.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None,
                 official_format: str = "fp8") -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.official_format = official_format
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.register_buffer("scale", None)

    def forward(self, x: Tensor) -> Tensor:
        return kernels.linear(x, self.weight, self.scale)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, weight={self.weight.dtype}, official={self.official_format}"


class RMSNorm(nn.Module):
    """RMSNorm in fp32 with an fp32 weight (the checkpoint stores bf16); output in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class Embedding(nn.Module):
    """Token embedding table (`embed.weight` [vocab, dim])."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim, dtype=dtype))

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)
