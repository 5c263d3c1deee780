"""Mixture of experts: every V4 block's FFN.

Gate: scores = sqrt(softplus(x W_g^T)) (fp32). The first `n_hash_layers` layers select experts by a
fixed token-id table (`tid2eid`); the others by top-k of scores + `bias`, a balancing term that
only affects *which* experts are chosen. Weights are the unbiased scores of the chosen experts,
renormalised, times `route_scale`. Experts are SwiGLU with the gate clamped from above and the
linear branch clamped both ways at `swiglu_limit`; the routing weight multiplies the hidden
activation before w2. One shared expert (same clamp) sees every token.

Expert parallelism is applied from outside (`dsv4.parallel.experts`): a rank keeps only its experts
(the others are None in `experts`) and sets `expert_parallel`, a strategy that computes the routed
sum across the ranks (inference: each rank runs its experts and the fp32 sums are all-reduced, as
the official code does; training: the routed rows travel to their expert's owner and back). The
gate, the routing record and the shared expert (replicated, added once) stay here, whoever runs the
routed experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..config import ModelArgs
from ..kernels import ExpertWeights
from ..kernels.experts import chosen_experts
from .layers import Linear, reads_quantized


@dataclass
class RouterRecord:
    """One MoE layer's routing of a forward, for the trainer's balancing (sequence-wise balance loss on the
    differentiable `scores`, expert-load counts from `ids` for the bias update)."""

    layer_id: int
    scores: Tensor  # [T, E] fp32 gate scores (before the bias), differentiable
    ids: Tensor  # [T, k] chosen experts
    hashed: bool  # chosen by the token-id table (no bias to update)
    batch: int  # T = batch * seq (rows are sequences, for the sequence-wise loss)


class Gate(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.topk = args.n_activated_experts
        self.score_func = args.score_func
        self.route_scale = args.route_scale
        self.hash = args.is_hash_layer(layer_id)
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=torch.float32))
        if self.hash:
            # frozen token -> experts table; not a parameter (nothing trains it)
            self.register_buffer("tid2eid", torch.zeros(args.vocab_size, self.topk, dtype=torch.long))
        else:
            # aux-loss-free balancing bias, adjusted by the trainer from expert load, never by gradient
            self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T,d], token_ids [T] -> routing weights [T,k] fp32, expert ids [T,k], scores [T,E] fp32."""
        if self.hash:
            return kernels.moe_gate(x, self.weight, None, self.tid2eid[token_ids], self.score_func, self.topk,
                                    self.route_scale)
        return kernels.moe_gate(x, self.weight, self.bias, None, self.score_func, self.topk, self.route_scale)


class Expert(nn.Module):
    """Clamped SwiGLU: w2(silu(min(w1 x, L)) * clamp(w3 x, -L, L))."""

    def __init__(self, dim: int, inter_dim: int, limit: float, dtype: torch.dtype | None, official_format: str):
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter_dim, dtype=dtype, official_format=official_format)
        self.w2 = Linear(inter_dim, dim, dtype=dtype, official_format=official_format)
        self.w3 = Linear(dim, inter_dim, dtype=dtype, official_format=official_format)

    def forward(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        if self.replaced_forward():  # a training recipe's fake-quant linears run as modules
            gate = self.w1(x).to(torch.float32).clamp(max=self.limit)
            up = self.w3(x).to(torch.float32).clamp(-self.limit, self.limit)
            hidden = F.silu(gate) * up
            if weights is not None:
                hidden = weights * hidden
            return self.w2(hidden.to(x.dtype))
        return kernels.swiglu(x, self.weights(), self.limit, weights)

    def replaced_forward(self) -> bool:
        """Whether a linear carries a forward of its own (`dsv4.train.precision` installs fake-quant ones), so
        the expert must call its modules instead of handing their weights to the kernel op."""
        return any("forward" in self._modules[name].__dict__ for name in ("w1", "w3", "w2"))

    def weights(self) -> ExpertWeights:
        """The weights as they are stored now (a quantizer or loader may have replaced them). Read from the
        modules' parameter and buffer tables directly: twelve `nn.Module.__getattr__` calls cost ~6 us, a decode
        step asks for every expert it runs, and the tables are where those lookups find them."""
        try:
            linears = [self._modules[name] for name in ("w1", "w3", "w2")]
            pairs = [(linear._parameters["weight"], linear._buffers["scale"]) for linear in linears]
        except KeyError:  # stored another way: the ordinary lookups
            pairs = [(linear.weight, linear.scale) for linear in (self.w1, self.w3, self.w2)]
        return ExpertWeights(*pairs[0], *pairs[1], *pairs[2])


class ExpertTable(Sequence):
    """The routed experts' weights by expert id, read from the modules when asked (None: held by another rank)."""

    def __init__(self, experts: nn.ModuleList) -> None:
        self.experts = experts

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, e: int) -> ExpertWeights | None:
        # the ModuleList's own table by its key (its __getitem__ normalises the index first, at twice the cost);
        # anything else (a negative or missing index) through __getitem__, which raises as a list does
        expert = self.experts._modules.get(str(e)) if isinstance(e, int) and e >= 0 else None
        if expert is None:
            expert = self.experts[e]
        return None if expert is None else expert.weights()


