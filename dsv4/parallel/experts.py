"""Expert parallelism: one family of MoE strategies for inference and training, installed from outside.

`MoE.forward` does the routing (gate, routing record), the shared expert and the final cast in every process; only
the routed sum is delegated, to the strategy in `moe.expert_parallel` (None: every expert here, in this process).
`install_expert_parallel(model, strategy)` sets one strategy on every MoE of a model and drops the experts this
rank does not hold (None in `moe.experts`): expert e lives on rank e // (E / P) of the P expert-parallel ranks,
the official split (`rules.local_experts`), whichever strategy runs them.

* `AllReduceExperts` (inference, `shard_model`): every rank sees every token (tensor parallel); it runs its own
  experts on the tokens routed to them and the fp32 routed sums are all-reduced, as the official code does.
* `ReplicatedExperts` (training, data parallel without EP): every rank holds every expert (FSDP2-sharded) and
  routes its own tokens; an expert runs iff *some* data rank routed a token to it (the counts are summed first):
  FSDP2 needs every rank to reduce the same parameters, and an expert that no token of the global batch reached
  must keep a `None` gradient, exactly as in one process (Muon and AdamW then skip it: no momentum step, no weight
  decay); a zero gradient would move it.
* `AllToAllExperts` (training, EP): every rank routes its own tokens; the (token, slot) assignments are sorted by
  expert (stably, so tokens keep their order), the rows and their routing weights travel to the expert's owner in
  one autograd-aware all-to-all, the owner runs each local expert once on the rows of all ranks (iff some replica
  of it received any, the rule above), the outputs travel back by the reverse all-to-all, and the combine adds
  them expert by expert in increasing id, tokens in order, as `MoE.run_experts` does. An owner's expert receives
  the gradients of every EP peer's tokens through the all-to-all's backward.

In all three the gate, the expert function and the combine order are the single-process ones, so one process and
several differ only by fp32 reduction order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from ..model.moe import MoE
from .rules import local_experts

# torch 2.13 names it all_gather_single (its all_gather_into_tensor is deprecated); torch 2.11, the GPU machine's,
# has only the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ExpertParallel:
    """A strategy for the routed experts of `n_experts`-expert MoEs spread over `size` ranks; this rank (`rank`)
    holds the experts `local`. Called by `MoE.forward` (see `__call__`); one instance serves every MoE of a model."""

    def __init__(self, rank: int, size: int, n_experts: int) -> None:
        self.rank, self.size, self.n_experts = rank, size, n_experts
        self.local = local_experts(rank, n_experts, size)

    def __call__(self, moe: MoE, x: Tensor, weights: Tensor, ids: Tensor, counts: Tensor) -> Tensor:
        """x [T,d] this rank's tokens, weights [T,k] fp32, ids [T,k] their experts, counts [E] this rank's
        assignments per expert -> the routed sum [T,d] fp32."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(experts {self.local.start}..{self.local.stop - 1} of {self.n_experts} here)"


