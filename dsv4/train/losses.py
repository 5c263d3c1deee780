"""V4's training losses and its auxiliary-loss-free expert balancing.

Loss = next-token CE + λ_MTP · MTP CE + α · sequence-wise balance loss (training.md §4.3), plus the
lightning indexer's own KL loss (§6), which trains only the indexer because the model detaches its
inputs. Everything here works on the per-document rows of `dsv4.train.data.split_documents`: row r is
one document piece, `lengths[r]` tokens long, right-padded, with `targets[r, t]` the token after t (or
IGNORE_INDEX). Padding never counts: not as a target, not as a sequence position of the balance loss and
not as expert load.

Normalisation is by *counts*, not per micro-batch means: each loss returns a sum, and the trainer divides
by the step's total (target tokens, MTP targets, sequences), so accumulating micro-batches gives exactly
the gradient of one large batch, and data-parallel ranks can all-reduce the counts (`dp_group`).

Balancing (training.md §4.1–4.2):
  * sequence-wise balance loss, per MoE layer with learned routing and per sequence of T tokens,
        L = α Σ_i f_i P_i,  f_i = N_r / (K_r T) · Σ_t 1[i ∈ TopK(t)],  P_i = 1/T · Σ_t s'_{i,t},
    s' the gate scores normalised over all routed experts; summed over layers, averaged over sequences.
    Hash-routed layers are left out: their choice comes from a frozen token table, so f_i cannot respond
    and the loss would only bend the routing weights (our reading; the reports do not say).
  * aux-loss-free bias: after every optimizer step, for each learned gate,
        b_i ← b_i + γ · sign(mean_load − load_i),   γ = 0.001,
    with the loads counted over the whole global batch (summed over data-parallel ranks). The bias is
    the gate's `bias` buffer (not a parameter, so no optimizer and no gradient touch it); hash layers have
    none. MTP blocks' gates are included (the torchtitan bug fixed in PR #4494 was leaving them out).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import summed_cross_entropy
from ..model.moe import Gate, RouterRecord
from .data import IGNORE_INDEX

__all__ = [
    "BiasBalancer", "balance_loss_sum", "cross_entropy_sum", "expert_load", "load_stats", "mtp_inputs",
    "target_count", "valid_positions",
]


def valid_positions(lengths: Tensor, width: int) -> Tensor:
    """[N, width] bool: the real (non-padding) positions of right-padded rows."""
    return torch.arange(width, device=lengths.device) < lengths.unsqueeze(1)


def cross_entropy_sum(logits: Tensor, targets: Tensor) -> tuple[Tensor, int]:
    """(sum of the CE over the target positions, their count); logits [N,T,V], targets [N,T]. Logits the caller
    holds (a head other than the model's own; the trainer uses `Transformer.head_loss`, which need not hold them)."""
    return summed_cross_entropy(logits, targets, IGNORE_INDEX), target_count(targets)


def target_count(targets: Tensor) -> int:
    """The positions with a target (not IGNORE_INDEX): a loss sum's divisor."""
    return int((targets != IGNORE_INDEX).sum())


def mtp_inputs(tokens: Tensor, targets: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(next_tokens, mtp_targets, mtp_lengths) for depth-1 MTP on document rows.

    The MTP block predicts the token at t+2 from the main streams at t and the token at t+1. Within a row
    the token at t+1 is `tokens[:, t+1]` (an in-document token as long as t+1 < length), and the token at
    t+2 is `targets[:, t+1]`, already IGNORE_INDEX where it is padding, crosses no document (rows are single
    documents) or is not a loss target (chat masks). So the MTP run uses streams[:, :-1] with
    next_tokens = tokens[:, 1:], targets[:, 1:], one position shorter per row."""
    return tokens[:, 1:], targets[:, 1:], (lengths - 1).clamp(min=0)


def _learned(records: Sequence[RouterRecord]) -> list[RouterRecord]:
    return [r for r in records if not r.hashed]


def balance_loss_sum(records: Sequence[RouterRecord], valid: Tensor, n_experts: int, topk: int) -> Tensor:
    """Σ over learned-routing layers and over rows of Σ_i f_i P_i (without α; divide by the sequences).

    records: one `RouterRecord` per MoE layer of one forward over rows [N,T] (`valid` [N,T] marks the
    real tokens; the record's scores/ids are [N·T, ...]). A row with no real token contributes nothing."""
    n_rows, width = valid.shape
    mask = valid.to(torch.float32)  # [N,T]
    tokens = mask.sum(1).clamp(min=1.0)  # [N] T per sequence
    total = None
    for rec in _learned(records):
        scores = rec.scores.view(n_rows, width, -1)  # [N,T,E]
        normed = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
        p = (normed * mask.unsqueeze(-1)).sum(1) / tokens.unsqueeze(-1)  # [N,E]
        hits = F.one_hot(rec.ids.view(n_rows, width, -1), n_experts).sum(2).to(torch.float32)  # [N,T,E]
        f = (hits * mask.unsqueeze(-1)).sum(1) * (n_experts / topk) / tokens.unsqueeze(-1)  # [N,E]
        layer = (f * p).sum()
        total = layer if total is None else total + layer
    if total is None:
        return valid.new_zeros((), dtype=torch.float32)
    return total


def expert_load(records: Sequence[RouterRecord], valid: Tensor, n_experts: int) -> dict[int, Tensor]:
    """{layer_id: tokens routed to each expert [E] (float64)} for the learned-routing layers of one forward,
    counting only real tokens."""
    keep = valid.reshape(-1)
    return {rec.layer_id: torch.bincount(rec.ids[keep].flatten(), minlength=n_experts).to(torch.float64)
            for rec in _learned(records)}


def reduce_expert_load(loads: Mapping[int, Tensor], group: dist.ProcessGroup | None) -> dict[int, Tensor]:
    """{layer_id: [E] counts} summed over `group` (all data ranks; None: this process's counts as they are): the
    global batch's loads for the aux-loss-free bias update. Exact (float64 counts)."""
    layer_ids = sorted(loads)
    if not layer_ids:
        return {}
    stacked = torch.stack([loads[i].to(torch.float64) for i in layer_ids])  # [layers, E]
    if group is not None:
        dist.all_reduce(stacked, group=group)
    return dict(zip(layer_ids, stacked.unbind(0), strict=True))


def load_stats(loads: dict[int, Tensor]) -> dict[str, float]:
    """Balance of expert loads for logging: max/mean per layer, then the mean and the worst over layers
    (1.0 is perfect balance; an expert nobody uses does not move max/mean, an overloaded one does)."""
    ratios = [float(c.max() / c.mean()) for c in loads.values() if float(c.sum()) > 0]
    if not ratios:
        return {}
    return {"load_max_mean": sum(ratios) / len(ratios), "load_max_mean_worst": max(ratios)}


class BiasBalancer:
    """The aux-loss-free bias update over every learned gate of a model (main and MTP blocks).

    `add(records, valid)` after each forward accumulates expert loads; `step()` after the optimizer step
    sums the loads over `group` (the data-parallel process group, e.g. `dist.group.WORLD`; None: this process's
    loads only), applies
    b_i += speed · sign(mean − load_i) to each gate's `bias` buffer and starts counting afresh. With
    `every` > 1 the loads of several steps are pooled before one update (a known remedy for noisy
    small-batch counts; V4 updates every step). `state_dict` holds the pending counts so a resumed run
    continues exactly; the biases themselves live in the model's state_dict."""

    def __init__(self, model: nn.Module, speed: float = 1e-3, group: dist.ProcessGroup | None = None,
                 every: int = 1) -> None:
        if speed < 0 or every < 1:
            raise ValueError(f"BiasBalancer: speed={speed} must be >= 0 and every={every} >= 1")
        self.speed, self.group, self.every = speed, group, every
        self.gates: dict[int, Gate] = {}
        for module in model.modules():
            if isinstance(module, Gate) and not module.hash:
                layer_id = _gate_layer(model, module)
                self.gates[layer_id] = module
        self.counts: dict[int, Tensor] = {}
        self.pending = 0  # steps whose loads are in `counts`
        self.last: dict[str, float] = {}

    def add(self, records: Sequence[RouterRecord], valid: Tensor) -> None:
        for layer_id, load in expert_load(records, valid, self._n_experts()).items():
            self.counts[layer_id] = self.counts[layer_id] + load if layer_id in self.counts else load

    def _n_experts(self) -> int:
        gate = next(iter(self.gates.values()), None)
        return 0 if gate is None else gate.weight.shape[0]

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Update the biases (every `every` calls); returns the load stats of the pooled global counts."""
        self.pending += 1
        if self.pending < self.every or not self.counts:
            return self.last if self.pending < self.every else {}
        loads = reduce_expert_load(self.counts, self.group)  # the global batch: every data-parallel rank's tokens
        for layer_id, load in loads.items():
            bias = self.gates[layer_id].bias
            delta = torch.sign(load.mean() - load).to(bias.dtype)
            bias.add_(delta, alpha=self.speed)
        self.counts, self.pending = {}, 0
        self.last = load_stats(loads)
        return self.last

    def state_dict(self) -> dict:
        return {"counts": {k: v.clone() for k, v in self.counts.items()}, "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        self.counts = {int(k): v.clone() for k, v in state["counts"].items()}
        self.pending = int(state["pending"])


def _gate_layer(model: nn.Module, gate: Gate) -> int:
    """The layer id of the MoE owning `gate` (records name layers by id)."""
    for module in model.modules():
        if getattr(module, "gate", None) is gate and hasattr(module, "layer_id"):
            return int(module.layer_id)
    raise ValueError("BiasBalancer: a Gate outside an MoE with a layer_id")
