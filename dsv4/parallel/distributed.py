"""Process-group set-up for model-parallel runs started by `torchrun` (or any launcher that sets its
environment variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

_ended_group = False  # set by close_distributed


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among `world_size`, the device it computes on, and the
    backend of the default process group (None when running alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False  # init_distributed created the default process group (close_distributed ends it)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes results."""
        return self.rank == 0


def _env_int(name: str, default: int | None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise RuntimeError(f"{name} is not set; start model-parallel runs with torchrun")
        return default
    try:
        return int(text)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={text!r} is not an integer") from None


def init_distributed(device: str | torch.device | None = None, timeout: timedelta | None = None) -> DistEnv:
    """Join the default process group described by the torchrun environment.

    `device` is where the model will run: "cuda" (the process takes GPU LOCAL_RANK, backend NCCL),
    "cpu" (backend gloo), or None for CUDA when available. Without WORLD_SIZE > 1 nothing is
    initialised and a single-process DistEnv comes back, so callers need no special case. `timeout` bounds
    how long a collective waits for its peers (a server's idle ranks wait between requests: give it room).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if world_size <= 1:
        return DistEnv(device=device)
    rank = _env_int("RANK", None)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} outside [0, WORLD_SIZE={world_size})")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        return DistEnv(rank, world_size, local_rank, device, backend, owns_group=True)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"a process group is already initialised as rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}, but the environment says {rank} of {world_size}")
    return DistEnv(rank, world_size, local_rank, device, dist.get_backend())


def close_distributed(env: DistEnv, wait_for_peers: bool = True) -> None:
    """End the default process group if `init_distributed` created it (a group set up by the caller
    stays).

    `wait_for_peers`: meet every rank at a barrier first, so that no rank tears its connections down
    while a peer is still inside a collective (gloo can then abort its worker threads). Pass False on
    an error path, where a peer may never arrive."""
    global _ended_group
    if env.owns_group and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
        _ended_group = True


def ended_a_group() -> bool:
    """Whether `close_distributed` ended a process group in this process (see `dsv4.cli.console`)."""
    return _ended_group


def leave_process(code: int) -> NoReturn:
    """End a process whose process group is over without the interpreter's teardown, once its output is flushed:
    gloo's worker threads may still be dropping the last collective's work then (a barrier holding an earlier
    broadcast's tensors), and a thread that needs the GIL while the interpreter finalizes aborts the process
    (SIGABRT, "terminate called without an active exception") after all its work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
