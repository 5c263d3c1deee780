"""What the routed-experts op is given (each expert's SwiGLU weights as the checkpoint stores them), and the two
halves of a routed-experts op that runs experts on grouped rows: sorting the routed rows by expert, and adding
the rows' outputs back into their tokens in the reference's order."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's w1 (gate), w3 (up) and w2 (down) weights with their block scales (None for float weights):
    y = w2((silu(min(w1 x, L)) * clamp(w3 x, -L, L)) * routing weight)."""

    w1: Tensor
    s1: Tensor | None
    w3: Tensor
    s3: Tensor | None
    w2: Tensor
    s2: Tensor | None


@dataclass(frozen=True)
class RoutedRows:
    """The routed (token, slot) rows grouped by expert: `keep` [R] indexes ids.flatten(), each expert of `which`
    owning `sizes[i]` consecutive entries in token order (a stable sort: the reference's row groups)."""

    keep: Tensor
    which: list[int]
    sizes: list[int]
    slots: int  # k, the routed slots per token

    @property
    def tokens(self) -> Tensor:
        """Each row's token [R]."""
        return torch.div(self.keep, self.slots, rounding_mode="floor")


def chosen_experts(ids: Tensor) -> list[int]:
    """The experts ids [T, k] name, in increasing id (one read of the device)."""
    return sorted(set(ids.flatten().tolist()))


def group_routed_rows(ids: Tensor, n_experts: int, which: list[int]) -> RoutedRows:
    """Sort the routed rows of ids [T, k] by expert (stable) and keep those of the experts in `which` that have
    rows (the others run on another rank, or none chose them). One host sync (the per-expert counts)."""
    flat = ids.flatten()
    order = torch.sort(flat, stable=True).indices  # routed rows grouped by expert, token order inside
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    starts = [0, *itertools.accumulate(counts[:-1])]  # each expert's first row in `order`
    which = [e for e in which if counts[e]]
    if len(which) < len(counts) - counts.count(0):  # some routed rows belong to experts run elsewhere
        keep = torch.cat([order[starts[e] : starts[e] + counts[e]] for e in which])
    else:
        keep = order
    return RoutedRows(keep, which, [counts[e] for e in which], ids.shape[1])


def add_routed_rows(out: Tensor, rows: RoutedRows, ids: Tensor) -> Tensor:
    """The routed sum [T, d] fp32 from each kept row's output `out` [R, d]: back to the (token, slot) places
    (zero where another rank's expert was chosen), then each token's outputs added in increasing expert id, the
    reference's order of additions."""
    t, k = ids.shape
    per_slot = torch.zeros(t * k, out.shape[-1], dtype=torch.float32, device=out.device)
    per_slot[rows.keep] = out.to(torch.float32)
    if k == 1:
        return per_slot
    per_slot = per_slot.view(t, k, -1)
    if k > 2:  # a sum of two is the same either way round; longer ones go in increasing expert id
        by_id = ids.argsort(dim=1, stable=True)
        per_slot = per_slot.gather(1, by_id.unsqueeze(-1).expand_as(per_slot))
    y = per_slot[:, 0] + per_slot[:, 1]
    for slot in range(2, k):
        y.add_(per_slot[:, slot])
    return y
