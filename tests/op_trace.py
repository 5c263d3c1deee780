"""The ops a region of code runs, recorded so that two runs can be compared as a CUDA graph would see them.

A graph captures a step's kernels once and replays them with no Python in between: the same ops, on tensors of
the same shapes, reading the buffers that existed at capture time. So a step is capturable when every run of it
(at other positions, other token values) runs the same op sequence with the same non-tensor arguments, on tensors
of the same shapes, strides and dtypes, where every tensor it did not make itself is the same buffer each time.
`record_ops` writes each op as its name and arguments: a tensor the region made is named by its order among the
region's outputs (its address is the allocator's business: a replay reuses the capture's), any other tensor by
its address (the model's weights, the cache, the static input buffers), and every other value as it is.

On the CPU this is how a test proves a step capturable without a GPU. Triton's kernel launches are not ops of the
dispatcher (their grids and constants are functions of the shapes recorded here); under Triton's interpreter the
copies it makes of its tensors are, and record alike in every run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []
        self.made: dict[int, int] = {}  # storage address -> which output of the region made it (the latest)
        self.outputs = 0

    def _where(self, address: int) -> tuple:
        return ("made", self.made[address]) if address in self.made else ("outside", address)

    def _describe(self, value):
        if isinstance(value, torch.UntypedStorage):  # (Triton's interpreter sets tensors to storages)
            return ("storage", self._where(value.data_ptr()), value.nbytes())
        if isinstance(value, float) and math.isnan(value):
            return "nan"  # (equal to itself)
        if not isinstance(value, torch.Tensor):
            return value
        return (self._where(value.untyped_storage().data_ptr()), tuple(value.shape), tuple(value.stride()),
                value.storage_offset(), value.dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((str(func), tree_map(self._describe, args), tree_map(self._describe, kwargs)))
        out = func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # new, not in place
                self.made[t.untyped_storage().data_ptr()] = self.outputs
                self.outputs += 1
        return out


@contextlib.contextmanager
def record_ops() -> Iterator[list[tuple]]:
    """The ops the block runs, as (op, args, kwargs) with tensors described as the module docstring says."""
    recorder = _Recorder()
    with recorder:
        yield recorder.ops


def first_difference(a: list[tuple], b: list[tuple]) -> str | None:
    """Where two recordings part (None: they are the same), for an assertion's message."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"op {i}: {x}\n    vs {y}"
    return None if len(a) == len(b) else f"lengths {len(a)} vs {len(b)}"
