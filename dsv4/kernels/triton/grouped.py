"""The routed experts of a training step on torch's grouped GEMM: differentiable, and no read of the device.

The reference runs the experts one by one, each after a `torch.where` over the ids: a read of the device for every
expert (the GPU drains its queue and waits for the host), and a dozen ops an expert forward and about twice that
backward. The Triton kernels that schedule the experts on the device have no backward. Here, for a forward that
wants gradients, the routed (token, slot) rows are sorted by expert on the device (a stable sort: each expert's
rows in token order, the reference's groups), their offsets come from a scatter-add of ones (no `bincount`, whose
size depends on the values), and each projection is one ``torch._grouped_mm`` over every expert, whose backward is
torch's own:

    rows sorted by expert:       x[token of row]                         [R, d]      (R = T * k)
    gate and up (one GEMM):      rows @ [w1; w3]^T of the row's expert   [R, 2 inter]
    hidden (fp32):               silu(min(gate, L)) * clamp(up, -L, L) * routing weight
    down:                        hidden @ w2^T of the row's expert       [R, d]
    the sum:                     index_add into [T, d] fp32, by token

The arithmetic is the reference's (`ReferenceBackend.swiglu` on each expert's rows): the GEMMs in the compute
dtype (autocast's where it is on, as `F.linear` would cast, else x's) with their outputs rounded to it, the
activation in fp32, the hidden state rounded to x's dtype before w2. What differs is the GEMMs' summation order and,
on a GPU, the order of the index_add's atomic sums: results within the GEMMs' rounding, not bit for bit.

The experts' weights are separate parameters (the checkpoint's names), so each call stacks them (``torch.stack``:
one copy of the layer's routed weights, whose backward hands each expert its slice of the gradient). That copy is
small against the GEMMs for the experts a process holds whole; expert parallelism never comes here.

``torch._grouped_mm`` exists from torch 2.8; on CUDA it takes bf16 (sm90 and later), on the CPU (torch >= 2.9) any
float. Whether it works for a (device, dtype) is checked once, by a probe against per-group matmuls, forward and
backward; where it fails, a warning is given and the reference runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..experts import ExpertWeights

log = logging.getLogger(__name__)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def wants_grad(x: Tensor, experts: Sequence[ExpertWeights | None]) -> bool:
    """Whether a forward over x and these experts builds an autograd graph: grad mode, and x or an expert weight
    requiring grad (the first and the last expert answer for the table, as for `ExpertPointers.plan`)."""
    if not torch.is_grad_enabled():
        return False
    ends = [w for w in (experts[0], experts[len(experts) - 1]) if w is not None] if len(experts) else []
    return x.requires_grad or any(t.requires_grad for w in ends for t in (w.w1, w.w3, w.w2))


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The GEMMs' dtype, as `F.linear` would pick it: autocast's where it is on for x's device, else x's (which
    the weights must share); None where the reference would not run them in one float dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if weight.dtype == x.dtype and x.dtype in _FLOATS else None


def covers(x: Tensor, experts: Sequence[ExpertWeights | None]) -> bool:
    """Whether `routed_experts` takes x [T, d] and every expert of the table: a forward that wants gradients, float
    experts without scales, all held here, on x's device, w1 and w3 [inter, d] and w2 [d, inter], both dims
    multiples of 16 bytes in the compute dtype (the grouped GEMM's alignment), and a grouped GEMM that works for
    that device and dtype. The first and last experts answer for the table's formats (see `ExpertPointers.plan`);
    a missing middle expert makes the stack fail loudly."""
    if x.dim() != 2 or x.dtype not in _FLOATS or not len(experts) or not wants_grad(x, experts):
        return False
    ends = (experts[0], experts[len(experts) - 1])
    if any(w is None or w.s1 is not None or w.s3 is not None or w.s2 is not None for w in ends):
        return False
    first = ends[0]
    d, inter = x.shape[1], first.w1.shape[0]
    for w in ends:
        for t, shape in ((w.w1, (inter, d)), (w.w3, (inter, d)), (w.w2, (d, inter))):
            if tuple(t.shape) != shape or t.device != x.device or not t.dtype.is_floating_point:
                return False
    dtype = compute_dtype(x, first.w1)
    if dtype is None or dtype not in _FLOATS:
        return False
    align = 128 // torch.finfo(dtype).bits  # elements in 16 bytes
    return d % align == 0 and inter % align == 0 and works(x.device, dtype)


@functools.cache
def works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs on `device` in `dtype` and agrees with per-group matmuls, forward and
    backward, on a small case with an empty group and the layout `routed_experts` passes (the weights' stack
    transposed). Checked once per (device, dtype); a failure warns once and the reference runs."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    try:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            g = torch.Generator().manual_seed(0)
            a = torch.randn(24, 16, generator=g).to(device, dtype).requires_grad_()
            b = torch.randn(3, 32, 16, generator=g).to(device, dtype).requires_grad_()
            offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)  # (group 1 is empty)
            out = torch._grouped_mm(a, b.transpose(1, 2), offs=offs)  # [24, 32]
            grad = torch.randn(24, 32, generator=g).to(device, dtype)
            da, db = torch.autograd.grad(out, (a, b), grad)
            af, bf, gf = a.detach().float().cpu(), b.detach().float().cpu(), grad.float().cpu()
            expected = torch.cat((af[:8] @ bf[0].t(), af[8:] @ bf[2].t()))
            expected_da = torch.cat((gf[:8] @ bf[0], gf[8:] @ bf[2]))
            expected_db = torch.stack((gf[:8].t() @ af[:8], torch.zeros(32, 16), gf[8:].t() @ af[8:]))
            for got, want in ((out, expected), (da, expected_da), (db, expected_db)):
                got, atol = got.float().cpu(), tol * float(want.abs().max())
                if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=atol):
                    raise RuntimeError("its results differ from per-group matmuls")
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means: not here
        log.warning("torch._grouped_mm unavailable for %s on %s (%s: %s); a training step's routed experts run "
                    "one by one (the reference)", dtype, device.type, type(exc).__name__, exc)
        return False
    return True


def routed_experts(x: Tensor, weights: Tensor, ids: Tensor, experts: Sequence[ExpertWeights | None],
                   limit: float) -> Tensor:
    """`ReferenceBackend.routed_experts` over every expert of the table (x [T, d], routing weights [T, k] fp32,
    ids [T, k]) -> [T, d] fp32, differentiable in x, the routing weights and the experts' weights, without reading
    the device. Inputs must satisfy `covers`."""
    tokens, k = ids.shape
    n_experts = len(experts)
    dtype = compute_dtype(x, experts[0].w1)
    flat = ids.reshape(-1)  # [R]
    order = torch.sort(flat, stable=True).indices  # [R] routed rows grouped by expert, token order inside
    counts = torch.zeros(n_experts, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)  # [E] where each expert's rows end
    token = order // k  # [R] the token of each sorted row
    table = [experts[e] for e in range(n_experts)]
    # [E, 2 inter, d] -> transposed [E, d, 2 inter]: gate then up columns, one GEMM for both
    gate_up = torch.cat((torch.stack([w.w1 for w in table]), torch.stack([w.w3 for w in table])), dim=1)
    down = torch.stack([w.w2 for w in table])  # [E, d, inter]
    rows = x[token].to(dtype)  # [R, d]
    projected = torch._grouped_mm(rows, gate_up.to(dtype).transpose(1, 2), offs=offs)  # [R, 2 inter]
    inter = table[0].w1.shape[0]
    gate = projected[:, :inter].to(torch.float32).clamp(max=limit)
    up = projected[:, inter:].to(torch.float32).clamp(-limit, limit)
    hidden = weights.reshape(-1)[order].unsqueeze(1) * (F.silu(gate) * up)  # [R, inter] fp32
    out = torch._grouped_mm(hidden.to(x.dtype).to(dtype), down.to(dtype).transpose(1, 2), offs=offs)  # [R, d]
    y = torch.zeros((tokens, x.shape[1]), dtype=torch.float32, device=x.device)
    return y.index_add(0, token, out.to(torch.float32))


__all__ = ["compute_dtype", "covers", "routed_experts", "wants_grad", "works"]
