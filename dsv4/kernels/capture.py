"""Whether the ops running now may read the device on the host.

A CUDA graph records the kernels a step launches and replays them later with no Python in between, so the step
it captures must run the same ops, of the same shapes, whatever the values on the device, and must not read one
(a read inside a capture is an error; one outside it decides nothing the replay would follow). Where an op has two
ways to reach the same result, one that asks the device a question first (the top-k's "does a tie cut the k-set?",
cheap on the CPU) and one that does not, `without_host_reads` makes it take the second, on any device: what a
graph capture runs, and what the CPU tests that prove a step capturable run too.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_reads_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar("dsv4_host_reads_allowed", default=True)


@contextlib.contextmanager
def without_host_reads() -> Iterator[None]:
    """Within: every op takes its way that reads nothing on the host (a context variable: per thread and task)."""
    token = _reads_allowed.set(False)
    try:
        yield
    finally:
        _reads_allowed.reset(token)


def host_reads_allowed() -> bool:
    """False inside `without_host_reads`."""
    return _reads_allowed.get()
