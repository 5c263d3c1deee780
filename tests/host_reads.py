"""Counting where dsv4's code reads a device value on the host: each such read waits for the device to finish
everything queued before it (a sync), and none can be captured in a CUDA graph.

On the CPU nothing waits, so the reads are recognised by what they are: an op whose result the host reads
(`_local_scalar_dense`: `.item()`, `bool(t)`, `int(t)`), an op whose output size depends on the values (`nonzero`,
`masked_select`, `unique`, `bincount`, `repeat_interleave` without `output_size`, indexing with a boolean mask), and
the copies out (`Tensor.tolist`, `.cpu()`, `.numpy()`), each counted where the nearest caller outside torch is in
the `dsv4` package (Triton's interpreter reads its tensors on the host too; those are not dsv4's).

Under inference mode (the engine's) composite ops reach the dispatcher undecomposed: `bool(t)` and `.item()` as
`is_nonzero` and `item` rather than `_local_scalar_dense`, `nonzero(as_tuple=True)`, `torch.where(c)` and
`argwhere` as themselves rather than `nonzero`; each counts."""

from __future__ import annotations

import collections
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsv4

PACKAGE = str(Path(dsv4.__file__).parent) + "/"
TORCH = str(Path(torch.__file__).parent) + "/"
HERE = __file__

# op overload packets whose every call reads the device (or sizes its output from the values)
READ_OPS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "nonzero_numpy", "argwhere", "masked_select",
            "_unique2", "unique_dim", "unique_consecutive", "bincount"}
COPIES_OUT = ("tolist", "cpu", "numpy")  # Tensor methods that read without an op the dispatcher shows for CPU tensors


def _site() -> str | None:
    """file:line of the nearest caller outside torch and this module, if it is in dsv4."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH) or frame.f_code.co_filename == HERE):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(PACKAGE):
        return None
    return f"{frame.f_code.co_filename[len(PACKAGE):]}:{frame.f_lineno}"


def _reads(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in READ_OPS:
        return True
    if name == "where":  # the one-argument form: nonzero's (the three-argument one reads nothing)
        return len(args) == 1
    if name == "repeat_interleave":
        return isinstance(args[0], torch.Tensor) and len(args) > 1 and isinstance(args[1], torch.Tensor) \
            and kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_"):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    return False


class _Mode(TorchDispatchMode):
    def __init__(self, sites: collections.Counter) -> None:
        super().__init__()
        self.sites = sites

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads(func, args, kwargs):
            site = _site()
            if site is not None:
                self.sites[f"{func.overloadpacket.__name__} @ {site}"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_reads() -> Iterator[collections.Counter]:
    """Count dsv4's reads of device values inside the block, by "what @ file:line"."""
    sites: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in COPIES_OUT}

    def wrap(name):
        original = originals[name]

        def copy_out(self, *args, **kwargs):
            site = _site()
            if site is not None:
                sites[f"{name} @ {site}"] += 1
            return original(self, *args, **kwargs)
        return copy_out

    for name in COPIES_OUT:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with _Mode(sites):
            yield sites
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
