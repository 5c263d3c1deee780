"""Model configuration: `ModelArgs` with the official inference-config field names.

The official release ships two dialects of the same configuration: the Hugging Face
`config.json` (`hidden_size`, `num_hidden_layers`, ...) and the reference code's
`inference/config.json` (`dim`, `n_layers`, ...). `ModelArgs` uses the reference names, because
those are the names the checkpoint tensors and the reference math are written in; both dialects
load into it and must give identical args. Users keep either file as a checkpoint's `config.json`,
so `ModelArgs.from_config` tells the dialects apart by their keys (`config_dialect`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCORE_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")
CSA_RATIO = 4  # the official code gives overlapping windows and an indexer to ratio-4 layers only


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _flash_ratios() -> tuple[int, ...]:
    # layers 0,1 sliding-only; even layers CSA, odd layers HCA; the MTP block sliding-only
    return (0, 0) + tuple(4 if i % 2 == 0 else 128 for i in range(2, 43)) + (0,)


def _pro_ratios() -> tuple[int, ...]:
    # layers 0,1 HCA; even layers CSA, odd layers HCA; the MTP block sliding-only
    return (128, 128) + tuple(4 if i % 2 == 0 else 128 for i in range(2, 61)) + (0,)


@dataclass(frozen=True)
class ModelArgs:
    """Architecture hyper-parameters, named as in the official `inference/config.json`."""

    vocab_size: int = 129280
    dim: int = 4096
    moe_inter_dim: int = 2048
    n_layers: int = 43
    n_hash_layers: int = 3
    n_mtp_layers: int = 1
    n_heads: int = 64
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    q_lora_rank: int = 1024
    head_dim: int = 512
    rope_head_dim: int = 64
    norm_eps: float = 1e-6
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: tuple[int, ...] = field(default_factory=_flash_ratios)
    compress_rope_theta: float = 160000.0
    original_seq_len: int = 65536
    rope_theta: float = 10000.0
    rope_factor: float = 16.0
    beta_fast: int = 32
    beta_slow: int = 1
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    dtype: str = "fp8"  # storage of the non-expert linears in the official checkpoint: fp8 | bf16
    # rounding of the FP8 activation scales (linear inputs and the KV cache's FP8 simulation) in the official
    # act_quant: "ue8m0" = powers of two (what dsv4 implements), None = exact amax/448 unless scale_dtype is "fp8"
    scale_fmt: str | None = "ue8m0"
    expert_dtype: str | None = "fp4"  # routed experts: fp4 | fp8 | None (= same as `dtype`)
    # storage of those activation scales in the official kernels: "fp8" (e8m0, which forces scale_fmt "ue8m0") or
    # "fp32". A power of two is exact in either, so with power-of-two scales it does not change a single value;
    # "fp32" with scale_fmt None asks for the unrounded scales dsv4 does not implement, and is rejected
    scale_dtype: str = "fp8"
    max_batch_size: int = 4
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"ModelArgs.{name}={getattr(self, name)!r}: {why}")

        positive = (
            "vocab_size dim moe_inter_dim n_layers n_heads n_routed_experts n_activated_experts q_lora_rank "
            "head_dim rope_head_dim o_groups o_lora_rank window_size index_n_heads index_head_dim index_topk "
            "hc_mult hc_sinkhorn_iters max_batch_size max_seq_len"
        ).split()
        for name in positive:
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                 "must be a positive integer")
        for name in ("n_hash_layers", "n_mtp_layers", "original_seq_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, name, "must be a non-negative integer")
        for name in ("norm_eps", "hc_eps", "rope_theta", "compress_rope_theta", "rope_factor", "route_scale",
                     "swiglu_limit"):
            need(float(getattr(self, name)) > 0, name, "must be > 0")
        need(self.n_shared_experts == 1, "n_shared_experts", "DeepSeek-V4 has exactly one shared expert")
        need(self.n_activated_experts <= self.n_routed_experts, "n_activated_experts",
             f"cannot exceed n_routed_experts={self.n_routed_experts}")
        need(self.n_hash_layers <= self.n_layers, "n_hash_layers", f"cannot exceed n_layers={self.n_layers}")
        need(self.score_func in SCORE_FUNCS, "score_func", f"must be one of {SCORE_FUNCS}")
        need(self.rope_head_dim % 2 == 0 and self.rope_head_dim < self.head_dim, "rope_head_dim",
             f"must be even and smaller than head_dim={self.head_dim}")
        need(self.rope_head_dim < self.index_head_dim, "rope_head_dim",
             f"must be smaller than index_head_dim={self.index_head_dim}")
        need(self.index_head_dim & (self.index_head_dim - 1) == 0, "index_head_dim",
             "must be a power of two (Hadamard rotation)")
        need(self.n_heads % self.o_groups == 0, "o_groups", f"must divide n_heads={self.n_heads}")
        n_ratios = self.n_layers + self.n_mtp_layers
        need(len(self.compress_ratios) == n_ratios, "compress_ratios",
             f"needs n_layers + n_mtp_layers = {n_ratios} entries, got {len(self.compress_ratios)}")
        need(all(r >= 0 for r in self.compress_ratios), "compress_ratios", "entries must be >= 0")
        need(all(r == 0 or self.max_seq_len >= r for r in self.compress_ratios), "max_seq_len",
             "must be at least the largest compress ratio")
        need(self.dtype in ("fp8", "bf16"), "dtype", "must be 'fp8' or 'bf16'")
        need(self.expert_dtype in ("fp4", "fp8", "bf16", None), "expert_dtype", "must be fp4, fp8, bf16 or None")
        need(self.scale_fmt in ("ue8m0", None), "scale_fmt", "must be 'ue8m0' or None")
        need(self.scale_dtype in ("fp32", "fp8"), "scale_dtype", "must be 'fp32' or 'fp8'")
        need(self.scale_dtype == "fp8" or self.scale_fmt == "ue8m0", "scale_dtype",
             "'fp32' with scale_fmt=None means activation scales that are not powers of two, which dsv4 does not "
             "implement; use scale_dtype 'fp8' or scale_fmt 'ue8m0'")

    # ------------------------------------------------------------------ layer schedule
    def layer_ratio(self, layer_id: int) -> int:
        """Compress ratio of a block (`layer_id >= n_layers` are the MTP blocks)."""
        return self.compress_ratios[layer_id]

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.n_hash_layers

    @property
    def routed_expert_dtype(self) -> str:
        return self.expert_dtype or self.dtype

    # ------------------------------------------------------------------ dialects
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["compress_ratios"] = list(self.compress_ratios)
        return out

    def replace(self, **changes: Any) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | Path) -> ModelArgs:
        """From a config in either dialect (dict or path), told apart by its keys (`config_dialect`)."""
        if not isinstance(config, Mapping):
            config = json.loads(Path(config).read_text())
        if config_dialect(config) == "hf":
            return cls.from_hf_config(dict(config))
        return cls.from_dict(dict(config))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelArgs:
        """From the reference (`inference/config.json`) dialect; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown ModelArgs fields: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path) -> ModelArgs:
        """From a Hugging Face `config.json` (dict or path) of `model_type` deepseek_v4."""
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        if config.get("model_type", "deepseek_v4") != "deepseek_v4":
            raise ConfigError(f"model_type={config.get('model_type')!r}: expected 'deepseek_v4'")
        kwargs: dict[str, Any] = {}
        for hf_key, ref_key in _HF_TO_REF.items():
            if hf_key in config and config[hf_key] is not None:
                kwargs[ref_key] = config[hf_key]
        if config.get("num_key_value_heads", 1) != 1:
            raise ConfigError("num_key_value_heads must be 1 (shared-KV multi-query attention)")
        scaling = config.get("rope_scaling") or {}
        if scaling:
            kind = scaling.get("type", scaling.get("rope_type"))
            if kind != "yarn":
                raise ConfigError(f"rope_scaling.type={kind!r}: only 'yarn' is used by DeepSeek-V4")
            kwargs["rope_factor"] = scaling["factor"]
            kwargs["original_seq_len"] = scaling["original_max_position_embeddings"]
            kwargs["beta_fast"] = scaling.get("beta_fast", 32)
            kwargs["beta_slow"] = scaling.get("beta_slow", 1)
        quant = config.get("quantization_config")
        if quant:
            if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
                raise ConfigError(f"quantization_config={quant!r}: only block-scaled fp8 e4m3 is known")
            kwargs["dtype"] = "fp8"
            kwargs["scale_fmt"] = quant.get("scale_fmt")
            kwargs["expert_dtype"] = config.get("expert_dtype", quant.get("expert_dtype"))
        else:
            kwargs["dtype"] = "bf16"
            kwargs["scale_fmt"] = None
            kwargs["expert_dtype"] = config.get("expert_dtype")
        if "compress_ratios" not in kwargs:
            raise ConfigError("config.json has no compress_ratios (the per-layer CSA/HCA schedule)")
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dialect, as the official checkpoints ship it."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "max_position_embeddings": 1048576,
            "num_key_value_heads": 1,
            "norm_topk_prob": True,
            "tie_word_embeddings": False,
            "topk_method": "noaux_tc",
            "torch_dtype": "bfloat16",
            "use_cache": True,
        }
        for hf_key, ref_key in _HF_TO_REF.items():
            value = getattr(self, ref_key)
            out[hf_key] = list(value) if isinstance(value, tuple) else value
        out["rope_scaling"] = {
            "type": "yarn",
            "factor": self.rope_factor,
            "original_max_position_embeddings": self.original_seq_len,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
        }
        if self.dtype == "fp8":
            out["quantization_config"] = {
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "quant_method": "fp8",
                "scale_fmt": self.scale_fmt,
                "weight_block_size": [128, 128],
            }
        if self.expert_dtype is not None:
            out["expert_dtype"] = self.expert_dtype
        return out


