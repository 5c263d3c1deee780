"""Deployment arithmetic: weights, KV-cache memory and per-token FLOPs of a config (spec §4.3).

Pure functions of a `ModelArgs`; nothing is allocated. The accounting reproduces the spec's table
at 1,048,576 tokens (V4-Pro 5,031 B/token vs V3.2 48,068 B/token in the production formats, 9,848
vs 85,888 in bf16; ≈303 G vs ≈1,155 G FLOPs per token) and states what it leaves out.

Weights: the sum of `nbytes` of `expected_tensors(args, layout)`, i.e. what the official
checkpoint stores (FP8 + ue8m0 block scales, packed FP4 experts, bf16/fp32 rest), MTP block
included because a deployment that decodes speculatively loads it.

KV cache, per sequence and per main layer (the MTP block is reported apart and left out of totals):
* a compressed layer of ratio r keeps ⌊L/r⌋ entries of one *main entry* each; a CSA layer (r = 4)
  also keeps ⌊L/4⌋ *indexer keys*. Amortised bytes/token of a layer = entry/r (+ index key/4), which
  is what the spec adds up over the layers ("B/token");
* constant per-sequence state, which the spec ignores for the B/token figure but a deployment
  must still hold: the sliding-window ring (`window_size` main entries, in every layer, allocated
  whole) and the compressor states in the reference fp32 (K and Z buffers, `coff·r` rows of
  `coff·d` channels, coff = 2 for the overlapping CSA windows). For Pro ≈23 MB per sequence.
* not counted: paging granularity/padding, not-yet-pooled tail tokens beyond the compressor state
  (they are in it), activations and workspace (use the GPU headroom for those).

KV formats (spec §4.2) come from the registry `dsv4.kv_formats`, whose row layouts the engine's paged cache
allocates, so the planner and the engine share one byte formula: ``fp8`` is the production layout - main
entry = nope dims e4m3 + rope dims bf16 + one ue8m0 scale per 64 nope dims padded to 8 bytes (584 B at
512/64), indexer key = FP4 e2m1 packed + one ue8m0 scale per 32 dims (68 B at 128); ``bf16`` is the
all-bf16 accounting (head_dim·2, index_head_dim·2); ``model`` is the model's dtype, taken as V4's bf16. For
configs other than the released 512/64/128 sizes the same rules are applied by extension; only the released
sizes are verified kernel layouts.

FLOPs per token at a position (2 FLOPs per MAC), with `position` = tokens in the context including
the current one, so the query sees min(window, position) window keys and ⌊position/r⌋ entries:
* linear = 2 × (active parameters − embedding): active = the main model's parameters with routed
  experts counted k/E (so the head, compressors, indexer projections and mHC mixers are in it);
  the embedding is a lookup. The MTP block is left out, as in the spec.
* core attention = heads × keys × 2·head_dim MACs (scores and weighted sum over the shared K=V):
  SWA-only keys = window; CSA = window + min(topk, entries); HCA = window + all entries.
* indexer = index_heads × index_head_dim × entries MACs per CSA layer (the scoring of every
  compressed entry). Left out, as in the spec: the per-head weighting of the index scores (1/d of
  the indexer), softmax/top-k, norms, RoPE, the compressor pooling and the mHC Sinkhorn iterations.

DeepSeek-V3.2 for comparison (`v32_reference`): 61 MLA layers with one 576-dim latent (512 + 64
rope) per token and an indexer key of 128 dims per token in every layer; 37 B active parameters;
128 heads attending to top-2048 keys with 576-dim scores and 512-dim values; indexer 64 × 128
over all keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from .checkpoint.schema import LAYOUTS, active_parameters, expected_tensors
from .config import CSA_RATIO, ModelArgs
from .kv_formats import get_format

GIB = 2**30
STATE_DTYPE_BYTES = 4  # the reference keeps compressor states in fp32


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------- weights
@dataclass(frozen=True)
class WeightsPlan:
    """Checkpoint bytes and parameter counts of a config, from the checkpoint schema."""

    layout: str
    bytes_main: int
    bytes_mtp: int
    params_main: int
    params_mtp: int
    params_active: float  # main model, routed experts counted k/E
    params_embedding: int

    @property
    def bytes_total(self) -> int:
        return self.bytes_main + self.bytes_mtp

    @property
    def params_total(self) -> int:
        return self.params_main + self.params_mtp


@lru_cache(maxsize=8)
def weights_plan(args: ModelArgs, layout: str = "hf") -> WeightsPlan:
    """Sum the schema of the official checkpoint; cached because Pro has ~140k tensors (≈1 s)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    specs = expected_tensors(args, layout).values()
    main = [s for s in specs if not s.block.startswith("mtp.")]
    mtp = [s for s in specs if s.block.startswith("mtp.")]
    return WeightsPlan(
        layout=layout,
        bytes_main=sum(s.nbytes for s in main),
        bytes_mtp=sum(s.nbytes for s in mtp),
        params_main=sum(s.parameters for s in main),
        params_mtp=sum(s.parameters for s in mtp),
        params_active=sum(active_parameters(s, args) for s in main),
        params_embedding=sum(s.parameters for s in main if s.component == "embed"),
    )


