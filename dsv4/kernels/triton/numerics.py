"""What the kernels compute the same way as torch, on a GPU and in Triton's CPU interpreter alike.

* **Rounding to bf16.** On a GPU ``x.to(tl.bfloat16)`` rounds to nearest even; Triton's interpreter (which the
  tests run on machines without a GPU) truncates, so a kernel checked there would differ from the reference in
  half of its bf16 outputs by one step, and on FP8 activations such steps grow downstream. `round_to` rounds
  bf16 itself, with integer ops that give the same bits on both (round half to even on the 16 dropped bits; NaN
  stays NaN).
* **16-bit dots.** The interpreter multiplies bf16 bit patterns as integers in ``tl.dot``; `dot` widens 16-bit
  operands to fp32 there (exact: a product of two 16-bit floats is an fp32 value), and keeps them on the tensor
  cores on a GPU.
* **exp.** ``tl.exp`` lowers to the hardware's approximate ``ex2``; torch's CUDA ops call libdevice's ``expf``.
  `exp` calls libdevice's on a GPU, so a kernel's exponentials are torch's there. The interpreter has no
  libdevice, so it takes ``tl.exp`` (numpy's exp), which the CPU tests hold to the reference's tolerance. `log1p`
  likewise (the interpreter's from ``tl.log``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# the float dtypes the kernels read and write, as Triton names them
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def libdevice_exp() -> bool:
    """The `exp` flag kernels are launched with: libdevice's expf wherever it exists (not in the interpreter)."""
    return not interpreting()


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """x in `dtype`, bf16 rounded to nearest even from fp32 exactly as torch's ``.to(torch.bfloat16)``."""
    if dtype == tl.bfloat16:
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # a NaN's payload must not round into the infinity pattern
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def exp(x, LIBDEVICE: tl.constexpr):
    """fp32 exp: libdevice's expf (torch's on CUDA) when LIBDEVICE, else ``tl.exp``."""
    if LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def log1p(x, LIBDEVICE: tl.constexpr):
    """fp32 log(1 + x): libdevice's log1pf (torch's on CUDA) when LIBDEVICE; else, for the interpreter, which has no
    log1p, log(u) * x / (u - 1) with u = 1 + x (exact where u rounds to 1), within a few fp32 steps of it."""
    if LIBDEVICE:
        return libdevice.log1p(x)
    else:
        u = 1.0 + x
        exact = u == 1.0
        return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def dot(a, b, F32: tl.constexpr):
    """a @ b with fp32 accumulation: fp32 operands as ieee fp32 (no TF32), 16-bit ones on the tensor cores, or
    widened to fp32 first where F32 says so (the interpreter: `interpreting()`)."""
    # (an if / else, not an early return: the code after a static if's return is still built, and a tensor-core
    # dot of an fp32 and a bf16 operand does not build)
    if F32 or a.dtype == tl.float32 or b.dtype == tl.float32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out
