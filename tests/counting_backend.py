"""A kernel backend for the tests: the reference oracle, counting every call of every op.

It is what adding a backend takes: this one module, and one registration line
(`kernels.register_backend("counting", "counting_backend:CountingBackend")`, or an entry in
`dsv4.kernels._BUILTIN` for a backend that ships). Nested calls are counted too, because the reference builds
ops from other ops through `self` (`linear` -> `act_quant`, `fp8_gemm`)."""

from __future__ import annotations

from collections import Counter

from dsv4.kernels import OPS
from dsv4.kernels.reference import ReferenceBackend


def _counted(op: str):
    oracle = getattr(ReferenceBackend, op)

    def method(self, *args, **kwargs):
        self.calls[op] += 1
        self.arguments.setdefault(op, []).append(args)
        return oracle(self, *args, **kwargs)

    method.__name__ = op
    method.__doc__ = oracle.__doc__
    return method


class CountingBackend(ReferenceBackend):
    name = "counting"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.arguments: dict[str, list[tuple]] = {}  # op -> the positional arguments of each call

    def reset(self) -> None:
        self.calls.clear()
        self.arguments.clear()


for _op in OPS:
    setattr(CountingBackend, _op, _counted(_op))
