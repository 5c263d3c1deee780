"""Official DeepSeek-V4 checkpoints: what they contain, reading, validating, loading, writing, converting."""

from .schema import DTYPES, TensorSpec, expected_tensors

__all__ = ["DTYPES", "TensorSpec", "expected_tensors"]
