"""The lightning indexer of CSA layers: picks which compressed entries each query attends to.

Scores I[t, j] = sum_h w[t, h] * ReLU(q[t, h] . K[j]) over the indexer's own compressed keys
(ratio 4, width index_head_dim); queries come from the shared low-rank query latent. Queries and
keys are Hadamard-rotated (which leaves dot products unchanged) so that their FP4 rounding in
the official numerics spreads error evenly over the dims. Top-k over causally complete entries.

Under tensor parallelism (applied from outside by `dsv4.parallel`) a rank holds `n_heads` of the
index heads and `all_reduce` sums the per-rank partial scores before the top-k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import kernels
from ..config import CSA_RATIO, ModelArgs
from .cache import CompressorState, ForwardContext
from .compressor import Compressor
from .layers import Linear
from .rope import apply_rope


class Indexer(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.n_heads = args.index_n_heads
        self.head_dim = args.index_head_dim
        self.topk = args.index_topk
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, dtype=dtype)
        self.weights_proj = Linear(args.dim, self.n_heads, dtype=dtype, official_format="bf16")
        self.compressor = Compressor(args, CSA_RATIO, self.head_dim, rotate=True)
        self.weight_scale = self.head_dim**-0.5 * self.n_heads**-0.5  # over all heads, also when split
        # sums the partial index scores over the ranks holding the other heads; None in a single process
        self.all_reduce: Callable[[Tensor], Tensor] | None = None

    def forward(self, x: Tensor, c_q: Tensor, cos: Tensor, sin: Tensor, freqs: Tensor, ctx: ForwardContext,
                state: CompressorState) -> tuple[Tensor, Tensor]:
        """x [B,S,d], c_q [B,S,q_lora] -> selected entry ids [B,S,k] (by descending index score, -1 =
        none, last) and their index scores [B,S,k].

        The inputs are detached: selection is not differentiable, so the indexer learns only from its
        own KL loss against the attention (`indexer_kl_loss`), and that loss must not train the backbone.
        """
        x, c_q = x.detach(), c_q.detach()
        keys = self.compressor(x, ctx, state, freqs)  # [B,N,Di]
        n_entries = keys.shape[1]
        if n_entries == 0:
            empty = torch.full((*x.shape[:2], 0), -1, dtype=torch.long, device=x.device)
            return empty, empty.to(torch.float32)
        q = self.wq_b(c_q).unflatten(-1, (self.n_heads, self.head_dim))  # [B,S,Hi,Di]
        q = kernels.hadamard(apply_rope(q, cos.unsqueeze(2), sin.unsqueeze(2)))
        if ctx.exact:
            q = kernels.fp4_simulate(q)
        weights = self.weights_proj(x) * self.weight_scale  # [B,S,Hi]
        scores = torch.einsum("bshd,bnd->bshn", q, keys.to(q.dtype)).relu()
        index_scores = (scores * weights.unsqueeze(-1)).sum(dim=2)  # [B,S,N]
        if self.all_reduce is not None:
            index_scores = self.all_reduce(index_scores)
        visible = torch.arange(n_entries, device=x.device) < torch.div(ctx.positions + 1, CSA_RATIO,
                                                                      rounding_mode="floor").unsqueeze(-1)
        index_scores = index_scores.masked_fill(~visible, float("-inf"))
        k = min(self.topk, n_entries)
        # stable sort: exact ties (all heads' ReLUs at 0 is common) go to the earliest entries, so the
        # choice does not depend on how many (masked) future entries the call happens to hold. The
        # selection stays in descending score order like the official top-k: the attention kernel walks
        # its candidates in that order, in blocks, so the order is part of the numerics.
        top = index_scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        top_scores = index_scores.gather(-1, top)
        return torch.where(visible.gather(-1, top), top, -1), top_scores


def indexer_kl_loss(attn_logits: Tensor, attn_sink: Tensor, n_window: int, chosen: Tensor,
                    index_scores: Tensor) -> Tensor:
    """KL(p || softmax(I)) over each query's selected entries (DeepSeek-V3.2's sparse-stage recipe).

    attn_logits [B,S,H,W+k] are the main attention's scaled logits over window + selected entries
    (-inf where unused), p their per-head softmax (with the sink) summed over heads and L1-normalised
    on the selected entries. Only the indexer's parameters receive gradient (p is detached).
    """
    valid = chosen >= 0  # [B,S,k]
    if not bool(valid.any()):
        return index_scores.sum() * 0.0
    with torch.no_grad():
        sink = attn_sink.view(1, 1, -1, 1).expand(*attn_logits.shape[:3], 1)
        probs = torch.cat((attn_logits, sink), dim=-1).softmax(dim=-1)[..., n_window:-1]  # [B,S,H,k]
        p = probs.sum(dim=2)
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
    log_q = index_scores.to(torch.float32).masked_fill(~valid, float("-inf")).log_softmax(dim=-1)
    rows = valid.any(-1)
    kl = (p * (torch.log(p.clamp_min(1e-20)) - log_q)).masked_fill(~valid, 0.0).sum(-1)
    return kl[rows].mean()
