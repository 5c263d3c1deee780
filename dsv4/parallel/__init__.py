"""Model parallelism applied to a built model from outside.

    rules.py            the official split rules (one rule set for per-rank files and the runtime)
    distributed.py      process-group set-up under torchrun
    experts.py          expert parallelism: the MoE strategies of inference and training, one family
    tensor_parallel.py  tensor + expert parallel inference (`shard_model`)
    fsdp.py             data-parallel training: FSDP2 + expert parallelism over a DeviceMesh (`parallelize`)
    fsdp_inputs.py      how the model's inputs pass FSDP2's hooks untouched
    gradients.py        the global gradient norm and clipping of a parallelized model
    state_dict.py       a parallelized model's plain state dict, gathered and loaded back

Names are imported lazily: the checkpoint reader needs only the rules, not FSDP2.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RankSlice": "rules", "ShardingError": "rules", "expert_owner": "rules", "local_experts": "rules",
    "split_dim": "rules", "split_for_rank": "rules",
    "DistEnv": "distributed", "close_distributed": "distributed", "init_distributed": "distributed",
    "leave_process": "distributed",
    "ExpertParallel": "experts", "AllReduceExperts": "experts", "ReplicatedExperts": "experts",
    "AllToAllExperts": "experts", "install_expert_parallel": "experts",
    "TensorParallel": "tensor_parallel", "check_shardable": "tensor_parallel", "rank_state_dict": "tensor_parallel",
    "shard_model": "tensor_parallel",
    "DataParallel": "fsdp", "dp_group": "fsdp", "parallelize": "fsdp",
    "clip_grad_norm_": "gradients", "global_grad_norm": "gradients",
    "full_state_dict": "state_dict", "load_full_state_dict": "state_dict",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
