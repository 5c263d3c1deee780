"""Tensor + expert parallel inference, applied to a built `Transformer` from outside.

`shard_model(model, rank, world_size)` turns a full model in place into rank `rank`'s shard, with
the official split (`rules.py`, spec §3.10):

* `embed` is vocab-parallel: a rank looks up the ids in its vocab range, writes zeros for the
  others, and the ranks all-reduce (exactly one rank contributes each row);
* attention `wq_b` / `attn_sink` hold the rank's heads, `wo_a` its output groups (the heads of a
  group are contiguous, so a rank's heads feed exactly its groups), and `wo_b` is row-parallel:
  its partial products are all-reduced in fp32 and then cast back, like the official
  `RowParallelLinear`;
* the indexer's `wq_b` / `weights_proj` hold the rank's index heads; the per-rank partial index
  scores are all-reduced (in their own dtype, as the official code does) before the top-k;
* routed experts live whole on one rank each; a rank runs only its experts on the tokens routed
  to them, the fp32 routed sums are all-reduced, and only then is the (replicated) shared expert
  added, once (`experts.AllReduceExperts`, of the strategy family that training's expert
  parallelism belongs to);
* the head is vocab-parallel: each rank computes its slice of the logits and the slices are
  all-gathered, so every rank ends with the same full logits (and samples the same token);
* everything else (wq_a, wkv, norms, compressors, gates, shared expert, mHC) is replicated, and
  the cache needs nothing per rank (the KV is shared by all heads).

The model package itself knows nothing of this: `Attention` and `Indexer` read their (local) head
and group counts from attributes that the sharding updates, `Indexer` calls an optional `all_reduce`
and `MoE` an optional expert-parallel strategy, both installed by the sharding; the vocab-parallel
and row-parallel layers are `Linear` / `Embedding` subclasses defined here that keep the official
parameter names. The collectives are for inference (they do not carry gradients).

A rank never needs the full model: shard a model built on the meta device, then load the rank's
tensors into it (`dsv4.checkpoint.load_model(path, rank=, world_size=, shard=)` reads them from a
per-rank `model{rank}-mp{N}.safetensors` or slices them out of a full checkpoint; `load_weights`
takes a state dict such as `rank_state_dict` of a full one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..config import ModelArgs
from ..model.attention import Attention
from ..model.indexer import Indexer
from ..model.layers import Embedding, Linear
from ..model.transformer import Transformer
from .experts import AllReduceExperts, install_expert_parallel
from .rules import ShardingError, split_for_rank

FP8_TILE = 128


@dataclass(frozen=True)
class TensorParallel:
    """Recorded on a sharded model as `model.tensor_parallel`."""

    rank: int
    world_size: int
    group: Any = None  # the process group of the collectives (None = the default group)


# ---------------------------------------------------------------------------------------------- collectives


def _no_grad_check(t: Tensor) -> None:
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("a tensor-parallel model runs under torch.no_grad() or torch.inference_mode(): "
                           "its collectives carry no gradient")


class AllReduce:
    """Sum a tensor over the ranks of `group`, in `dtype` (default: the tensor's own), returning the
    result in the tensor's dtype. In place when no cast is needed."""

    def __init__(self, group: Any = None, dtype: torch.dtype | None = None) -> None:
        self.group = group
        self.dtype = dtype

    def __call__(self, t: Tensor) -> Tensor:
        _no_grad_check(t)
        work = t if self.dtype in (None, t.dtype) else t.to(self.dtype)
        dist.all_reduce(work, group=self.group)
        return work.to(t.dtype)

    def __repr__(self) -> str:
        return f"AllReduce(dtype={self.dtype})"


def _adopt_linear(module: Linear, base: Linear) -> None:
    """Take over `base`'s attributes, weight and scale without allocating (no Linear.__init__)."""
    nn.Module.__init__(module)
    module.in_features = base.in_features
    module.out_features = base.out_features
    module.official_format = base.official_format
    module.weight = base.weight
    module.register_buffer("scale", base.scale)


class RowParallelLinear(Linear):
    """A Linear holding a slice of the input features: the partial outputs of all ranks are summed in
    fp32 (`wo_b`; the official RowParallelLinear), then cast back to the input dtype."""

    def __init__(self, base: Linear, group: Any = None) -> None:
        _adopt_linear(self, base)
        self.reduce = AllReduce(group, torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        return self.reduce(kernels.linear(x, self.weight, self.scale).to(torch.float32)).to(x.dtype)


class VocabParallelHead(Linear):
    """The output head holding a vocab slice; the logit slices of all ranks are all-gathered."""

    def __init__(self, base: Linear, world_size: int, group: Any = None) -> None:
        _adopt_linear(self, base)
        self.world_size = world_size
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        local = kernels.linear(x, self.weight, self.scale).contiguous()
        _no_grad_check(local)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)


class VocabParallelEmbedding(Embedding):
    """The embedding table rows [vocab_start, vocab_start + rows): ids outside the range give zeros,
    and the ranks' results are all-reduced (each id is found on exactly one rank)."""

    def __init__(self, base: Embedding, vocab_start: int, group: Any = None) -> None:
        nn.Module.__init__(self)
        self.weight = base.weight
        self.vocab_start = vocab_start
        self.reduce = AllReduce(group)

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.reduce(y.masked_fill(outside.unsqueeze(-1), 0))

    def extra_repr(self) -> str:
        return f"rows {self.vocab_start}..{self.vocab_start + self.weight.shape[0] - 1}"


# ---------------------------------------------------------------------------------------------- sharding


def check_shardable(args: ModelArgs, world_size: int) -> None:
    """Raise ShardingError unless heads, output groups, index heads, experts and vocab all split
    evenly over `world_size` ranks (FP8 tile alignment is checked per tensor when slicing)."""
    if world_size < 1:
        raise ShardingError(f"world size must be >= 1, got {world_size}")
    counts = {"n_heads": args.n_heads, "o_groups": args.o_groups, "index_n_heads": args.index_n_heads,
              "n_routed_experts": args.n_routed_experts, "vocab_size": args.vocab_size}
    bad = [f"{k}={v}" for k, v in counts.items() if v % world_size]
    if bad:
        raise ShardingError(f"cannot split the model over {world_size} ranks: {', '.join(bad)} "
                            f"not divisible by {world_size}")


def _tile(name: str, t: Tensor) -> int:
    """Block-quantised FP8 weights split only into whole 128x128 tiles (their scales follow)."""
    return FP8_TILE if name.endswith(".weight") and t.dtype == torch.float8_e4m3fn else 1


def _state_tensors(module: nn.Module):
    """(name, tensor, is_parameter) of a module's own state-dict entries."""
    for name, p in module._parameters.items():
        if p is not None:
            yield name, p, True
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            yield name, b, False


@torch.no_grad()
def shard_model(model: Transformer, rank: int, world_size: int, group: Any = None) -> Transformer:
    """Turn a full model (float weights, or the official FP8/FP4 formats) in place into rank `rank`'s
    shard of a `world_size`-way tensor + expert parallel run over `group` (default: the default
    process group). Works on the meta device (no allocation). The process group is needed only when
    the model runs. Returns the model."""
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError(f"model is already sharded ({model.tensor_parallel})")
    args = model.args
    check_shardable(args, world_size)
    if not 0 <= rank < world_size:
        raise ShardingError(f"rank {rank} outside [0, {world_size})")
    if world_size == 1:
        model.tensor_parallel = TensorParallel(0, 1, group)
        return model
    reduce = AllReduce(group)
    install_expert_parallel(model, AllReduceExperts(rank, world_size, args.n_routed_experts, reduce))

    # slice every split tensor exactly as the converter does (one rule set: rules.split_for_rank)
    for prefix, module in model.named_modules():
        for name, t, is_param in list(_state_tensors(module)):
            full = f"{prefix}.{name}" if prefix else name
            part = split_for_rank(full, tuple(t.shape), rank, world_size, args.n_routed_experts, _tile(full, t))
            if part.dim is None:
                continue
            piece = t.narrow(part.dim, part.start, part.stop - part.start).clone()
            if is_param:
                setattr(module, name, nn.Parameter(piece, requires_grad=t.requires_grad))
            else:
                setattr(module, name, piece)
            if isinstance(module, Linear) and name == "weight":
                if part.dim == 0:
                    module.out_features = piece.shape[0]
                else:
                    module.in_features //= world_size

    # local head / group counts from the sliced weights, and the collectives
    for module in model.modules():
        if isinstance(module, Attention):
            module.n_heads = module.wq_b.out_features // module.head_dim
            module.n_groups = module.wo_a.out_features // module.o_lora_rank
            if module.attn_sink.shape[0] != module.n_heads or module.n_heads % module.n_groups:
                raise ShardingError(f"inconsistent attention shard: {module.n_heads} heads, {module.n_groups} "
                                    f"groups, {module.attn_sink.shape[0]} sinks")
            module.wo_b = RowParallelLinear(module.wo_b, group)
        elif isinstance(module, Indexer):
            module.n_heads = module.weights_proj.out_features
            if module.wq_b.out_features != module.n_heads * module.head_dim:
                raise ShardingError(f"inconsistent indexer shard: wq_b {module.wq_b.out_features} rows for "
                                    f"{module.n_heads} heads of {module.head_dim}")
            module.all_reduce = reduce
    model.embed = VocabParallelEmbedding(model.embed, rank * (args.vocab_size // world_size), group)
    model.head = VocabParallelHead(model.head, world_size, group)
    model.tensor_parallel = TensorParallel(rank, world_size, group)
    return model


def rank_state_dict(state_dict: Mapping[str, Tensor], rank: int, world_size: int,
                    n_experts: int) -> dict[str, Tensor]:
    """Rank `rank`'s part of a full state dict under the official names (views, not copies): what the
    converter writes to `model{rank}-mp{world_size}.safetensors`."""
    out = {}
    for name, t in state_dict.items():
        part = split_for_rank(name, tuple(t.shape), rank, world_size, n_experts, _tile(name, t))
        if part.keep:
            out[name] = t if part.dim is None else t.narrow(part.dim, part.start, part.stop - part.start)
    return out
