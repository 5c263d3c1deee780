"""Block and Transformer: one forward for training (full sequence) and inference (with a cache).

`Transformer.forward(tokens)` runs the whole sequence from position 0 and returns logits for every
position (differentiable). `Transformer.forward(tokens, cache)` consumes a chunk of any length at
the cache's current position for every row of the batch (rows may have different positions and,
via `lengths`, different numbers of valid tokens), updates the cache and returns the chunk's
logits. Both paths run the same code; the full forward simply uses a throw-away cache.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels
from ..config import ModelArgs
from ..kernels.capture import without_host_reads
from .attention import Attention
from .cache import Cache, CacheRows, ForwardContext, ForwardTrace, LayerCache
from .layers import Embedding, Linear, RMSNorm, norm_weight
from .mhc import HC_MODES, hc_head, hc_post, hc_pre
from .moe import MoE

NUMERICS = ("plain", "exact")
# a chunk of at most this many token ids is range-checked on the host from the ids themselves, a longer one from
# their least and greatest (one reduction, instead of copying thousands of ids)
FEW_IDS = 64


class Block(nn.Module):
    """mHC(attention) then mHC(MoE); the residual state is [B, S, hc_mult, dim]."""

    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype | None, hc_mode: str = "mhc") -> None:
        super().__init__()
        self.layer_id = layer_id
        self.args = args
        self.hc_mode = hc_mode
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(layer_id, args, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MoE(layer_id, args, dtype)
        hc, n_mix = args.hc_mult, (2 + args.hc_mult) * args.hc_mult
        for site in ("attn", "ffn"):
            fn = torch.empty(n_mix, hc * args.dim, dtype=torch.float32)
            self.register_parameter(f"hc_{site}_fn", nn.Parameter(fn))
            self.register_parameter(f"hc_{site}_base", nn.Parameter(torch.empty(n_mix, dtype=torch.float32)))
            self.register_parameter(f"hc_{site}_scale", nn.Parameter(torch.empty(3, dtype=torch.float32)))

    def _pre(self, site: str, norm: RMSNorm, x: Tensor, ctx: ForwardContext, quantize: bool
             ) -> tuple[Tensor, tuple[Tensor, Tensor] | None, Tensor | None, Tensor | None]:
        """The sublayer's input from the streams x, normed: (normed, its FP8 quantisation where `quantize` asks
        (inference, quantised linears reading it; None where not, or where the backend's linears quantise for
        themselves), post, comb). In mHC, with a norm that runs its own forward, one op (`kernels.hc_pre_norm`)."""
        a = self.args
        fn, scale, base = (getattr(self, f"hc_{site}_{part}") for part in ("fn", "scale", "base"))
        weight = norm_weight(norm)
        if self.hc_mode == "mhc" and weight is not None:
            normed, quantized, post, comb = kernels.hc_pre_norm(x, fn, scale, base, a.hc_mult, a.hc_sinkhorn_iters,
                                                                a.hc_eps, a.norm_eps, weight, norm.eps, quantize)
        else:
            u, post, comb = hc_pre(x, fn, scale, base, a.hc_mult, a.hc_sinkhorn_iters, a.hc_eps, a.norm_eps,
                                   self.hc_mode)
            normed, quantized = norm(u, True) if quantize else (norm(u), None)
        if ctx.trace is not None:
            ctx.trace.hc_maps.append(comb)
        return normed, quantized, post, comb

    def forward(self, x: Tensor, ctx: ForwardContext, cache: LayerCache, reuse_input: bool = False) -> Tensor:
        """x [B,S,hc,d] -> the new streams. `reuse_input`: the caller has no further use for x, whose storage may
        then hold the result. Without gradients the streams between the two sublayers, this call's own, are
        written over in place."""
        inplace = not torch.is_grad_enabled()
        normed, quantized, post, comb = self._pre("attn", self.attn_norm, x, ctx,
                                                  inplace and self.attn.reads_quantized())
        x = hc_post(self.attn(normed, ctx, cache, quantized), x, post, comb, inplace=inplace and reuse_input)
        routing = ctx.trace.routing if ctx.trace is not None else None
        normed, quantized, post, comb = self._pre("ffn", self.ffn_norm, x, ctx, inplace and self.ffn.reads_quantized())
        return hc_post(self.ffn(normed, ctx.tokens, routing, quantized), x, post, comb, inplace=inplace)


def _add_hc_head(module: nn.Module, args: ModelArgs) -> None:
    hc = args.hc_mult
    module.hc_head_fn = nn.Parameter(torch.empty(hc, hc * args.dim, dtype=torch.float32))
    module.hc_head_base = nn.Parameter(torch.empty(hc, dtype=torch.float32))
    module.hc_head_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))


class MTPBlock(Block):
    """Multi-token prediction: a block fed with the main model's final streams and the next token's
    embedding; shares the main model's embedding and head (not stored under `mtp.*`)."""

    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype | None, hc_mode: str = "mhc") -> None:
        super().__init__(layer_id, args, dtype, hc_mode)
        self.e_proj = Linear(args.dim, args.dim, dtype=dtype)
        self.h_proj = Linear(args.dim, args.dim, dtype=dtype)
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        _add_hc_head(self, args)


