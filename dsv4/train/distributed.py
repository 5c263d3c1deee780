"""Distributed training: FSDP2 and expert parallelism over a DeviceMesh, applied to a built model from outside.

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

FSDP2 (`fully_shard`) wraps every Block, then the root (which holds the embedding, the head and the MTP blocks:
`mtp_streams` uses an MTP block's projections and norms outside its forward); the root's entry points that the
trainer calls instead of `forward` (`forward_streams`, `logits`, `mtp_logits`) are registered as FSDP forward
methods. Gradients come out *averaged* over the W data ranks, so a trainer scales each rank's loss (normalised by
the global counts) by W — `Trainer(grad_sync="wrapper")`.

MoE layers get a distributed forward (the module's class is swapped for `DistributedMoE`; the gate, the expert
function and the combine order are the single-process ones, so one process and W processes differ only by fp32
reduction order):

* every rank routes its own tokens with the replicated gate;
* an expert runs on a rank iff some data rank routed a token to it in this forward (the per-expert counts are
  summed over the ranks first): FSDP2 needs every rank to reduce the same parameters, and an expert that no token
  of the global batch reached must keep a `None` gradient, exactly as in one process (Muon and AdamW then skip
  it: no momentum step, no weight decay) — a zero gradient would move it;
* with expert parallelism, the (token, slot) assignments are sorted by expert (stably, so tokens keep their
  order), the rows and their routing weights travel to the expert's owner in one autograd-aware all-to-all, the
  owner runs each local expert once on the rows of all ranks, the outputs travel back by the reverse all-to-all,
  and the combine adds them expert by expert in increasing id, as `MoE.forward` does.

Expert gradients: an owner's expert receives the gradients of every EP peer's tokens through the all-to-all's
backward; FSDP2 over "dp" then sums the D replicas and divides by W (`set_gradient_divide_factor`), which is the
average over all W data ranks, like every dense parameter.

Helpers for a trainer: `dp_group` (all data ranks: loss counts, expert loads for the bias update),
`reduce_expert_load`, `global_grad_norm` / `clip_grad_norm_` (correct for sharded, replicated and expert-local
gradients), `full_state_dict` (the plain model's state dict, gathered on rank 0, on the CPU) and
`load_full_state_dict` (a plain state dict back into the parallel model).

With the Trainer: `Trainer(config, model=parallelize(model, mesh), dp_group=dp_group(model), grad_sync="wrapper")`
trains as is under FSDP2 (torch's clip handles one mesh of DTensors). Expert parallelism mixes meshes, so its
clip must be `clip_grad_norm_(params, clip, dp_group)`; checkpoints and export of a parallel model must go through
`full_state_dict` (a collective: every rank calls it, rank 0 writes) and `load_full_state_dict`; the optimizer
state stays sharded (a DCP checkpoint, not written yet).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from ..model.moe import MoE, RouterRecord
from ..model.transformer import Transformer
from ..parallel.rules import expert_owner, local_experts

__all__ = [
    "DataParallel", "DistributedMoE", "clip_grad_norm_", "dp_group", "full_state_dict", "global_grad_norm",
    "load_full_state_dict", "parallelize", "reduce_expert_load",
]

# the Transformer methods a trainer calls directly (not through __call__): FSDP2 must unshard the root for them
ROOT_METHODS = ("forward_streams", "logits", "mtp_logits")


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

    @property
    def world_size(self) -> int:
        return self.dp_size * self.ep_size


# ---------------------------------------------------------------------------------------------- MoE


def _all_to_all(t: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    """Rows of `t` split by `in_splits` to the ranks of `group`, theirs received by `out_splits`; differentiable
    (the backward is the reverse all-to-all)."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(t.contiguous(), out_splits, in_splits, group))