# HF config.json key -> ModelArgs field (rope_scaling and quantization_config are handled apart)
_HF_TO_REF = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "moe_intermediate_size": "moe_inter_dim",
    "num_hidden_layers": "n_layers",
    "num_hash_layers": "n_hash_layers",
    "num_nextn_predict_layers": "n_mtp_layers",
    "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts",
    "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale",
    "swiglu_limit": "swiglu_limit",
    "q_lora_rank": "q_lora_rank",
    "head_dim": "head_dim",
    "qk_rope_head_dim": "rope_head_dim",
    "rms_norm_eps": "norm_eps",
    "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank",
    "sliding_window": "window_size",
    "compress_ratios": "compress_ratios",
    "compress_rope_theta": "compress_rope_theta",
    "rope_theta": "rope_theta",
    "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
}


# fields the HF dialect has no key for: only an inference config (or the default) sets them
INFERENCE_ONLY_FIELDS = ("max_batch_size", "max_seq_len", "scale_dtype")

# keys that only one dialect has. The keys both share (vocab_size, n_routed_experts, head_dim, compress_ratios, ...)
# say nothing, and neither does `dtype`: transformers >= 4.56 writes it into HF configs in place of torch_dtype.
_HF_KEYS = frozenset({hf for hf, ref in _HF_TO_REF.items() if hf != ref}) | {
    "model_type", "architectures", "rope_scaling", "quantization_config", "num_key_value_heads",
    "max_position_embeddings",
}
_INFERENCE_KEYS = frozenset(f.name for f in dataclasses.fields(ModelArgs)) - set(_HF_TO_REF) - {"expert_dtype", "dtype"}


