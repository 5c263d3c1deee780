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
from .layers import Linear, project, reads_quantized

# bound on one block of queries' score slab [B, s, Hi, N] (the indexer scores every visible entry); under
# glibc's 32 MiB mmap ceiling, so the blocks reuse heap memory instead of faulting in fresh pages each time
SCORE_BLOCK_BYTES = 16 << 20


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
                state: CompressorState, dense: bool = False, offset: int = 0,
                c_q_quantized: tuple[Tensor, Tensor] | None = None, x_fp32: Tensor | None = None,
                prefix: Tensor | None = None, q: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [B,S,d], c_q [B,S,q_lora] -> selected entry ids [B,S,k] (by descending index score, -1 =
        none, last), each plus `offset` (where the attention's rows hold entry 0), and their index scores [B,S,k].
        `dense` (the warm-up stage of training) selects every visible entry instead, in index order: ids and
        scores [B,S,N]. `c_q_quantized`: act_quant(c_q) where the caller has it, for wq_b; `x_fp32`: x in fp32
        where the caller has it, for the compressor; `prefix` [B,S,W]: ids put before the selected ones (the
        attention's window slots: its whole index in one tensor); `q`: wq_b(c_q) [B,S,Hi*Di] where the caller made
        it (an inference step's, with its own projection of c_q: `layers.project_pair`).

        The inputs are detached: selection is not differentiable, so the indexer learns only from its
        own KL loss against the attention (`indexer_kl_loss`), and that loss must not train the backbone.
        """
        x, c_q = x.detach(), c_q.detach()
        n_entries = self.compressor(x if x_fp32 is None else x_fp32.detach(), ctx, state, freqs)
        keys = state.entries.rows(n_entries)  # [B,N,Di] as stored (paged keys stay in their pages): all scored
        if n_entries == 0:
            empty = torch.full((*x.shape[:2], 0), -1, dtype=torch.long, device=x.device)
            return (empty if prefix is None else prefix), empty.to(torch.float32)
        if q is None:
            q = project(self.wq_b, c_q, c_q_quantized if reads_quantized(self.wq_b) else None)
        q = q.unflatten(-1, (self.n_heads, self.head_dim))  # [B,S,Hi,Di]
        q = kernels.norm_rope_qat(q, None, 0.0, cos.unsqueeze(2), sin.unsqueeze(2),
                                  "hadamard_fp4" if ctx.exact else "hadamard")
        weights = self.weights_proj(x)  # [B,S,Hi], times weight_scale in the scores' op
        # [B,S] the entries each query sees, the same in every CSA layer of a forward
        n_visible = ctx.shared(("csa_visible",), lambda: torch.div(ctx.positions + 1, CSA_RATIO, rounding_mode="floor"))
        k = n_entries if dense else min(self.topk, n_entries)
        # the scores of all queries against all entries would be [B,S,Hi,N]: O(L^2) for a long prefill,
        # so the queries go through in blocks whose score slab stays under SCORE_BLOCK_BYTES
        bsz, seqlen = x.shape[:2]
        block = max(1, SCORE_BLOCK_BYTES // (bsz * self.n_heads * n_entries * q.element_size()))
        chosen, chosen_scores = [], []
        for lo in range(0, seqlen, block):
            rows = slice(lo, lo + block)
            # [B,s,N]; past each query's visible entries unspecified unless dense (the top-k masks them)
            index_scores = kernels.index_scores(q[:, rows], keys, weights[:, rows],
                                                None if dense else n_visible[:, rows], self.weight_scale)
            if self.all_reduce is not None:
                index_scores = self.all_reduce(index_scores)
            if not dense:
                # [B,s,k] each ([B,s,W+k] after the prefix)
                picked, picked_scores = kernels.index_topk(index_scores, n_visible[:, rows], k, offset,
                                                           None if prefix is None else prefix[:, rows])
                chosen.append(picked)
                chosen_scores.append(picked_scores)
                continue
            seen = n_visible[:, rows].unsqueeze(-1)  # [B,s,1]
            hidden = torch.arange(n_entries, device=x.device) >= seen  # [B,s,N]
            picked = torch.where(hidden, -1, torch.arange(offset, offset + n_entries, device=x.device))
            chosen.append(picked if prefix is None else torch.cat((prefix[:, rows], picked), dim=-1))
            chosen_scores.append(index_scores.masked_fill(hidden, float("-inf")))
        if len(chosen) == 1:  # (a decode step's one block: no copy)
            return chosen[0], chosen_scores[0]
        return torch.cat(chosen, dim=1), torch.cat(chosen_scores, dim=1)


def indexer_kl_loss(attn_logits: Tensor, attn_sink: Tensor, n_window: int, chosen: Tensor,
                    index_scores: Tensor, queries: Tensor | None = None) -> Tensor:
    """KL(p || softmax(I)) over each query's selected entries (DeepSeek-V3.2's sparse-stage recipe).

    attn_logits [B,S,H,W+k] are the main attention's scaled logits over window + selected entries
    (-inf where unused), p their per-head softmax (with the sink) summed over heads and L1-normalised
    on the selected entries. Only the indexer's parameters receive gradient (p is detached). `queries` [B,S]
    marks the real tokens (right padding is left out of the mean).
    """
    valid = chosen >= 0  # [B,S,k]
    if queries is not None:
        valid = valid & queries.unsqueeze(-1)
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
