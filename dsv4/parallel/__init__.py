"""Model parallelism applied to a model from outside: the official split rules and their runtime."""

from .rules import RankSlice, ShardingError, expert_owner, local_experts, split_dim, split_for_rank

__all__ = ["RankSlice", "ShardingError", "expert_owner", "local_experts", "split_dim", "split_for_rank"]