class Transformer(nn.Module):
    """DeepSeek-V4 with the official parameter names.

    `dtype` is the activation / residual-stream dtype and the storage dtype of the float linear
    weights (bf16 for the official numerics, fp32 for training or reference checks). `numerics`
    is "exact" (the official inference's QAT simulation of the KV cache and indexer; FP8/FP4 GEMMs
    come from the weights' dtypes) or "plain" (the same math without quantisation simulation). `hc_mode`
    is "mhc" (the architecture) or a training ablation: "hc" (unconstrained hyper-connections) or "residual".
    """

    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.float32, numerics: str = "plain",
                 hc_mode: str = "mhc") -> None:
        super().__init__()
        if numerics not in NUMERICS:
            raise ValueError(f"numerics={numerics!r}: choose from {NUMERICS}")
        if hc_mode not in HC_MODES:
            raise ValueError(f"hc_mode={hc_mode!r}: choose from {HC_MODES}")
        self.args = args
        self.dtype = dtype
        self.numerics = numerics
        self.hc_mode = hc_mode
        self.embed = Embedding(args.vocab_size, args.dim, dtype=dtype)
        self.layers = nn.ModuleList(Block(i, args, dtype, hc_mode) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # stored bf16, used in fp32 like the reference
        self.head = Linear(args.dim, args.vocab_size, dtype=torch.float32, official_format="bf16")
        _add_hc_head(self, args)
        self.mtp = nn.ModuleList(MTPBlock(args.n_layers + k, args, dtype, hc_mode)
                                 for k in range(args.n_mtp_layers))
        # the last inference forward's chunk (widths, starts, lengths) and its `ForwardContext.memo`: a forward over
        # the same chunk next (a speculative step's MTP call after its main call) reads the RoPE rows and window
        # indices from it instead of building them again
        self._last_memo: tuple[tuple, dict] | None = None

    # ------------------------------------------------------------------ public API
    def new_cache(self, batch_size: int, max_seq_len: int | None = None, **options) -> Cache:
        """A cache for this model's dtype and device; `options` go to `Cache` (storage, mtp)."""
        device = self.embed.weight.device
        return Cache(self.args, batch_size, max_seq_len or self.args.max_seq_len, self.dtype, device, **options)

    def forward(self, tokens: Tensor, cache: Cache | None = None, *, lengths: Tensor | None = None,
                start_pos: int | Tensor | None = None, trace: ForwardTrace | None = None) -> Tensor:
        """tokens [B,S] -> logits [B,S,vocab] (fp32). `trace` (training) records indexer losses, routing and
        the mHC maps, and switches the indexer's dense warm-up (see `ForwardTrace`)."""
        streams = self.forward_streams(tokens, cache, lengths=lengths, start_pos=start_pos, trace=trace)
        return self.logits(streams)

    def forward_streams(self, tokens: Tensor, cache: Cache | None = None, *, lengths: Tensor | None = None,
                        start_pos: int | Tensor | None = None,
                        trace: ForwardTrace | None = None) -> Tensor:
        """The final residual streams [B,S,hc,d] (what the head and the MTP block consume)."""
        ctx, cache = self._context(tokens, cache, lengths, start_pos, cache_lengths=lambda c: c.lengths)
        ctx.trace = trace
        x = self.embed(tokens).unsqueeze(2).repeat(1, 1, self.args.hc_mult, 1)  # [B,S,hc,d]
        for layer in self.layers:  # each layer's streams are this loop's own: the next may write over them
            x = layer(x, ctx, cache.layers[layer.layer_id], reuse_input=True)
        if ctx.persist:
            cache.lengths += ctx.lengths
        return x

    def static_decode_streams(self, tokens: Tensor, cache: Cache | CacheRows, capacity: int) -> Tensor:
        """One decode step, a token a row (tokens [B,1]), whose ops and shapes are a function of (B, `capacity`)
        alone and which reads nothing on the host: what a CUDA graph captures once and replays at any positions
        below `capacity` (`dsv4.engine.graphs`). Returns the final streams [B,1,hc,d], equal to `forward_streams`'.

        It differs from `forward_streams` in what it does not know: the rows' positions. Every layer reads the
        compressed entries of positions below `capacity` (a row's entries past its own count are masked, as
        always), and every compressor pools an entry in every row each step: the row's unfinished entry where the
        step finishes none, which no read sees before the step that finishes it writes it again (a paged store
        needs that entry's page: the caller allocates it). Nor does it check what `forward_streams` checks: the
        caller vouches that the token ids are in the vocabulary and that every row's position is below
        `capacity`, a multiple of every compression ratio no larger than the cache's capacity."""
        ratios = [r for r in self.args.compress_ratios if r]
        if tokens.dim() != 2 or tokens.shape[1] != 1 or tokens.shape[0] != cache.batch_size:
            raise ValueError(f"a static decode step takes tokens [{cache.batch_size}, 1], got {tuple(tokens.shape)}")
        if cache.transient or not 0 < capacity <= cache.max_seq_len or any(capacity % r for r in ratios):
            raise ValueError(f"capacity={capacity}: a static decode step needs a persistent cache and a positive "
                             f"multiple of every compression ratio {sorted(set(ratios))} up to the cache's "
                             f"{cache.max_seq_len} tokens")
        start = cache.lengths.clone()  # [B] (not the cache's own tensor, which the step advances)
        ctx = ForwardContext(tokens, start, torch.ones_like(start), start.unsqueeze(1), self.numerics == "exact",
                             persist=True, appends=1, capacity=capacity)
        with without_host_reads():
            x = self.embed(tokens).unsqueeze(2).repeat(1, 1, self.args.hc_mult, 1)  # [B,1,hc,d]
            for layer in self.layers:
                x = layer(x, ctx, cache.layers[layer.layer_id], reuse_input=True)
        cache.lengths += ctx.lengths  # in place: a captured graph advances the cache's own tensor
        return x

    def logits(self, streams: Tensor) -> Tensor:
        """Final streams [B,S,hc,d] -> logits [B,S,vocab] fp32."""
        return self.head(self.head_input(streams))

    def head_input(self, streams: Tensor) -> Tensor:
        """Final streams [B,S,hc,d] -> what the head multiplies, [B,S,d] fp32 (the hc head, then the final norm)."""
        a = self.args
        y = hc_head(streams, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, a.hc_eps, a.norm_eps,
                    self.hc_mode)
        return self.norm(y).to(torch.float32)

    def greedy_tokens(self, x: Tensor) -> Tensor:
        """The greedy token (the logits' first maximum) of each head input x [..., d] (`head_input`): int64 [...].
        A float head goes to `kernels.greedy_head`, which need not compute every logit; any other head (a
        vocab-parallel one, a quantised weight) computes its logits."""
        if self._plain_head():
            return kernels.greedy_head(x, self.head.weight)
        return self.head(x).max(dim=-1).indices

    def head_loss(self, streams: Tensor, targets: Tensor) -> Tensor:
        """Sum over the positions of the cross-entropy of `logits(streams)` against targets [B,S] (a target of
        `kernels.IGNORE_INDEX` leaves its position out): 0-dim fp32, what training needs of the head. A float
        head goes to `kernels.head_cross_entropy`, which a fast backend computes without holding every logit (a
        training step's largest tensor); any other head computes its logits."""
        return self._head_loss(self.head_input(streams), targets)

    def mtp_head_loss(self, streams: Tensor, next_tokens: Tensor, targets: Tensor, depth: int = 0, *,
                      lengths: Tensor | None = None, trace: ForwardTrace | None = None) -> Tensor:
        """`head_loss` of the MTP block (no cache): the cross-entropy of `mtp_logits(streams, next_tokens)` against
        the tokens at t+2, targets [B,S]."""
        x = self.mtp_streams(streams, next_tokens, None, depth, lengths=lengths, trace=trace)
        return self._head_loss(self.mtp_head_input(x, depth), targets)

    def _head_loss(self, x: Tensor, targets: Tensor) -> Tensor:
        if self._plain_head():
            return kernels.head_cross_entropy(x, self.head.weight, targets)
        return kernels.summed_cross_entropy(self.head(x), targets)

    def _plain_head(self) -> bool:
        """The head is the model's own float projection (not a vocab-parallel or quantised one, nor one whose
        forward a training recipe replaced), so what it computes is `linear(x, head.weight)`."""
        head = self.head
        return (type(head) is Linear and head.scale is None and head.weight.is_floating_point()
                and "forward" not in vars(head))

    def mtp_logits(self, streams: Tensor, next_tokens: Tensor, cache: Cache | None = None, depth: int = 0, *,
                   lengths: Tensor | None = None, trace: ForwardTrace | None = None) -> Tensor:
        """MTP prediction: streams at positions t [B,S,hc,d] and the tokens at t+1 [B,S] -> logits for
        the tokens at t+2 [B,S,vocab]. With a cache, the MTP block keeps its own position counter."""
        return self.mtp_head(self.mtp_streams(streams, next_tokens, cache, depth, lengths=lengths, trace=trace),
                             depth)

    def mtp_streams(self, streams: Tensor, next_tokens: Tensor, cache: Cache | None = None, depth: int = 0, *,
                    lengths: Tensor | None = None, trace: ForwardTrace | None = None) -> Tensor:
        """The MTP block's output streams [B,S,hc,d] (before its head); see `mtp_logits`."""
        if cache is not None and not cache.has_mtp:
            raise ValueError("this cache was built without the MTP layers (mtp=False)")
        ctx, cache = self._context(next_tokens, cache, lengths, None, cache_lengths=lambda c: c.mtp_lengths)
        ctx.trace = trace
        block = self.mtp[depth]
        e = block.enorm(self.embed(next_tokens))
        x = block.e_proj(e).unsqueeze(2) + block.h_proj(block.hnorm(streams))
        x = block(x, ctx, cache.layers[block.layer_id], reuse_input=True)
        if ctx.persist:
            cache.mtp_lengths += ctx.lengths
        return x

    def mtp_head(self, x: Tensor, depth: int = 0) -> Tensor:
        """MTP block output streams [B,S,hc,d] -> logits [B,S,vocab] fp32 (its hc head and norm, the shared head)."""
        return self.head(self.mtp_head_input(x, depth))

    def mtp_head_input(self, x: Tensor, depth: int = 0) -> Tensor:
        """MTP block output streams [B,S,hc,d] -> what the shared head multiplies, [B,S,d] fp32."""
        block, a = self.mtp[depth], self.args
        y = hc_head(x, block.hc_head_fn, block.hc_head_scale, block.hc_head_base, a.hc_eps, a.norm_eps,
                    self.hc_mode)
        return block.norm(y).to(torch.float32)

    def parameter_counts(self) -> dict[str, int]:
        """Counts as the release reports them: one per weight element (packed FP4 holds two per byte),
        block scales and the `tid2eid` table excluded. Works on the meta device (no allocation)."""
        main = mtp = 0
        for name, t in self.state_dict(keep_vars=True).items():
            if name.endswith(("tid2eid", ".scale")):
                continue
            n = t.numel() * (2 if t.dtype in (torch.int8, torch.uint8, torch.float4_e2m1fn_x2) else 1)
            if name.startswith("mtp."):
                mtp += n
            else:
                main += n
        a = self.args
        inactive_per_block = (a.n_routed_experts - a.n_activated_experts) * 3 * a.dim * a.moe_inter_dim
        return {"main": main, "mtp": mtp, "total": main + mtp, "active": main - a.n_layers * inactive_per_block,
                "mtp_active": mtp - a.n_mtp_layers * inactive_per_block}

    # ------------------------------------------------------------------ helpers
    def _context(self, tokens: Tensor, cache: Cache | None, lengths: Tensor | None, start_pos: int | Tensor | None,
                 cache_lengths) -> tuple[ForwardContext, Cache]:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be an integer tensor [batch, seq], got {tuple(tokens.shape)} {tokens.dtype}")
        bsz, seqlen = tokens.shape
        device = tokens.device
        if cache is None:
            if start_pos not in (None, 0):
                raise ValueError("start_pos without a cache: the full forward always starts at position 0")
            cache = Cache(self.args, bsz, max(seqlen, 1), self.dtype, device, transient=True)
        elif cache.batch_size != bsz:
            raise ValueError(f"cache holds {cache.batch_size} sequences but tokens have batch {bsz}")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
            if lengths.shape != (bsz,):
                raise ValueError(f"lengths must be [batch] with values in [0, {seqlen}], got {lengths.tolist()}")
        # what every check reads, in one host transfer (a decode step's checks were a sixth of its fixed cost as
        # a dozen small ops, each a sync): the starts (this copy of the cache's lengths is the context's), the
        # lengths, and the token ids (a decode's few; a longer chunk's least and greatest)
        ids = tokens.reshape(-1) if tokens.numel() <= FEW_IDS else torch.stack(torch.aminmax(tokens))
        parts = [cache_lengths(cache), ids] if lengths is None else [cache_lengths(cache), lengths, ids]
        joined = torch.cat(parts)  # [B + (B) + ids] int64
        host = joined.tolist()
        start = joined[:bsz]
        starts, ids = host[:bsz], host[len(host) - ids.numel():]
        sizes = host[bsz:2 * bsz] if lengths is not None else [seqlen] * bsz
        if ids and (min(ids) < 0 or max(ids) >= self.args.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.args.vocab_size}); got min {min(ids)}, max {max(ids)}")
        if lengths is None:
            lengths = torch.full((bsz,), seqlen, dtype=torch.long, device=device)
        elif any(n < 0 or n > seqlen for n in sizes):
            raise ValueError(f"lengths must be [batch] with values in [0, {seqlen}], got {sizes}")
        if start_pos is not None:
            expected = torch.as_tensor(start_pos, dtype=torch.long).expand(bsz).tolist()
            if expected != starts:
                raise ValueError(f"chunk starts at {expected} but the cache is at {starts}; "
                                 "chunks must follow the cache position")
        if any(s + n > cache.max_seq_len for s, n in zip(starts, sizes, strict=True)):
            raise ValueError(f"chunk would exceed the cache capacity of {cache.max_seq_len} tokens "
                             f"(at {starts} + {sizes})")
        all_valid = all(n == seqlen for n in sizes) if bsz else seqlen == 0
        persist, exact = not cache.transient, self.numerics == "exact"
        appends = seqlen if persist and all_valid else 0
        memo = self._shared_memo((seqlen, appends, persist, exact, device, tuple(starts), tuple(sizes)))
        positions = memo.get("positions")
        if positions is None:  # [B, S] absolute positions, a function of the chunk like every memo value
            positions = memo["positions"] = start.unsqueeze(1) + torch.arange(seqlen, device=device)
        ctx = ForwardContext(tokens, start, lengths, positions, exact, persist, memo=memo, appends=appends,
                             fresh=not any(starts), host_starts=tuple(starts), host_lengths=tuple(sizes))
        return ctx, cache

    def _shared_memo(self, key: tuple) -> dict:
        """The memo for a forward over the chunk `key` names (its width, appends, persistence, numerics, device,
        starts and lengths): the last forward's when that forward ran over the same chunk, else a new one. Every
        value a memo holds is a function of the chunk (and of per-kind constants: the window, the ratios, the RoPE
        tables), not of the cache or the layers. Only in inference mode (an inference tensor cannot enter
        autograd), and only the last forward's memo is kept (a forward over another chunk replaces it)."""
        last = self._last_memo
        if not torch.is_inference_mode_enabled():
            last = None
        elif last is None or last[0] != key:
            last = (key, {})
        # (a plain attribute: Module.__setattr__'s checks for parameters, buffers and modules cost a decode step ~10 us)
        object.__setattr__(self, "_last_memo", last)
        return {} if last is None else last[1]