class MoE(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_experts = args.n_routed_experts
        self.gate = Gate(layer_id, args)
        expert_format = args.routed_expert_dtype
        self.experts = nn.ModuleList(
            Expert(args.dim, args.moe_inter_dim, args.swiglu_limit, dtype, expert_format)
            for _ in range(self.n_experts)
        )
        self.shared_experts = Expert(args.dim, args.moe_inter_dim, args.swiglu_limit, dtype, "fp8")
        self.limit = args.swiglu_limit
        self.expert_table = ExpertTable(self.experts)
        # runs the routed experts across processes: (moe, x [T,d], weights [T,k], ids [T,k], counts [E]) -> the
        # routed sum [T,d] fp32, the experts held elsewhere being None here; None: all experts here, in this process
        self.expert_parallel: Callable[[MoE, Tensor, Tensor, Tensor, Tensor], Tensor] | None = None

    def reads_quantized(self) -> bool:
        """Whether the experts multiply FP8-quantised activations in the kernels' ops (the shared expert's weights
        quantised, no recipe's forwards, all experts in this process), so that the caller's act_quant of x serves
        both the shared and the routed ones."""
        return (self.expert_parallel is None and reads_quantized(self.shared_experts.w1)
                and not self.shared_experts.replaced_forward())

    def forward(self, x: Tensor, token_ids: Tensor, routing: list[RouterRecord] | None = None,
                quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [B,S,d], token_ids [B,S] -> [B,S,d]; appends this layer's `RouterRecord` to `routing` if given.
        `quantized`: act_quant(x) where the caller has it (`reads_quantized`), for the experts' kernels."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if quantized is not None:
            quantized = (quantized[0].reshape(x.shape), quantized[1].reshape(x.shape[0], -1))
        weights, ids, scores = self.gate(x, token_ids.reshape(-1))
        if routing is not None:
            routing.append(RouterRecord(self.layer_id, scores, ids, self.gate.hash, shape[0]))
        if (self.expert_parallel is None and kernels.routes_on_device(x, self.expert_table)
                and not self.replaced_forwards()):
            # grouped and scheduled on the device: no read of the chosen experts
            y = kernels.routed_experts(x, weights, ids, self.expert_table, None, self.limit, quantized)
        elif self.expert_parallel is None:
            y = self.run_experts(x, weights, ids, chosen_experts(ids), quantized)
        else:
            counts = torch.bincount(ids.flatten(), minlength=self.n_experts)  # [E] assignments per expert
            y = self.expert_parallel(self, x, weights, ids, counts)
        # into the routed sum where it is this call's own (a parallel strategy's reduction may keep its tensor)
        own = self.expert_parallel is None and not torch.is_grad_enabled()
        if own and not self.shared_experts.replaced_forward():  # the sum and its rounding in the shared expert's op
            return kernels.swiglu(x, self.shared_experts.weights(), self.shared_experts.limit, None, y,
                                  quantized).reshape(shape)
        shared = self.shared_experts(x).to(torch.float32)
        y = y.add_(shared) if own else y + shared
        return y.to(x.dtype).reshape(shape)

    def replaced_forwards(self) -> bool:
        """Whether a training recipe gave the routed experts forwards of their own (`Expert.replaced_forward`), which
        only a run expert by expert calls. A recipe replaces the forwards of all of a layer's float experts or of
        none, so the ends of the list answer for it (every expert's check would cost a decode step ~1 us each)."""
        experts = self.experts._modules
        ends = (experts.get("0"), experts.get(str(self.n_experts - 1)))
        return any(e is not None and e.replaced_forward() for e in ends)

    def run_experts(self, x: Tensor, weights: Tensor, ids: Tensor, which: Iterable[int],
                    quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The routed sum [T,d] fp32 of experts `which` (increasing ids, all held here) over the tokens routed to
        them: each expert runs once on its rows (weighted before w2), added expert by expert. An expert in `which`
        that no token chose runs on no rows (it still joins the autograd graph: see `dsv4.parallel.experts`).
        `quantized`: act_quant(x) where the caller has it, for the kernels' op."""
        which = list(which)
        experts = list(self.experts)  # (indexing the ModuleList costs as much as each check)
        if any(experts[e].replaced_forward() for e in which):
            y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            for e in which:
                rows, slot = torch.where(ids == e)
                y = y.index_add(0, rows, self.experts[e](x[rows], weights[rows, slot, None]).to(torch.float32))
            return y
        return kernels.routed_experts(x, weights, ids, self.expert_table, which, self.limit, quantized)

    def extra_repr(self) -> str:
        return "" if self.expert_parallel is None else f"expert_parallel={self.expert_parallel}"
