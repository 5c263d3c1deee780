"""The gradient norm of a parallelized model, and clipping by it: correct for FSDP2-sharded, HSDP-replicated,
expert-local and plain replicated gradients, which live on different meshes (torch's `clip_grad_norm_` handles
the DTensors of one mesh only)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate


def _copies(t: Tensor, world: int) -> int:
    """How many ranks of the data-parallel group hold this exact local gradient."""
    if isinstance(t, DTensor):
        copies = 1
        for dim, placement in enumerate(t.placements):
            if isinstance(placement, Replicate):
                copies *= t.device_mesh.size(dim)
        return copies  # a DTensor on a sub-mesh (an expert over "dp") is distinct on the other ranks
    return world  # a plain tensor: replicated on every rank


def global_grad_norm(parameters: Iterable[Tensor], group: Any = None) -> Tensor:
    """The L2 norm of all gradients of the whole (unsharded) model, the same on every rank.

    Each rank sums the squares of its local gradient pieces, divided by how many ranks hold the same piece
    (FSDP shards: 1; HSDP replicas: D; expert-local experts: 1; plain replicated tensors: W), and the sums are
    all-reduced over `group` (all data ranks; None: this process alone). float64 accumulation."""
    grads = [p.grad for p in parameters if p.grad is not None]
    world = dist.get_world_size(group) if group is not None else 1
    total = torch.zeros((), dtype=torch.float64)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        total = total + local.detach().to(torch.float64).square().sum().cpu() / _copies(g, world)
    if group is not None:
        total = total.to(grads[0].device if grads else "cpu")
        dist.all_reduce(total, group=group)
    return total.sqrt().to(torch.float32)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, group: Any = None) -> Tensor:
    """Scale all gradients so their global norm is at most `max_norm` (torch's rule: coefficient
    max_norm / (norm + 1e-6), capped at 1); returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    norm = global_grad_norm(params, group)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        g.mul_(coef.to(g.device, g.dtype))
    return norm