def config_dialect(config: Mapping[str, Any]) -> str:
    """The dialect of a config, by the keys only one dialect has: "hf" (a Hugging Face `config.json`) or
    "inference" (the reference code's `inference/config.json`). A config in neither dialect, or mixing both, is
    a `ConfigError` naming the keys each one expects: reading it as either would fill the rest with defaults and
    fail far from the cause (an inference config read as HF: "compress_ratios needs 44 entries")."""
    hf = sorted(_HF_KEYS.intersection(config))
    ref = sorted(_INFERENCE_KEYS.intersection(config))
    if hf and not ref:
        return "hf"
    if ref and not hf:
        return "inference"
    expected = ("a Hugging Face config.json has keys such as hidden_size, num_hidden_layers, num_attention_heads, "
                "model_type; an inference config.json keys such as dim, n_layers, n_heads, moe_inter_dim")
    if hf:
        raise ConfigError(f"config mixes Hugging Face keys ({', '.join(hf)}) with inference keys ({', '.join(ref)}); "
                          f"{expected}")
    got = ", ".join(sorted(config)[:8]) + (", ..." if len(config) > 8 else "") if config else "none"
    raise ConfigError(f"config is in neither dialect (keys: {got}); {expected}")


# ---------------------------------------------------------------------- presets
def _flash() -> ModelArgs:
    return ModelArgs()


