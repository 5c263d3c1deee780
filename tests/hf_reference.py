"""Build `transformers`' DeepSeek-V4 model with the same weights as a dsv4 model (test oracle).

The name mapping is written from both models' parameter lists; transformers packs each routed
expert's w1/w3 into one `gate_up_proj` row block and keeps all experts in 3-D tensors.
"""

from __future__ import annotations

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from dsv4.config import CSA_RATIO, ModelArgs
from dsv4.model import Transformer


def hf_config(args: ModelArgs) -> DeepseekV4Config:
    hca = sorted({r for r in args.compress_ratios[: args.n_layers] if r and r != CSA_RATIO}) or [128]
    if len(hca) > 1:
        raise ValueError("transformers supports one HCA ratio per model")
    return DeepseekV4Config(
        vocab_size=args.vocab_size, hidden_size=args.dim, moe_intermediate_size=args.moe_inter_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=1,
        head_dim=args.head_dim, q_lora_rank=args.q_lora_rank, qk_rope_head_dim=args.rope_head_dim,
        num_experts_per_tok=args.n_activated_experts, n_routed_experts=args.n_routed_experts,
        n_shared_experts=1, routed_scaling_factor=args.route_scale, scoring_func=args.score_func,
        rope_theta=args.rope_theta, compress_rope_theta=args.compress_rope_theta,
        layer_types=[_LAYER_TYPE[0 if r == 0 else CSA_RATIO if r == CSA_RATIO else -1]
                     for r in args.compress_ratios[: args.n_layers]],
        compress_rates={"compressed_sparse_attention": CSA_RATIO, "heavily_compressed_attention": hca[0]},
        num_hash_layers=args.n_hash_layers, swiglu_limit=args.swiglu_limit, sliding_window=args.window_size,
        o_groups=args.o_groups, o_lora_rank=args.o_lora_rank, index_n_heads=args.index_n_heads,
        index_head_dim=args.index_head_dim, index_topk=args.index_topk, hc_mult=args.hc_mult,
        hc_sinkhorn_iters=args.hc_sinkhorn_iters, hc_eps=args.hc_eps, rms_norm_eps=args.norm_eps,
        rope_parameters={"rope_type": "yarn", "factor": args.rope_factor,
                         "original_max_position_embeddings": args.original_seq_len,
                         "beta_fast": args.beta_fast, "beta_slow": args.beta_slow},
        max_position_embeddings=max(args.max_seq_len, args.original_seq_len * int(args.rope_factor)),
    )


_LAYER_TYPE = {0: "sliding_attention", CSA_RATIO: "compressed_sparse_attention", -1: "heavily_compressed_attention"}

_ATTN = {
    "wq_a.weight": "q_a_proj.weight", "q_norm.weight": "q_a_norm.weight", "wq_b.weight": "q_b_proj.weight",
    "wkv.weight": "kv_proj.weight", "kv_norm.weight": "kv_norm.weight", "wo_a.weight": "o_a_proj.weight",
    "wo_b.weight": "o_b_proj.weight", "attn_sink": "sinks",
    "compressor.wkv.weight": "compressor.kv_proj.weight", "compressor.wgate.weight": "compressor.gate_proj.weight",
    "compressor.ape": "compressor.position_bias", "compressor.norm.weight": "compressor.kv_norm.weight",
    "indexer.wq_b.weight": "compressor.indexer.q_b_proj.weight",
    "indexer.weights_proj.weight": "compressor.indexer.scorer.weights_proj.weight",
    "indexer.compressor.wkv.weight": "compressor.indexer.kv_proj.weight",
    "indexer.compressor.wgate.weight": "compressor.indexer.gate_proj.weight",
    "indexer.compressor.ape": "compressor.indexer.position_bias",
    "indexer.compressor.norm.weight": "compressor.indexer.kv_norm.weight",
}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid", "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_TOP = {
    "embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight", "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """dsv4 state dict (main model, no MTP) -> transformers names and layouts."""
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, hf_name in _TOP.items():
        out[hf_name] = ours[name]
    args = model.args
    for i in range(args.n_layers):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        for name, hf_name in _BLOCK.items():
            if p + name in ours:
                out[hp + hf_name] = ours[p + name]
        for name, hf_name in _ATTN.items():
            if p + "attn." + name in ours:
                out[hp + "self_attn." + hf_name] = ours[p + "attn." + name]
        experts = range(args.n_routed_experts)
        out[hp + "mlp.experts.gate_up_proj"] = torch.stack([
            torch.cat((ours[f"{p}ffn.experts.{e}.w1.weight"], ours[f"{p}ffn.experts.{e}.w3.weight"])) for e in experts
        ])
        out[hp + "mlp.experts.down_proj"] = torch.stack([ours[f"{p}ffn.experts.{e}.w2.weight"] for e in experts])
    return out


def hf_twin(model: Transformer) -> DeepseekV4ForCausalLM:
    """A transformers model (fp32, eager, eval) holding exactly `model`'s main weights."""
    hf = DeepseekV4ForCausalLM(hf_config(model.args)).to(torch.float32).eval()
    state = to_hf_state_dict(model)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # rotary inv_freq buffers are derived, not weights
    missing = [k for k in missing if "inv_freq" not in k]
    if missing or unexpected:
        raise AssertionError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf
