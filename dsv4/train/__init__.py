"""Training: data shards and packing, the Muon optimizer, losses and the training loop."""

from .muon import V4_NS_SCHEDULE, Muon, hybrid_newton_schulz
from .optim import Optimizers, Route, RoutingError, build_optimizers, param_groups, route_parameters
from .precision import RECIPES, apply_precision, export_quantized, remove_precision
from .schedule import LRSchedule, set_lr

__all__ = [
    "V4_NS_SCHEDULE", "LRSchedule", "Muon", "Optimizers", "Route", "RoutingError", "build_optimizers",
    "hybrid_newton_schulz", "param_groups", "route_parameters", "set_lr",
    "RECIPES", "apply_precision", "export_quantized", "remove_precision",
]