# ---------------------------------------------------------------------- KV cache
def kv_entry_bytes(args: ModelArgs, kv_format: str) -> tuple[int, int]:
    """(main KV entry, indexer key) bytes per cached row in `kv_format` (spec §4.2), from the registry."""
    fmt = get_format(kv_format)
    return fmt.entry_bytes(args, "kv"), fmt.entry_bytes(args, "index")


def compressor_state_bytes(ratio: int, width: int) -> int:
    """fp32 K and Z buffers of one compressor: coff·ratio rows × coff·width channels (spec §4.1)."""
    if ratio == 0:
        return 0
    coff = 2 if ratio == CSA_RATIO else 1
    return 2 * (coff * ratio) * (coff * width) * STATE_DTYPE_BYTES


@dataclass(frozen=True)
class LayerKV:
    """One layer type of the KV table: how many main layers, what each caches per token and per sequence."""

    kind: str  # "SWA-only", "CSA", "CSA indexer", "HCA"
    ratio: int  # tokens per cached entry (0: nothing grows with the context)
    layers: int
    entry_bytes: int  # bytes of one cached row
    state_bytes: int  # constant per sequence and layer: window ring + compressor state

    @property
    def bytes_per_token_per_layer(self) -> float:
        return self.entry_bytes / self.ratio if self.ratio else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.layers * self.bytes_per_token_per_layer

    def entries(self, context: int) -> int:
        """Complete entries one layer holds after `context` tokens (the partial block is in the state)."""
        return context // self.ratio if self.ratio else 0

    def growing_bytes(self, context: int) -> int:
        return self.layers * self.entries(context) * self.entry_bytes


def _layer_rows(args: ModelArgs, kv_format: str, ratios: list[int]) -> list[LayerKV]:
    """Group layers of the given ratios into table rows: always SWA-only, CSA (+ indexer) and HCA."""
    main, index = kv_entry_bytes(args, kv_format)
    ring = args.window_size * main
    hca_ratios = sorted({r for r in ratios if r not in (0, CSA_RATIO)}) or [128]
    n_csa = ratios.count(CSA_RATIO)
    rows = [
        LayerKV("SWA-only", 0, ratios.count(0), main, ring),
        LayerKV("CSA", CSA_RATIO, n_csa, main, ring + compressor_state_bytes(CSA_RATIO, args.head_dim)),
        LayerKV("CSA indexer", CSA_RATIO, n_csa, index, compressor_state_bytes(CSA_RATIO, args.index_head_dim)),
    ]
    for r in hca_ratios:
        rows.append(LayerKV("HCA", r, ratios.count(r), main, ring + compressor_state_bytes(r, args.head_dim)))
    return rows


@dataclass(frozen=True)
class KVPlan:
    """KV memory of `batch` sequences of `context` tokens over the main layers."""

    kv_format: str
    context: int
    batch: int
    rows: tuple[LayerKV, ...]
    mtp_state_bytes: int  # per sequence; the MTP block's ring (and state) - reported, not in the totals

    @property
    def main_layers(self) -> int:
        return sum(r.layers for r in self.rows if r.kind != "CSA indexer")

    @property
    def bytes_per_token(self) -> float:
        """The spec's amortised figure: every layer's entry/ratio added up (constant state ignored)."""
        return sum(r.bytes_per_token for r in self.rows)

    @property
    def bytes_per_token_per_layer(self) -> float:
        """`bytes_per_token` averaged over the main layers."""
        return self.bytes_per_token / self.main_layers

    @property
    def state_bytes_per_sequence(self) -> int:
        return sum(r.layers * r.state_bytes for r in self.rows)

    @property
    def growing_bytes_per_sequence(self) -> int:
        return sum(r.growing_bytes(self.context) for r in self.rows)

    @property
    def bytes_per_sequence(self) -> int:
        return self.growing_bytes_per_sequence + self.state_bytes_per_sequence

    @property
    def total_bytes(self) -> int:
        return self.batch * self.bytes_per_sequence


def kv_plan(args: ModelArgs, context: int, batch: int = 1, kv_format: str = "fp8") -> KVPlan:
    """KV memory of a V4 config; see the module docstring for the accounting."""
    _check_positive("context", context)
    _check_positive("batch", batch)
    main_ratios = [args.layer_ratio(i) for i in range(args.n_layers)]
    mtp_ratios = [args.layer_ratio(args.n_layers + j) for j in range(args.n_mtp_layers)]
    mtp_state = sum(r.layers * r.state_bytes for r in _layer_rows(args, kv_format, mtp_ratios))
    return KVPlan(kv_format, context, batch, tuple(_layer_rows(args, kv_format, main_ratios)), mtp_state)


