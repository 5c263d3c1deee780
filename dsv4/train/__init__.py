"""Training: data shards and packing, the Muon optimizer, losses and the training loop (parallel runs: a model
parallelized by `dsv4.parallel.parallelize`)."""

from .data import DataError, DocumentRows, PackedBatch, PackedLoader, Shard, ShardWriter, open_split, split_documents
from .losses import (
    BiasBalancer,
    balance_loss_sum,
    cross_entropy_sum,
    expert_load,
    load_stats,
    mtp_inputs,
    reduce_expert_load,
)
from .muon import V4_NS_SCHEDULE, Muon, hybrid_newton_schulz
from .optim import Optimizers, Route, RoutingError, build_optimizers, param_groups, route_parameters
from .precision import RECIPES, apply_precision, export_quantized, remove_precision
from .schedule import LRSchedule, set_lr
from .tokenizers import byte_tokenizer, load_tokenizer
from .trainer import TrainConfig, Trainer, TrainError, latest_checkpoint

__all__ = [
    "V4_NS_SCHEDULE", "LRSchedule", "Muon", "Optimizers", "Route", "RoutingError", "build_optimizers",
    "hybrid_newton_schulz", "param_groups", "route_parameters", "set_lr",
    "RECIPES", "apply_precision", "export_quantized", "remove_precision",
    "DataError", "DocumentRows", "PackedBatch", "PackedLoader", "Shard", "ShardWriter", "open_split",
    "split_documents", "byte_tokenizer", "load_tokenizer",
    "BiasBalancer", "balance_loss_sum", "cross_entropy_sum", "expert_load", "load_stats", "mtp_inputs",
    "reduce_expert_load", "TrainConfig", "Trainer", "TrainError", "latest_checkpoint",
]
