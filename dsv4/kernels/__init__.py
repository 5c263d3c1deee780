"""Kernel entry points used by the model: one signature per op.

The names are re-exported from the pure-torch oracle in ``reference.py``; a faster backend can later
rebind them here without the model code changing.
"""

from dsv4.kernels.reference import (
    act_quant,
    fp4_gemm,
    fp4_simulate,
    fp8_gemm,
    fp8_simulate,
    hadamard,
    hc_split_sinkhorn,
    linear,
    sparse_attn,
)

__all__ = [
    "act_quant",
    "fp4_gemm",
    "fp4_simulate",
    "fp8_gemm",
    "fp8_simulate",
    "hadamard",
    "hc_split_sinkhorn",
    "linear",
    "sparse_attn",
]
