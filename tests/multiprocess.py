"""Running a test's worker function in several processes (gloo on CPU) without ever hanging the suite."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch.multiprocessing as mp


def spawn(fn: Callable, args: tuple, nprocs: int = 2, timeout_s: float = 120.0) -> None:
    """Start `nprocs` processes of fn(rank, *args) and wait for all; a worker's exception fails the test with
    its traceback, and a run past `timeout_s` fails it too (the workers are killed either way)."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{getattr(fn, '__name__', 'worker')} processes did not finish within {timeout_s:.0f}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()

