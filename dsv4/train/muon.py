"""DeepSeek-V4's Muon (report §2.4, Algorithm 1), our own implementation.

Per step, for each logically independent weight W [n, m] with gradient G (training.md §1.3):

    M_t  = μ·M_{t-1} + G_t                         classical (sum) momentum
    O'_t = HybridNewtonSchulz(μ·M_t + G_t)         Nesterov input
    O_t  = O'_t · sqrt(max(n, m)) · γ              update RMS ≈ γ (an orthogonal n×m matrix has RMS 1/sqrt(max))
    W_t  = W_{t-1}·(1 − η·λ) − η·O_t               decoupled weight decay

Hybrid Newton–Schulz: X ← M/‖M‖_F, then 10 times X ← a·X + b·(XXᵀ)X + c·(XXᵀ)²X, the first 8 with
(3.4445, −4.7750, 2.0315) (fast growth of small singular values) and the last 2 with (2, −1.5, 0.5)
(the convergent quintic: p(1) = 1, p'(1) = 0), so the update is orthogonal, not Keller Jordan's
singular values spread over ~0.7–1.1.

Why not `torch.optim.Muon` (training.md §1.4): it has one coefficient triple for all steps (no 8+2),
always runs NS in bf16 (no fast path on CPU: 100x slower than fp32 there), uses the EMA momentum and
KJ/Moonlight scaling, and under FSDP2 lets DTensor run the NS matmuls on shards, which for a
row-sharded tall matrix gave a 15% different update. Here a DTensor is gathered whole
(`full_tensor()`), orthogonalised locally, and this rank's shard of the update is cut back out
(`distribute_tensor(..., src_data_rank=None)`, a local slice: every rank computed the same full
update), so a sharded step equals the single-process step.

Logical sub-matrices: a group option `row_blocks` (sizes along dim -2 summing to the stored rows)
orthogonalises row blocks of one stored tensor separately — V4 fuses independent matrices in one
tensor (the grouped `wo_a`, the mHC `hc_*_fn` = [W_pre; W_post; W_res], the overlapping compressor's
two projections); `dsv4.train.optim.param_groups` says which. Tensors with more than 2 dims are a
batch of matrices over the leading dims (stacked experts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

KJ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
CONVERGENT_COEFFICIENTS = (2.0, -1.5, 0.5)
# V4: 8 fast steps, then 2 convergent ones
V4_NS_SCHEDULE: tuple[tuple[float, float, float], ...] = (KJ_COEFFICIENTS,) * 8 + (CONVERGENT_COEFFICIENTS,) * 2


def hybrid_newton_schulz(g: Tensor, schedule: Sequence[tuple[float, float, float]] = V4_NS_SCHEDULE,
                         dtype: torch.dtype = torch.float32, eps: float = 1e-7) -> Tensor:
    """The orthogonal polar factor of each matrix in g [..., n, m] (≈ U Vᵀ of its SVD), in `dtype`.

    A tall matrix is transposed first so X Xᵀ is the smaller Gram matrix (same result, fewer FLOPs).
    The Frobenius normalisation puts every singular value ≤ 1, inside the iteration's basin; the
    norm is clamped at `eps` so a zero gradient gives a zero update instead of NaN.
    """
    x = g.to(dtype)
    shape = x.shape
    tall = x.shape[-2] > x.shape[-1]
    x = x.reshape(-1, *shape[-2:])  # [B, n, m]
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    for a, b, c in schedule:
        gram = x @ x.mT
        # a·X + (b·A + c·A²)·X as two GEMMs with their scalings fused (no elementwise passes over the batch)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return (x.mT if tall else x).reshape(shape)


def _check_blocks(shape: torch.Size, blocks: Sequence[int] | None, where: str) -> None:
    if len(shape) < 2:
        raise ValueError(f"Muon: {where} has shape {tuple(shape)}; Muon takes matrices (route vectors to AdamW)")
    if blocks is not None and (sum(blocks) != shape[-2] or min(blocks) <= 0):
        raise ValueError(f"Muon: row_blocks {tuple(blocks)} of {where} do not partition its {shape[-2]} rows")


class Muon(torch.optim.Optimizer):
    """V4 Muon. Group options: lr, momentum (μ), weight_decay (λ), rms_scale (γ), nesterov,
    ns_dtype (fp32 default: CPU has no fast bf16 matmul; bf16 on GPUs, where V4 found NS stable),
    ns_schedule (the NS coefficient triples, V4's 8+2 by default), eps (Frobenius clamp),
    row_blocks (None, or the sizes of the logical row blocks of every tensor in the group).

    Params may be plain tensors or DTensors (FSDP2, tensor parallel): see the module docstring.
    The momentum buffer has the gradient's type, dtype and sharding (so it is sharded under FSDP2
    and saved per rank by a distributed checkpoint).
    """

    def __init__(self, params: Iterable, lr: float = 2.7e-4, momentum: float = 0.95, weight_decay: float = 0.1,
                 rms_scale: float = 0.18, nesterov: bool = True, ns_dtype: torch.dtype = torch.float32,
                 ns_schedule: Sequence[tuple[float, float, float]] = V4_NS_SCHEDULE, eps: float = 1e-7,
                 row_blocks: Sequence[int] | None = None) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or rms_scale <= 0:
            raise ValueError(f"Muon: bad hyper-parameters lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} rms_scale={rms_scale}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, rms_scale=rms_scale,
                        nesterov=nesterov, ns_dtype=ns_dtype, ns_schedule=tuple(map(tuple, ns_schedule)),
                        eps=eps, row_blocks=None if row_blocks is None else tuple(row_blocks))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["row_blocks"] is not None:
            group["row_blocks"] = tuple(int(b) for b in group["row_blocks"])
        names = group.get("param_names") or [f"param {i}" for i in range(len(group["params"]))]
        for p, name in zip(group["params"], names, strict=True):
            _check_blocks(p.shape, group["row_blocks"], name)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (group, param, Nesterov input) for every param with a gradient
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(g)  # M_t = μ·M_{t-1} + G_t
                work.append((group, p, g.add(buf, alpha=mu) if group["nesterov"] else buf))  # μ·M_t + G_t
        for (group, p, _), update in zip(work, _orthogonal_updates(work), strict=True):
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"])
        return loss


def _orthogonal_updates(work: Sequence[tuple[dict, Tensor, Tensor]]) -> list[Tensor]:
    """O_t for each (group, param, input) of `work`: the whole stored tensor, in the param's dtype and (for a
    DTensor) sharding.

    Every logical matrix (a tensor's row blocks, a stack's members) joins the others of its shape [r, m] and NS
    options in one batched Newton–Schulz, so a step runs ~30 GEMM calls per shape instead of per matrix (the
    demo model's 193 Muon tensors hold matrices of 9 shapes). Each matrix's result is its own NS's."""
    pieces = []  # per param: [..., r, m] tensors whose rows make up the stored tensor, and how they join
    batches: dict[tuple, list[Tensor]] = {}
    for group, _, u in work:
        full = u.full_tensor() if isinstance(u, DTensor) else u
        blocks = group["row_blocks"] or (full.shape[-2],)
        if len(set(blocks)) == 1:  # equal blocks: one [..., k, r, m] batch, rows joined back by flattening
            parts, flattened = [full.unflatten(-2, (len(blocks), blocks[0]))], True
        else:
            parts, flattened = list(full.split(blocks, dim=-2)), False
        keys = [(tuple(part.shape[-2:]), group["ns_schedule"], group["ns_dtype"], group["eps"]) for part in parts]
        for key, part in zip(keys, parts, strict=True):
            batches.setdefault(key, []).append(part.reshape(-1, *part.shape[-2:]))
        pieces.append((parts, keys, flattened))
    done = {}
    for key, members in batches.items():
        stack = members[0] if len(members) == 1 else torch.cat(members)
        schedule, dtype, eps = key[1:]
        done[key] = list(hybrid_newton_schulz(stack, schedule, dtype, eps).split([m.shape[0] for m in members]))
        done[key].reverse()  # popped from the end in the order they joined
    updates = []
    for (group, p, _), (parts, keys, flattened) in zip(work, pieces, strict=True):
        outs = [done[key].pop().reshape(part.shape).to(p.dtype) * (math.sqrt(max(key[0])) * group["rms_scale"])
                for key, part in zip(keys, parts, strict=True)]
        update = outs[0].flatten(-3, -2) if flattened else torch.cat(outs, dim=-2)
        if isinstance(p, DTensor):
            # every rank holds the same full update: take this rank's shard locally, no communication
            update = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
        updates.append(update)
    return updates