def install_expert_parallel(model: nn.Module, strategy: ExpertParallel) -> list[MoE]:
    """Set `strategy` on every MoE of `model` (main and MTP blocks) and drop the experts held on other ranks; returns
    the MoEs."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in moes:
        if moe.n_experts != strategy.n_experts:
            raise ValueError(f"{strategy} given to an MoE of {moe.n_experts} experts")
        for e in range(moe.n_experts):
            if e not in strategy.local:
                moe.experts[e] = None
        moe.expert_parallel = strategy
    return moes


class AllReduceExperts(ExpertParallel):
    """Inference: this rank's experts on the tokens routed to them, the routed sums added over the ranks by `reduce`
    (fp32, before the shared expert; the tensor-parallel `AllReduce`, which carries no gradient)."""

    def __init__(self, rank: int, size: int, n_experts: int, reduce: Callable[[Tensor], Tensor]) -> None:
        super().__init__(rank, size, n_experts)
        self.reduce = reduce

    def __call__(self, moe: MoE, x: Tensor, weights: Tensor, ids: Tensor, counts: Tensor) -> Tensor:
        routed = counts.tolist()
        return self.reduce(moe.run_experts(x, weights, ids, [e for e in self.local if routed[e]]))


class ReplicatedExperts(ExpertParallel):
    """Training without EP: every expert here; one runs iff some rank of `group` (all data ranks) routed a token to
    it (module docstring)."""

    def __init__(self, n_experts: int, group: Any) -> None:
        super().__init__(0, 1, n_experts)
        self.group = group

    def __call__(self, moe: MoE, x: Tensor, weights: Tensor, ids: Tensor, counts: Tensor) -> Tensor:
        total = counts.clone()
        dist.all_reduce(total, group=self.group)
        return moe.run_experts(x, weights, ids, torch.nonzero(total).flatten().tolist())

    def __repr__(self) -> str:
        return f"ReplicatedExperts({self.n_experts} experts, data parallel)"


def _all_to_all(t: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    """Rows of `t` split by `in_splits` to the ranks of `group`, theirs received by `out_splits`; differentiable
    (the backward is the reverse all-to-all)."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(t.contiguous(), out_splits, in_splits, group))


class AllToAllExperts(ExpertParallel):
    """Training with EP: the routed rows travel to their expert's owner among the `size` ranks of `group` and back
    (module docstring). `replicas`: the ranks holding the same experts (their gradients are reduced together;
    None when there is one copy)."""

    def __init__(self, rank: int, size: int, n_experts: int, group: Any, replicas: Any = None) -> None:
        super().__init__(rank, size, n_experts)
        self.group, self.replicas = group, replicas

    def __call__(self, moe: MoE, x: Tensor, weights: Tensor, ids: Tensor, counts: Tensor) -> Tensor:
        n_local, first = len(self.local), self.local.start
        # every EP peer's counts [P, E]: what each sends to whom
        table = counts.new_empty(self.size * self.n_experts)
        _all_gather_single(table, counts, group=self.group)
        table = table.view(self.size, self.n_experts)
        received = table[:, first:first + n_local]  # [P, n_local] rows from each peer for each local expert
        active = received.sum(0)
        if self.replicas is not None:  # the replicas of these experts run them alike
            dist.all_reduce(active, group=self.replicas)
        # dispatch: assignments sorted by expert (stable: tokens stay in order within an expert)
        k = ids.shape[1]
        order = torch.argsort(ids.flatten(), stable=True)
        token = order // k
        send = torch.cat([x[token].to(torch.float32), weights.flatten()[order].unsqueeze(-1)], dim=-1)
        send_splits = counts.view(self.size, n_local).sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        recv = _all_to_all(send, recv_splits, send_splits, self.group)
        rows_x, rows_w = recv[:, :-1].to(x.dtype), recv[:, -1:]
        # received rows: peer by peer, expert by expert; run each local expert once on all its rows
        expert_of_row = torch.repeat_interleave(torch.arange(n_local, device=x.device).repeat(self.size),
                                                received.flatten())
        outs, where = [], []
        for j in torch.nonzero(active).flatten().tolist():
            rows = torch.nonzero(expert_of_row == j).flatten()
            outs.append(moe.experts[first + j](rows_x[rows], rows_w[rows]))
            where.append(rows)
        if outs:
            out = torch.cat(outs)[torch.argsort(torch.cat(where))]  # back to the received order
        else:
            out = rows_x.new_zeros(0, x.shape[1])
        back = _all_to_all(out, send_splits, recv_splits, self.group)
        # combine in increasing expert id, tokens in order: MoE.run_experts' additions, in its order
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for count in counts.tolist():
            if count:
                y = y.index_add(0, token[start:start + count], back[start:start + count].to(torch.float32))
            start += count
        return y
