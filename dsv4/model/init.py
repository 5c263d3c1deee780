"""Random initialisation for training from scratch and for random-weight tests.

Choices follow spec/training.md §2.4 for mHC (nearly static start: scales 0.01, fn ~ N(0, 0.02),
soft one-hot `pre` bias, `post` bias 0 so post = 1, identity-dominated `comb` bias) and keep
activations O(1) elsewhere (linear weights ~ N(0, 1/in_features)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import Embedding, Linear
from .moe import Gate
from .transformer import Block, Transformer


@torch.no_grad()
def init_weights(model: Transformer, seed: int = 0) -> Transformer:
    """Fill every parameter and buffer deterministically from `seed` (on the model's device)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    args = model.args
    hc = args.hc_mult

    def normal_(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std)

    for name, module in model.named_modules():
        if isinstance(module, Linear):
            if module.weight.is_floating_point() and module.weight.element_size() >= 2:
                normal_(module.weight, 1.0 / math.sqrt(module.in_features))
        elif isinstance(module, Embedding):
            normal_(module.weight, 1.0)
        elif isinstance(module, Gate):
            normal_(module.weight, 1.0 / math.sqrt(args.dim))
            if module.hash:
                # each token gets k distinct experts
                ranks = torch.rand(args.vocab_size, args.n_routed_experts, generator=gen).argsort(dim=-1)
                module.tid2eid.copy_(ranks[:, : args.n_activated_experts])
        elif isinstance(module, nn.Module) and name.endswith("norm"):
            if hasattr(module, "weight"):
                module.weight.fill_(1.0)
        if isinstance(module, Block):
            for site_index, site in enumerate(("attn", "ffn")):
                normal_(getattr(module, f"hc_{site}_fn"), 0.02)
                getattr(module, f"hc_{site}_scale").fill_(0.01)
                base = torch.zeros((2 + hc) * hc)
                base[(2 * module.layer_id + site_index) % hc] = 2.0  # soft one-hot read-out
                # comb starts near the identity: logits 4*I through Sinkhorn (mhc), or I itself when unconstrained
                base[2 * hc:] = ((1.0 if model.hc_mode == "hc" else 4.0) * torch.eye(hc)).flatten()
                getattr(module, f"hc_{site}_base").copy_(base)
    for holder in [model, *model.mtp]:
        normal_(holder.hc_head_fn, 0.02)
        holder.hc_head_scale.fill_(0.01)
        holder.hc_head_base.zero_()
    for name, param in model.named_parameters():
        if name.endswith(("attn_sink", "ape")):
            param.zero_()
    return model