def _pro() -> ModelArgs:
    return ModelArgs(
        dim=7168, moe_inter_dim=3072, n_layers=61, n_heads=128, n_routed_experts=384, route_scale=2.5,
        q_lora_rank=1536, o_groups=16, index_topk=1024, compress_ratios=_pro_ratios(),
    )


def _tiny() -> ModelArgs:
    """Unit-test size. Every mechanism of the real schedule on sequences of a few dozen tokens:
    sliding-only, CSA (ratio 4, indexer with a top-k smaller than the entry count) and HCA (ratio
    8 here so that short sequences cross several boundaries), hash and learned MoE, an MTP block."""
    return ModelArgs(
        vocab_size=256, dim=64, moe_inter_dim=32, n_layers=5, n_hash_layers=2, n_mtp_layers=1, n_heads=4,
        n_routed_experts=8, n_activated_experts=2, route_scale=1.5, q_lora_rank=32, head_dim=32,
        rope_head_dim=8, o_groups=2, o_lora_rank=16, window_size=8, compress_ratios=(0, 4, 8, 4, 8, 0),
        index_n_heads=4, index_head_dim=16, index_topk=3, original_seq_len=64, max_seq_len=256,
    )


def _small() -> ModelArgs:
    """A few-M-parameter V4 that a 2-core CPU trains and runs comfortably, with the released ratios
    (CSA 4, HCA 128), window 128 and the official vocabulary size (so the official tokenizer fits)."""
    return ModelArgs(
        vocab_size=129280, dim=256, moe_inter_dim=128, n_layers=6, n_hash_layers=2, n_mtp_layers=1,
        n_heads=8, n_routed_experts=16, n_activated_experts=2, route_scale=1.5, q_lora_rank=128,
        head_dim=128, rope_head_dim=32, o_groups=2, o_lora_rank=128, window_size=128,
        compress_ratios=(0, 4, 128, 4, 128, 4, 0), index_n_heads=8, index_head_dim=64, index_topk=64,
        original_seq_len=4096, max_seq_len=16384,
    )


def _nano() -> ModelArgs:
    """The smallest V4 with every mechanism at the released context length (1,048,576 tokens): a
    sliding-only, a CSA (ratio 4, indexer) and an HCA (ratio 128) layer, hash and learned MoE, mHC,
    an MTP block; YaRN stretches the 65,536-token original context 16x like flash. A 1M prefill is
    dominated by the indexer, which scores every visible CSA entry: L^2/8 scores in all (1.4e11 at
    1M), so the index width is the minimum the rope dims allow (1 head x 16)."""
    return ModelArgs(
        vocab_size=256, dim=64, moe_inter_dim=32, n_layers=3, n_hash_layers=1, n_mtp_layers=1, n_heads=4,
        n_routed_experts=4, n_activated_experts=2, route_scale=1.5, q_lora_rank=32, head_dim=32,
        rope_head_dim=8, o_groups=2, o_lora_rank=16, window_size=128, compress_ratios=(0, 4, 128, 0),
        index_n_heads=1, index_head_dim=16, index_topk=16, original_seq_len=65536, rope_factor=16.0,
        max_seq_len=1048576,
    )


PRESETS = {"flash": _flash, "pro": _pro, "tiny": _tiny, "small": _small, "nano": _nano}


def preset(name: str) -> ModelArgs:
    """Named configuration: the released `flash` / `pro`, or the research sizes `nano` / `tiny` / `small`."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
