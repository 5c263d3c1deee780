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

    def forward(self, x: Tensor, quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [..., in] -> [..., out]; `quantized`: act_quant(x) where the caller has it (see `reads_quantized`)."""
        return kernels.linear(x, self.weight, self.scale, quantized)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, weight={self.weight.dtype}, official={self.official_format}"


def reads_quantized(*linears: nn.Module) -> bool:
    """Whether each of these linears multiplies its input's FP8 quantisation (an FP8 or FP4 weight, the module's own
    forward), so that one `act_quant` of an input they share serves them all: `RMSNorm`'s `quantize` makes it with
    the norm, and `project` hands it over."""
    return all(_plain(m) and m._buffers.get("scale") is not None for m in linears)


def _plain(module: nn.Module) -> bool:
    """A `Linear` that runs its own forward (not a subclass's, nor one patched onto the instance): what it computes is
    `kernels.linear` of its weight, which a caller may then compute its own way."""
    return isinstance(module, Linear) and type(module).forward is Linear.forward and "forward" not in module.__dict__


def float_weight(linear: nn.Module) -> Tensor | None:
    """The float weight a linear multiplies, where it is a plain `Linear` (its own forward, no scale): a kernel may
    then compute ``linear(x)`` from the weight with what follows it. None for a quantised, wrapped or replaced one,
    which is called as the module it is."""
    if not _plain(linear):
        return None
    weight = linear.weight
    return weight if weight.is_floating_point() and linear._buffers.get("scale") is None else None


def project(linear: nn.Module, x: Tensor, quantized: tuple[Tensor, Tensor] | None) -> Tensor:
    """linear(x), given act_quant(x) where the caller has it (None: plainly linear(x)). A linear gets `quantized`
    only where `reads_quantized` says it takes it."""
    return linear(x) if quantized is None else linear(x, quantized)


def project_pair(first: nn.Module, second: nn.Module, x: Tensor, quantized: tuple[Tensor, Tensor] | None
                 ) -> tuple[Tensor, Tensor]:
    """(first(x), second(x)) for two linears of one input, given act_quant(x) where the caller has it: one
    `kernels.linears` op where both are plain quantised `Linear`s handed it (a backend may run both GEMMs as one
    launch), else each as the module it is (`project`; the quantisation handed to those that read it)."""
    if quantized is not None and reads_quantized(first, second):
        a, b = kernels.linears(x, [(first.weight, first.scale), (second.weight, second.scale)], quantized)
        return a, b
    return tuple(project(m, x, quantized if reads_quantized(m) else None) for m in (first, second))


class RMSNorm(nn.Module):
    """RMSNorm in fp32 with an fp32 weight (the checkpoint stores bf16); output in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: Tensor, quantize: bool = False
                ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The normed x; with `quantize` (inference, where quantised linears read the output), the pair (normed x,
        its act_quant), the second None where the backend's linears quantise their input themselves."""
        if quantize:
            return kernels.rms_norm_quant(x, self.weight, self.eps)
        return kernels.rms_norm(x, self.weight, self.eps)


def norm_weight(norm: nn.Module) -> Tensor | None:
    """The weight of an `RMSNorm` that runs its own forward (not a subclass's, nor one patched onto the instance): a
    kernel may then norm its rows as part of what makes them (`kernels.hc_pre_norm`). None otherwise: the module
    is called as it is."""
    plain = isinstance(norm, RMSNorm) and type(norm).forward is RMSNorm.forward and "forward" not in norm.__dict__
    return norm.weight if plain else None


class Embedding(nn.Module):
    """Token embedding table (`embed.weight` [vocab, dim])."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim, dtype=dtype))

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)
