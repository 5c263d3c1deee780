"""FSDP2 units see only their tensor arguments; everything else travels past FSDP2 in an opaque box.

FSDP2 rebuilds the dataclasses, lists and dicts among a unit's inputs that hold tensors requiring grad (to hook its
post-backward onto them; on GPU also to move them to the device; with mixed precision to cast them). The model's
`ForwardContext` carries the `ForwardTrace` whose lists the layers append to (routing records with differentiable
scores, indexer losses, mHC maps): a rebuilt copy would swallow every record after the first. So around FSDP2's own
pre-forward the arguments are packed (tensors as they are, the rest in a `Box`) and unpacked again just before
`forward` runs, by two forward pre-hooks (`box_inputs`) or, for the extra entry points of the root, by a wrapper
around FSDP2's forward method (`register_root_method`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.distributed.fsdp import register_fsdp_forward_method


class Box:
    """Not a dataclass, tuple, list or dict: FSDP2 passes it through untouched."""

    __slots__ = ("template", "where", "kwargs")

    def __init__(self, template: list, where: list[int], kwargs: dict) -> None:
        self.template, self.where, self.kwargs = template, where, kwargs


def pack(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """(tensor args..., Box of the rest), {tensor kwargs}."""
    where = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
    box = Box([None if isinstance(a, Tensor) else a for a in args], where,
              {k: v for k, v in kwargs.items() if not isinstance(v, Tensor)})
    return (*(args[i] for i in where), box), {k: v for k, v in kwargs.items() if isinstance(v, Tensor)}


def unpack(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inverse of `pack`, with the tensors as FSDP2 handed them on."""
    *tensors, box = args
    full = list(box.template)
    for i, t in zip(box.where, tensors, strict=True):
        full[i] = t
    return tuple(full), {**kwargs, **box.kwargs}


def box_inputs(module: nn.Module) -> None:
    """Pack `module`'s call arguments before its FSDP2 pre-forward hook and unpack them after it. Call after
    `fully_shard(module)`: FSDP2 prepends its hook, and this one is put in front of it."""
    module.register_forward_pre_hook(lambda _, args, kwargs: pack(args, kwargs), prepend=True, with_kwargs=True)
    module.register_forward_pre_hook(lambda _, args, kwargs: unpack(args, kwargs), with_kwargs=True)


def register_root_method(model: nn.Module, name: str) -> None:
    """`register_fsdp_forward_method` for `model.<name>` (an entry point called instead of `forward`), its inputs
    boxed like `box_inputs` does for `__call__`."""
    original = getattr(type(model), name)

    def unpacked(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = unpack(args, kwargs)
        return original(self, *args, **kwargs)

    inner = f"_fsdp_{name}"
    setattr(model, inner, unpacked.__get__(model, type(model)))
    register_fsdp_forward_method(model, inner)
    hooked = getattr(model, inner)

    def packed(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = pack(args, kwargs)
        return hooked(*args, **kwargs)

    setattr(model, name, packed)