class DistributedMoE(MoE):
    """`MoE` whose experts run where they live (see the module docstring); set up by `parallelize`."""

    ep_group: Any
    ep_size: int
    ep_rank: int
    dp_group: Any  # the replicas of this rank's experts (None when there is one)
    consensus_group: Any  # sums per-expert counts over the ranks that share an expert's gradient (no EP: all)

    def forward(self, x: Tensor, token_ids: Tensor, routing: list[RouterRecord] | None = None) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids, scores = self.gate(x, token_ids.reshape(-1))
        if routing is not None:
            routing.append(RouterRecord(self.layer_id, scores, ids, self.gate.hash, shape[0]))
        counts = torch.bincount(ids.flatten(), minlength=self.n_experts)  # [E] this rank's assignments
        if self.ep_size == 1:
            y = self._replicated_experts(x, weights, ids, counts)
        else:
            y = self._expert_parallel(x, weights, ids, counts)
        y = y + self.shared_experts(x).to(torch.float32)
        return y.to(x.dtype).reshape(shape)

    def _replicated_experts(self, x: Tensor, weights: Tensor, ids: Tensor, counts: Tensor) -> Tensor:
        """Every expert on every rank (FSDP-sharded): MoE.forward, but an expert runs (possibly on no rows) iff
        some rank routed a token to it, so all ranks reduce the same gradients."""
        total = counts.clone()
        dist.all_reduce(total, group=self.consensus_group)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in torch.nonzero(total).flatten().tolist():
            rows, slot = torch.where(ids == e)
            y = y.index_add(0, rows, self.experts[e](x[rows], weights[rows, slot, None]).to(torch.float32))
        return y

    def _expert_parallel(self, x: Tensor, weights: Tensor, ids: Tensor, counts: Tensor) -> Tensor:
        n_local = self.n_experts // self.ep_size
        mine = slice(self.ep_rank * n_local, (self.ep_rank + 1) * n_local)
        # every EP peer's counts [P, E]: what each sends to whom
        table = counts.new_empty(self.ep_size * self.n_experts)
        dist.all_gather_single(table, counts, group=self.ep_group)
        table = table.view(self.ep_size, self.n_experts)
        received = table[:, mine]  # [P, n_local] rows from each peer for each local expert
        active = received.sum(0)
        if self.dp_group is not None:  # the replicas of these experts run them alike
            dist.all_reduce(active, group=self.dp_group)
        # dispatch: assignments sorted by expert (stable: tokens stay in order within an expert)
        k = ids.shape[1]
        order = torch.argsort(ids.flatten(), stable=True)
        token = order // k
        send = torch.cat([x[token].to(torch.float32), weights.flatten()[order].unsqueeze(-1)], dim=-1)
        send_splits = counts.view(self.ep_size, n_local).sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        recv = _all_to_all(send, recv_splits, send_splits, self.ep_group)
        rows_x, rows_w = recv[:, :-1].to(x.dtype), recv[:, -1:]
        # received rows: peer by peer, expert by expert; run each local expert once on all its rows
        expert_of_row = torch.repeat_interleave(torch.arange(n_local, device=x.device).repeat(self.ep_size),
                                                received.flatten())
        outs, where = [], []
        for j in torch.nonzero(active).flatten().tolist():
            rows = torch.nonzero(expert_of_row == j).flatten()
            outs.append(self.experts[mine.start + j](rows_x[rows], rows_w[rows]))
            where.append(rows)
        if outs:
            out = torch.cat(outs)[torch.argsort(torch.cat(where))]  # back to the received order
        else:
            out = rows_x.new_zeros(0, x.shape[1])
        back = _all_to_all(out, send_splits, recv_splits, self.ep_group)
        # combine in increasing expert id, tokens in order: MoE.forward's additions, in its order
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for count in counts.tolist():
            if count:
                y = y.index_add(0, token[start:start + count], back[start:start + count].to(torch.float32))
            start += count
        return y

    def extra_repr(self) -> str:
        if self.ep_size == 1:
            return "experts replicated (data parallel)"
        n_local = self.n_experts // self.ep_size
        return f"experts {self.ep_rank * n_local}..{(self.ep_rank + 1) * n_local - 1} of {self.n_experts} here"


# ---------------------------------------------------------------------------------------------- FSDP2 inputs
#
# FSDP2 rebuilds the dataclasses, lists and dicts among a unit's inputs that hold tensors requiring grad (to hook
# its post-backward onto them; on GPU also to move them to the device; with mixed precision to cast them). The
# model's `ForwardContext` carries the `ForwardTrace` whose lists the layers append to (routing records with
# differentiable scores, indexer losses, mHC maps): a rebuilt copy would swallow every record after the first.
# So the FSDP2 units see only their tensor arguments; everything else travels in an opaque `_Box`.


class _Box:
    """Not a dataclass, tuple, list or dict: FSDP2 passes it through untouched."""

    __slots__ = ("template", "where", "kwargs")

    def __init__(self, template: list, where: list[int], kwargs: dict) -> None:
        self.template, self.where, self.kwargs = template, where, kwargs


