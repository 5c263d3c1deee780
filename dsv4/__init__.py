"""dsv4: DeepSeek-V4 in readable PyTorch.

Public API (imported lazily so that `import dsv4` stays cheap):
    ModelArgs, preset        - configuration (official inference-config names) and named presets
    Transformer, Cache       - the model and its caller-owned inference cache
    init_weights             - deterministic random initialisation
    load_model, Checkpoint   - official checkpoints (HF download, converted, per-rank, plain export)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelArgs": "dsv4.config",
    "ConfigError": "dsv4.config",
    "preset": "dsv4.config",
    "Transformer": "dsv4.model",
    "Cache": "dsv4.model",
    "init_weights": "dsv4.model",
    "load_model": "dsv4.checkpoint",
    "Checkpoint": "dsv4.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")
