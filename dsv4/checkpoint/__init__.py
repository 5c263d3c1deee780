"""Official DeepSeek-V4 checkpoints: what they contain, reading, validating, loading, writing, converting.

    schema     expected tensors of a config in each layout (the release's 69,187 for Flash)
    reader     Checkpoint: lazy, zero-copy access to a download, a converted or a per-rank directory
    validate   every missing / unexpected / mis-shaped / mis-typed tensor in one error
    loader     load_model: meta-device build, exact (packed FP8/FP4) or plain numerics, per rank
    maker      random checkpoints in the official format, for tests
    saver      save_model: a dsv4 model (float or official formats) as an official checkpoint
    convert    per-rank model-parallel files, plain bf16/fp32 exports, and back
    inspect    allocation-free summaries
"""

from .loader import load_model, load_weights
from .maker import make_random_checkpoint
from .reader import Checkpoint, CheckpointError
from .saver import save_model
from .schema import DTYPES, TensorSpec, expected_tensors
from .validate import validate

__all__ = ["DTYPES", "Checkpoint", "CheckpointError", "TensorSpec", "expected_tensors", "load_model", "load_weights",
           "make_random_checkpoint", "save_model", "validate"]
