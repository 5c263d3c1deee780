"""Data-parallel training over a DeviceMesh: FSDP2 and expert parallelism, applied to a built model from outside.

`parallelize(model, mesh, fsdp=True, expert_parallel=False)` turns a plain `Transformer` (same weights on every
rank) in place into this rank's part of a data-parallel run. Every rank is a *data* rank: it sees its own
tokens, and the ranks' losses together make the global batch. Mesh layouts:

  mesh ("dp",) of W ranks, fsdp only      every parameter FSDP2-sharded (Shard(0)) over the W ranks
  mesh ("ep",) of W ranks, EP (+fsdp)     routed experts partitioned, E/W whole experts per rank (expert e on
                                          rank e // (E/W), as in inference); the dense parameters FSDP2-sharded
                                          over the same W ranks (EP borrows the FSDP dimension, as torchtitan)
  mesh ("dp", "ep") of D x P ranks, EP    experts partitioned over "ep" and FSDP2-sharded over "dp" (the D
                                          replicas of one expert set); dense parameters HSDP: replicated over
                                          "dp", sharded over "ep"
  fsdp=False                              dense parameters replicated on every rank (FSDP2 over a W x 1 mesh:
                                          DDP's all-reduce, nothing sharded); experts as above with EP

The MoE layers get a training strategy of `experts.py` (`ReplicatedExperts` without EP, `AllToAllExperts` with
it). FSDP2 (`fully_shard`) wraps every expert-parallel expert (its own unit over "dp"), every Block, then the root
(which holds the embedding, the head and the MTP blocks: `mtp_streams` uses an MTP block's projections and norms
outside its forward); the root's entry points that the trainer calls instead of `forward` (`ROOT_METHODS`) are
registered as FSDP forward methods, and the Blocks' and the root's inputs are boxed (`fsdp_inputs.py`).
Gradients come out *averaged* over the W data ranks (an expert's: FSDP2 over "dp" sums the D replicas and divides
by W), so a trainer scales each rank's loss (normalised by the global counts) by W — `Trainer(grad_sync="wrapper")`.

With the Trainer: `Trainer(config, model=parallelize(model, mesh), dp_group=dp_group(model), grad_sync="wrapper")`.
Expert parallelism mixes meshes, so the clip is `gradients.clip_grad_norm_(params, clip, dp_group)`; checkpoints
and exports of a parallel model go through `state_dict.full_state_dict` (a collective: every rank calls it, rank 0
writes) and `load_full_state_dict`; the optimizer states stay sharded (a torch.distributed.checkpoint directory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..model.transformer import Transformer
from .experts import AllToAllExperts, ReplicatedExperts, install_expert_parallel
from .fsdp_inputs import box_inputs, register_root_method
from .rules import local_experts
from .state_dict import ExpertTensor, expert_tensors

# the Transformer methods a trainer calls directly (not through __call__): FSDP2 must unshard the root for them
ROOT_METHODS = ("forward_streams", "logits", "mtp_logits", "head_loss", "mtp_head_loss")


@dataclass(frozen=True)
class DataParallel:
    """Recorded on a parallelized model as `model.data_parallel`."""

    mesh: DeviceMesh  # the caller's mesh
    fsdp: bool
    expert_parallel: bool
    dp_size: int  # D: replicas of one expert set
    ep_size: int  # P: ranks the experts are partitioned over (1 without EP)
    ep_rank: int
    experts: range  # the routed experts this rank holds
    group: Any  # every data rank (W = D x P): loss counts, expert loads, the gradient norm
    expert_mesh: DeviceMesh  # internal ("dp", "ep") mesh of its own process groups (EP comms, expert FSDP)
    expert_tensors: tuple[ExpertTensor, ...]  # every routed-expert tensor of the plain model (full_state_dict)

    @property
    def world_size(self) -> int:
        return self.dp_size * self.ep_size


def _mesh_ranks(mesh: DeviceMesh) -> Tensor:
    return mesh.mesh.flatten()


def _all_ranks_group(mesh: DeviceMesh) -> Any:
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return mesh._flatten().get_group()


def parallelize(model: Transformer, mesh: DeviceMesh, *, fsdp: bool = True, expert_parallel: bool = False,
                mp_policy: MixedPrecisionPolicy | None = None, reshard_after_forward: bool = True) -> Transformer:
    """Make `model` (the same full weights on every rank of `mesh`) this rank's part of a data-parallel run
    (module docstring: mesh layouts). In place; returns the model, with `model.data_parallel` set.

    `mesh`: 1-D (all ranks data- and, with EP, expert-parallel), or 2-D ("dp", "ep") for expert parallelism
    with D replicas of P expert shards. `mp_policy`: FSDP2 mixed precision (e.g. bf16 params, fp32 reduce);
    default fp32 throughout. Build the optimizers after this (they must see the sharded parameters)."""
    if not isinstance(model, Transformer):
        raise TypeError(f"parallelize takes a dsv4 Transformer, got {type(model).__name__}")
    if getattr(model, "data_parallel", None) is not None:
        raise ValueError("model is already parallelized")
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("model is tensor-parallel sharded (inference); parallelize a plain model")
    if mesh.ndim not in (1, 2) or (mesh.ndim == 2 and not expert_parallel):
        raise ValueError(f"mesh of {mesh.ndim} dims: use a 1-D mesh, or a 2-D ('dp', 'ep') mesh with expert_parallel")
    world = mesh.size()
    if expert_parallel:
        dp_size, ep_size = (1, world) if mesh.ndim == 1 else (mesh.size(0), mesh.size(1))
    else:
        dp_size, ep_size = world, 1
    n_experts = model.args.n_routed_experts
    if n_experts % ep_size:
        raise ValueError(f"{n_experts} routed experts cannot be split over {ep_size} expert-parallel ranks")
    ranks = _mesh_ranks(mesh)
    # own process groups for the MoE traffic (never interleaved with FSDP2's collectives on the caller's mesh)
    expert_mesh = DeviceMesh(mesh.device_type, ranks.view(dp_size, ep_size), mesh_dim_names=("dp", "ep"))
    ep_rank = expert_mesh.get_coordinate()[1]
    mine = local_experts(ep_rank, n_experts, ep_size)
    dp_mesh = expert_mesh["dp"]

    # 1. MoE: the training strategy; with EP the experts held elsewhere are dropped (recorded first)
    experts = expert_tensors(model)
    if ep_size == 1:
        strategy = ReplicatedExperts(n_experts, dp_mesh.get_group())
    else:
        strategy = AllToAllExperts(ep_rank, ep_size, n_experts, expert_mesh.get_group("ep"),
                                   dp_mesh.get_group() if dp_size > 1 else None)
    moes = install_expert_parallel(model, strategy)

    # 2. FSDP2. Expert-parallel experts first (each its own unit over "dp"; gradients / W), then the blocks
    # and the root over the dense mesh.
    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    if fsdp:
        dense_mesh = mesh
    else:  # replicated: FSDP2 over a W x 1 mesh shards nothing and all-reduces the gradients
        dense_mesh = DeviceMesh(mesh.device_type, ranks.view(world, 1), mesh_dim_names=("replicate", "shard"))
    if ep_size > 1:
        for moe in moes:
            for e in mine:
                unit = fully_shard(moe.experts[e], mesh=dp_mesh, mp_policy=policy,
                                   reshard_after_forward=reshard_after_forward)
                unit.set_gradient_divide_factor(float(world))
    for block in model.layers:  # MTP blocks stay in the root's unit: mtp_streams uses their parts outside forward
        fully_shard(block, mesh=dense_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        box_inputs(block)
    fully_shard(model, mesh=dense_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    box_inputs(model)
    for name in ROOT_METHODS:
        register_root_method(model, name)
    model.data_parallel = DataParallel(mesh, fsdp, expert_parallel, dp_size, ep_size, ep_rank, mine,
                                       _all_ranks_group(mesh), expert_mesh, experts)
    return model


def dp_group(mesh_or_model: DeviceMesh | nn.Module) -> Any:
    """The process group of all data-parallel ranks (every rank of the mesh sees its own tokens): pass it to
    `Trainer(dp_group=...)` and `BiasBalancer(group=...)` so loss counts and expert loads are global."""
    plan = getattr(mesh_or_model, "data_parallel", None)
    if plan is not None:
        return plan.group
    if isinstance(mesh_or_model, DeviceMesh):
        return _all_ranks_group(mesh_or_model)
    raise TypeError("dp_group takes a DeviceMesh or a parallelized model")
