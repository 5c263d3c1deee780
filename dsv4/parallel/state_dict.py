"""The plain model's state dict of a parallelized model (`parallelize`), and back.

`full_state_dict` gathers the FSDP2-sharded DTensors and collects the experts from their owners, so a parallel
run's checkpoints and exports have the keys, order, shapes and dtypes of the unparallelized model;
`load_full_state_dict` puts such a dict (a checkpoint of any layout, or of one process) into a parallel model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..model.moe import MoE
from ..model.transformer import Transformer
from .rules import expert_owner


class ExpertTensor(NamedTuple):
    """One routed-expert tensor of the plain model."""

    name: str  # full state-dict key
    moe: str  # the MoE module's name
    expert: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def expert_tensors(model: nn.Module) -> tuple[ExpertTensor, ...]:
    """Every routed-expert tensor of `model`, in state_dict order; taken before the experts held elsewhere are
    dropped, so that `full_state_dict` knows what to collect."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            meta = {k: (tuple(v.shape), v.dtype) for k, v in module.experts[0].state_dict().items()}
            for e in range(module.n_experts):
                out.extend(ExpertTensor(f"{name}.experts.{e}.{key}", name, e, shape, dtype)
                           for key, (shape, dtype) in meta.items())
    return tuple(out)


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    return p.to_local().device if isinstance(p, DTensor) else p.device


@torch.no_grad()
def full_state_dict(model: Transformer, rank0_only: bool = True) -> dict[str, Tensor]:
    """The plain model's state dict (same keys, order, shapes and dtypes as the unparallelized model's), on the
    CPU: DTensors are gathered, and the experts are collected from their owners. Every rank must call it; with
    `rank0_only` only rank 0 of the data-parallel group gets the dict (the others get {}); otherwise every rank
    does."""
    plan = model.data_parallel
    keep = dist.get_rank(plan.group) == 0 or not rank0_only
    gathered = {}
    for name, t in model.state_dict().items():
        full = t.full_tensor() if isinstance(t, DTensor) else t  # a collective: every rank, same order
        name = _clean(name)
        if keep or (plan.ep_size > 1 and ".experts." in name):
            gathered[name] = full.detach().cpu().clone()
    if plan.ep_size == 1:
        return gathered if keep else {}
    # experts held on the other EP ranks: each owner broadcasts its experts over its EP group (rank 0's replica
    # is what counts; the other replicas do the same among themselves so no rank needs a special case)
    ep_group = plan.expert_mesh.get_group("ep")
    device = _device(model)
    for x in plan.expert_tensors:
        owner = expert_owner(x.expert, model.args.n_routed_experts, plan.ep_size)
        buf = gathered[x.name] if owner == plan.ep_rank else torch.empty(x.shape, dtype=x.dtype)
        buf = buf.to(device).contiguous()
        dist.broadcast(buf, group=ep_group, group_src=owner)
        if keep:
            gathered[x.name] = buf.cpu()
    if not keep:
        return {}
    # the plain model's key order: each MoE's experts by id, where its first expert key stood
    by_moe: dict[str, list[str]] = {}
    for x in plan.expert_tensors:
        by_moe.setdefault(x.moe, []).append(x.name)
    expert_names = {x.name for x in plan.expert_tensors}
    ordered, placed = {}, set()
    for name in gathered:
        if name not in expert_names:
            ordered[name] = gathered[name]
            continue
        moe_name = name.split(".experts.")[0]
        if moe_name not in placed:
            placed.add(moe_name)
            ordered.update((n, gathered[n]) for n in by_moe[moe_name])
    return ordered


@torch.no_grad()
def load_full_state_dict(model: Transformer, state: Mapping[str, Tensor]) -> None:
    """Load a plain model's state dict (e.g. `full_state_dict` output or a single-process checkpoint, given on
    every rank) into a parallelized model: each rank copies its shards and its experts; the other ranks'
    experts are checked for presence only. Raises KeyError / ValueError on missing keys or shape mismatches."""
    plan = model.data_parallel
    expected = set()
    for name, t in model.state_dict().items():
        key = _clean(name)
        expected.add(key)
        if key not in state:
            raise KeyError(f"load_full_state_dict: {key} missing from the state dict")
        value = state[key]
        if tuple(value.shape) != tuple(t.shape):
            raise ValueError(f"load_full_state_dict: {key} has shape {tuple(value.shape)}, "
                             f"the model {tuple(t.shape)}")
        if isinstance(t, DTensor):
            piece = distribute_tensor(value.to(t.to_local().device, t.dtype), t.device_mesh, t.placements,
                                      src_data_rank=None)
            t.to_local().copy_(piece.to_local())
        else:
            t.copy_(value)
    if plan.ep_size > 1:
        expected.update(x.name for x in plan.expert_tensors)
    missing = expected - set(state)
    unexpected = set(state) - expected
    if missing or unexpected:
        raise KeyError(f"load_full_state_dict: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
