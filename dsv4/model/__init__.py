"""The DeepSeek-V4 model. Imports only `dsv4.kernels`, `dsv4.quant` and `dsv4.config`."""

from .cache import Cache
from .init import init_weights
from .transformer import Block, MTPBlock, Transformer

__all__ = ["Block", "Cache", "MTPBlock", "Transformer", "init_weights"]
