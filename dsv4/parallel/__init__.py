"""Model parallelism applied to a model from outside: the official split rules and their runtime."""

from .distributed import DistEnv, close_distributed, init_distributed
from .rules import RankSlice, ShardingError, expert_owner, local_experts, split_dim, split_for_rank
from .tensor_parallel import (
    TensorParallel,
    check_shardable,
    rank_state_dict,
    shard_model,
)

__all__ = [
    "DistEnv",
    "RankSlice",
    "ShardingError",
    "TensorParallel",
    "check_shardable",
    "close_distributed",
    "expert_owner",
    "init_distributed",
    "local_experts",
    "rank_state_dict",
    "shard_model",
    "split_dim",
    "split_for_rank",
]