def _pack(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    where = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
    box = _Box([None if isinstance(a, Tensor) else a for a in args], where,
               {k: v for k, v in kwargs.items() if not isinstance(v, Tensor)})
    return (*(args[i] for i in where), box), {k: v for k, v in kwargs.items() if isinstance(v, Tensor)}


def _unpack(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    *tensors, box = args
    full = list(box.template)
    for i, t in zip(box.where, tensors, strict=True):
        full[i] = t
    return tuple(full), {**kwargs, **box.kwargs}


class _BoxedCall:
    """Mixin put in front of a module's class before `fully_shard`: its FSDP2 hooks see the packed inputs."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _pack(args, kwargs)
        return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _unpack(args, kwargs)
        return super().forward(*args, **kwargs)


_BOXED: dict[type, type] = {}


def _box_calls(module: nn.Module) -> None:
    cls = type(module)
    if cls not in _BOXED:
        _BOXED[cls] = type(cls.__name__, (_BoxedCall, cls), {"__module__": cls.__module__})
    module.__class__ = _BOXED[cls]


def _register_root_method(model: nn.Module, name: str) -> None:
    """`register_fsdp_forward_method` for `model.<name>`, with the inputs packed like `_BoxedCall`."""
    original = getattr(type(model), name)

    def unpacked(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _unpack(args, kwargs)
        return original(self, *args, **kwargs)

    inner = f"_fsdp_{name}"
    setattr(model, inner, unpacked.__get__(model, type(model)))
    register_fsdp_forward_method(model, inner)
    hooked = getattr(model, inner)

    def packed(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _pack(args, kwargs)
        return hooked(*args, **kwargs)

    setattr(model, name, packed)


# ---------------------------------------------------------------------------------------------- parallelize


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
    coord = expert_mesh.get_coordinate()
    ep_rank = coord[1]
    mine = local_experts(ep_rank, n_experts, ep_size)
    dp_mesh = expert_mesh["dp"]

    # 1. MoE: drop the experts held elsewhere, install the distributed forward
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in moes:
        moe.__class__ = DistributedMoE
        moe.expert_meta = {k: (tuple(v.shape), v.dtype) for k, v in moe.experts[0].state_dict().items()}
        moe.ep_size, moe.ep_rank = ep_size, ep_rank
        moe.ep_group = expert_mesh.get_group("ep")
        if ep_size == 1:
            moe.dp_group = None
            moe.consensus_group = dp_mesh.get_group()
        else:
            moe.dp_group = dp_mesh.get_group() if dp_size > 1 else None
            moe.consensus_group = None
            for e in range(n_experts):
                if e not in mine:
                    moe.experts[e] = None

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
        _box_calls(block)
        fully_shard(block, mesh=dense_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    _box_calls(model)
    fully_shard(model, mesh=dense_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for name in ROOT_METHODS:
        _register_root_method(model, name)
    model.data_parallel = DataParallel(mesh, fsdp, expert_parallel, dp_size, ep_size, ep_rank, mine,
                                       _all_ranks_group(mesh), expert_mesh)
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


def reduce_expert_load(loads: Mapping[int, Tensor], group: Any) -> dict[int, Tensor]:
    """{layer_id: [E] counts} summed over `group` (all data ranks): the global batch's loads for the aux-loss-free
    bias update. Exact (float64 counts). `BiasBalancer(group=dp_group(...))` does the same internally."""
    layer_ids = sorted(loads)
    if not layer_ids:
        return {}
    stacked = torch.stack([loads[i].to(torch.float64) for i in layer_ids])
    dist.all_reduce(stacked, group=group)
    return dict(zip(layer_ids, stacked.unbind(0), strict=True))


# ---------------------------------------------------------------------------------------------- gradients


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


# ---------------------------------------------------------------------------------------------- state dicts


def _expert_keys(model: Transformer) -> list[tuple[str, str, int, tuple[int, ...], torch.dtype]]:
    """(full name, MoE module name, expert id, shape, dtype) of every routed expert tensor of the plain model,
    in state_dict order (recorded by `parallelize` before the experts held elsewhere were dropped)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, DistributedMoE):
            for e in range(module.n_experts):
                out.extend((f"{name}.experts.{e}.{key}", name, e, shape, dtype)
                           for key, (shape, dtype) in module.expert_meta.items())
    return out


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
    plan: DataParallel = model.data_parallel
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
    for full_name, _, e, shape, dtype in _expert_keys(model):
        owner = expert_owner(e, model.args.n_routed_experts, plan.ep_size)
        buf = gathered[full_name] if owner == plan.ep_rank else torch.empty(shape, dtype=dtype)
        buf = buf.to(device).contiguous()
        dist.broadcast(buf, group=ep_group, group_src=owner)
        if keep:
            gathered[full_name] = buf.cpu()
    if not keep:
        return {}
    # the plain model's key order: each MoE's experts by id, where its first expert key stood
    experts = _expert_keys(model)
    by_moe: dict[str, list[str]] = {}
    for full_name, moe_name, *_ in experts:
        by_moe.setdefault(moe_name, []).append(full_name)
    expert_names = {x[0] for x in experts}
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
    plan: DataParallel = model.data_parallel
    expected = set()
    for name, t in model.state_dict().items():
        key = _clean(name)
        expected.add(key)
        if key not in state:
            raise KeyError(f"load_full_state_dict: {key} missing from the state dict")
        value = state[key]
        if isinstance(t, DTensor):
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"load_full_state_dict: {key} has shape {tuple(value.shape)}, "
                                 f"the model {tuple(t.shape)}")
            piece = distribute_tensor(value.to(t.to_local().device, t.dtype), t.device_mesh, t.placements,
                                      src_data_rank=None)
            t.to_local().copy_(piece.to_local())
        else:
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"load_full_state_dict: {key} has shape {tuple(value.shape)}, "
                                 f"the model {tuple(t.shape)}")
            t.copy_(value)
    if plan.ep_size > 1:
        expected.update(x[0] for x in _expert_keys(model))
    missing = expected - set(state)
    unexpected = set(state) - expected
    if missing or unexpected:
        raise KeyError(f"load_full_state_dict: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")

