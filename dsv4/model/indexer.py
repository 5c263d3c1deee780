"""The lightning indexer of CSA layers: picks which compressed entries each query attends to.

Scores I[t, j] = sum_h w[t, h] * ReLU(q[t, h] . K[j]) over the indexer's own compressed keys
(ratio 4, width index_head_dim); queries come from the shared low-rank query latent. Queries and
keys are Hadamard-rotated (which leaves dot products unchanged) so that their FP4 rounding in
the official numerics spreads error evenly over the dims. Top-k over causally complete entries.
"""

from __future__ import annotations

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
        self.weight_scale = self.head_dim**-0.5 * self.n_heads**-0.5

    def forward(self, x: Tensor, c_q: Tensor, cos: Tensor, sin: Tensor, freqs: Tensor, ctx: ForwardContext,
                state: CompressorState) -> Tensor:
        """x [B,S,d], c_q [B,S,q_lora] -> selected entry ids [B,S,k] (ascending, -1 = none)."""
        keys = self.compressor(x, ctx, state, freqs)  # [B,N,Di]
        n_entries = keys.shape[1]
        if n_entries == 0:
            return torch.full((*x.shape[:2], 0), -1, dtype=torch.long, device=x.device)
        q = self.wq_b(c_q).unflatten(-1, (self.n_heads, self.head_dim))  # [B,S,Hi,Di]
        q = kernels.hadamard(apply_rope(q, cos.unsqueeze(2), sin.unsqueeze(2)))
        if ctx.exact:
            q = kernels.fp4_simulate(q)
        weights = self.weights_proj(x) * self.weight_scale  # [B,S,Hi]
        scores = torch.einsum("bshd,bnd->bshn", q, keys.to(q.dtype)).relu()
        index_scores = (scores * weights.unsqueeze(-1)).sum(dim=2)  # [B,S,N]
        visible = torch.arange(n_entries, device=x.device) < torch.div(ctx.positions + 1, CSA_RATIO,
                                                                      rounding_mode="floor").unsqueeze(-1)
        index_scores = index_scores.masked_fill(~visible, float("-inf"))
        k = min(self.topk, n_entries)
        top = index_scores.topk(k, dim=-1).indices
        top = torch.where(visible.gather(-1, top), top, -1)
        return top.sort(dim=-1).values