# ---------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class FlopsPlan:
    """FLOPs of one decoded token at `position` (2 per MAC), split as in the spec's table."""

    position: int
    linear: float
    attention: dict[str, int] = field(default_factory=dict)  # per layer type
    indexer: int = 0

    @property
    def attention_total(self) -> int:
        return sum(self.attention.values())

    @property
    def total(self) -> float:
        return self.linear + self.attention_total + self.indexer


def attention_keys(args: ModelArgs, ratio: int, position: int) -> int:
    """Keys one query attends to in a layer of `ratio` at `position`: window + selected entries."""
    window = min(args.window_size, position)
    if ratio == 0:
        return window
    entries = position // ratio
    return window + (min(args.index_topk, entries) if ratio == CSA_RATIO else entries)


def flops_per_token(args: ModelArgs, position: int) -> FlopsPlan:
    """Per-token FLOPs of a V4 config at `position`; the linear part from the schema's active parameters."""
    _check_positive("position", position)
    weights = weights_plan(args, "hf")  # the layout changes bytes, not parameter counts
    ratios = [args.layer_ratio(i) for i in range(args.n_layers)]
    attention = {"SWA-only": 0, "CSA": 0, "HCA": 0}
    for ratio in ratios:
        kind = "SWA-only" if ratio == 0 else "CSA" if ratio == CSA_RATIO else "HCA"
        attention[kind] += 2 * args.n_heads * attention_keys(args, ratio, position) * 2 * args.head_dim
    indexer = 2 * ratios.count(CSA_RATIO) * args.index_n_heads * args.index_head_dim * (position // CSA_RATIO)
    return FlopsPlan(position, 2 * (weights.params_active - weights.params_embedding), attention, indexer)


# ---------------------------------------------------------------------- DeepSeek-V3.2
@dataclass(frozen=True)
class V32:
    """DeepSeek-V3.2 constants used by the comparison (spec §4.2-4.3)."""

    n_layers: int = 61
    n_heads: int = 128
    kv_lora_rank: int = 512  # MLA latent, also the value width after absorption
    rope_head_dim: int = 64
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    active_params: float = 37e9  # as published, embedding included
    vocab_size: int = 129280
    dim: int = 7168
    fp8_scale_group: int = 128  # FlashMLA V32: one fp32 scale per 128 latent dims
    fp8_scale_bytes: int = 4

    def kv_entry_bytes(self, kv_format: str) -> tuple[int, int]:
        """(MLA latent, indexer key) bytes per token per layer: 656 + 132 in fp8, (576 + 128)·2 in bf16 (and in
        "model", V3.2's bf16)."""
        get_format(kv_format)  # a known format
        if kv_format != "fp8":
            return 2 * (self.kv_lora_rank + self.rope_head_dim), 2 * self.index_head_dim
        latent = self.kv_lora_rank + self.kv_lora_rank // self.fp8_scale_group * self.fp8_scale_bytes
        return latent + 2 * self.rope_head_dim, self.index_head_dim + self.fp8_scale_bytes


@dataclass(frozen=True)
class V32Plan:
    """KV and FLOPs of DeepSeek-V3.2 at the same context, batch and KV format."""

    kv_format: str
    context: int
    batch: int
    bytes_per_token: int
    flops: FlopsPlan

    @property
    def total_bytes(self) -> int:
        return self.batch * self.context * self.bytes_per_token


def v32_reference(context: int, batch: int = 1, kv_format: str = "fp8", v32: V32 = V32()) -> V32Plan:
    """V3.2 caches every token in every layer; it attends to top-k keys and indexes all of them."""
    _check_positive("context", context)
    _check_positive("batch", batch)
    latent, index = v32.kv_entry_bytes(kv_format)
    key_dims = v32.kv_lora_rank + v32.rope_head_dim
    attn_macs = v32.n_heads * min(v32.index_topk, context) * (key_dims + v32.kv_lora_rank)
    index_macs = v32.index_n_heads * v32.index_head_dim * context
    flops = FlopsPlan(
        position=context,
        linear=2 * (v32.active_params - v32.vocab_size * v32.dim),
        attention={"MLA top-k": 2 * v32.n_layers * attn_macs},
        indexer=2 * v32.n_layers * index_macs,
    )
    return V32Plan(kv_format, context, batch, v32.n_layers * (latent + index), flops)


# ---------------------------------------------------------------------- GPUs
def gpus_needed(needed_bytes: float, gpu_gib: float, headroom: float = 0.1) -> int:
    """GPUs of `gpu_gib` GiB that hold `needed_bytes` when a `headroom` fraction of each stays free.

    A lower bound: weights and KV are assumed to shard evenly (tensor/expert parallel), and the
    headroom stands for activations, workspace, CUDA context and fragmentation."""
    if not gpu_gib > 0:
        raise ValueError(f"GPU memory must be > 0 GiB, got {gpu_gib!r}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom!r}")
    return max(1, math.ceil(needed_bytes / (gpu_gib * GIB * (1 - headroom))))
