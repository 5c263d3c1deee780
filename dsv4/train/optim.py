"""Parameter routing for a dsv4 `Transformer`: V4's Muon for matrices, AdamW for the rest.

Routing (V4 report §2.4 "Basic Configurations", training.md §1.3), decided per parameter from the
module that owns it and its local name, so it survives FSDP2 / tensor-parallel wrapping (which keep
the module classes) and any prefix (`_orig_mod.` etc.):

  AdamW  `embed.weight`                     the embedding (named by V4)
         `head.weight`                      the prediction head (named by V4; the MTP block shares it)
         RMSNorm `.weight`                  all RMSNorm gains (named by V4)
         `hc_*_base`, `hc_*_scale`          mHC static biases S/b and gating factors α (named by V4)
         `attn.attn_sink`                   per-head sink logits: vectors, not matrices (our reading)
         `compressor.ape`                   the compressor's learned position bias [ratio, c]: 2-D but a
                                            lookup table indexed by position (an embedding, B^a/B^b of the
                                            report), not a linear map — AdamW like the embedding (our call)
  Muon   every `Linear.weight` but the head  attention / compressor / indexer projections, experts
         `ffn.gate.weight`                  the MoE router ("all other modules use Muon")
         `hc_*_fn`                          mHC dynamic projections W^{pre,post,res}
  never  buffers (`gate.bias`, `tid2eid`, `freqs`, `scale`): not parameters, never optimised

A parameter no rule covers is an error naming it: a new parameter must be routed on purpose.

Logical matrices (training.md §1.3: "per expert ... treat fused tensors as their separate logical
matrices"). With `split_fused=True` (default) these stored tensors are orthogonalised per row block:
  `attn.wo_a`            [n_groups·o_lora_rank, in]: n_groups matrices, each applied to its own group
                         of heads (Attention's grouped einsum) — the V4 grouped output projection;
  `hc_*_fn` (blocks)     [(2+h)·h, h·d] = [W_pre (h); W_post (h); W_res (h·h)] — the mHC paper's three
                         projections, each with its own α and nonlinearity (`hc_head_fn` is W_pre only);
  overlapping (CSA) `compressor.wkv` / `.wgate`  [2c, d] = the report's W^{aKV}; W^{bKV} (W^{aZ}; W^{bZ}),
                         applied to the previous and the current block.
Each expert is its own `Linear`, so per-expert orthogonalisation needs no split.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..model.attention import Attention
from ..model.compressor import Compressor
from ..model.layers import Embedding, Linear, RMSNorm
from ..model.moe import Gate
from .muon import V4_NS_SCHEDULE, Muon

MUON, ADAMW = "muon", "adamw"
_HC_FN = re.compile(r"hc_(\w+)_fn")
_HC_STATIC = re.compile(r"hc_\w+_(base|scale)")


class RoutingError(ValueError):
    """A parameter matches no routing rule (or matches one that cannot apply to its shape)."""


@dataclass(frozen=True)
class Route:
    name: str
    param: nn.Parameter
    optimizer: str  # MUON or ADAMW
    rule: str  # why, in words
    row_blocks: tuple[int, ...] | None = None  # Muon logical row blocks (None: one matrix)


def _rule(module: nn.Module, local: str, qualified: str, hc_mult: int | None, split: bool
          ) -> tuple[str, str, tuple[int, ...] | None] | None:
    """(optimizer, rule, row_blocks) for parameter `local` of `module` (qualified module name `qualified`)."""
    last = qualified.rsplit(".", 1)[-1]
    if isinstance(module, RMSNorm) and local == "weight":
        return ADAMW, "RMSNorm gain", None
    if isinstance(module, Embedding) and local == "weight":
        return ADAMW, "embedding", None
    if isinstance(module, Linear) and local == "weight":
        if last == "head":
            return ADAMW, "prediction head", None
        return MUON, "linear projection", None
    if isinstance(module, Gate) and local == "weight":
        return MUON, "MoE router", None
    if isinstance(module, Attention) and local == "attn_sink":
        return ADAMW, "attention sink logits", None
    if isinstance(module, Compressor) and local == "ape":
        return ADAMW, "compressor position bias", None
    if _HC_STATIC.fullmatch(local):
        return ADAMW, "mHC static bias / gating factor", None
    if m := _HC_FN.fullmatch(local):
        if not split or hc_mult is None or m.group(1) == "head":
            return MUON, "mHC dynamic projection", None
        return MUON, "mHC dynamic projections W_pre; W_post; W_res", (hc_mult, hc_mult, hc_mult * hc_mult)
    return None


def _linear_blocks(parent: nn.Module | None, attr: str, weight: Tensor) -> tuple[tuple[int, ...], str] | None:
    """Row blocks of a fused Linear weight and why (see the module docstring), from its owner's
    attributes (these follow tensor-parallel slicing, which updates `Attention.n_groups`)."""
    if isinstance(parent, Attention) and attr == "wo_a":
        blocks, why = (parent.o_lora_rank,) * parent.n_groups, "grouped output projection, one matrix per group"
    elif isinstance(parent, Compressor) and attr in ("wkv", "wgate") and parent.overlap:
        blocks, why = (parent.head_dim, parent.head_dim), "overlapping compressor projection, a; b"
    else:
        return None
    if sum(blocks) != weight.shape[0]:
        raise RoutingError(f"{attr}.weight has {weight.shape[0]} rows, expected {sum(blocks)} for blocks {blocks}")
    return (blocks, why) if len(blocks) > 1 else None


def route_parameters(model: nn.Module, *, split_fused: bool = True) -> list[Route]:
    """Every trainable parameter of `model` with its optimizer, in `named_parameters` order.

    Raises RoutingError naming every parameter no rule covers. Frozen parameters
    (requires_grad=False) are left out: nothing updates them.
    """
    args = getattr(model, "args", None)
    hc_mult = getattr(args, "hc_mult", None)
    modules = dict(model.named_modules())
    found: dict[int, Route] = {}
    unrouted = []
    for qualified, module in modules.items():
        parent_name, _, attr = qualified.rpartition(".")
        parent = modules.get(parent_name) if qualified else None
        for local, param in module.named_parameters(recurse=False):
            name = f"{qualified}.{local}" if qualified else local
            if id(param) in found or not param.requires_grad:
                continue  # shared (tied) parameters are routed once
            rule = _rule(module, local, qualified, hc_mult, split_fused)
            if rule is None:
                unrouted.append(f"{name} {tuple(param.shape)} in {type(module).__name__}")
                continue
            optimizer, why, blocks = rule
            if optimizer == MUON and isinstance(module, Linear) and split_fused:
                fused = _linear_blocks(parent, attr, param)
                if fused is not None:
                    blocks, why = fused
            if optimizer == MUON and param.ndim < 2:
                raise RoutingError(f"{name} {tuple(param.shape)}: rule {why!r} sends it to Muon but it is not a matrix")
            if blocks is not None and sum(blocks) != param.shape[-2]:
                raise RoutingError(f"{name} {tuple(param.shape)}: row blocks {blocks} do not fit")
            found[id(param)] = Route(name, param, optimizer, why, blocks)
    if unrouted:
        raise RoutingError("no optimizer rule for: " + "; ".join(unrouted))
    order = {id(p): i for i, p in enumerate(model.parameters())}
    return sorted(found.values(), key=lambda r: order[id(r.param)])


def param_groups(model: nn.Module, *, split_fused: bool = True, weight_decay: float = 0.1,
                 vector_weight_decay: float | None = None) -> tuple[list[dict], list[dict]]:
    """(Muon groups, AdamW groups) as torch param-group dicts with named params.

    Muon groups are one per row-block layout (`row_blocks` is a group option). AdamW has a "matrix"
    group (embedding, head, `ape`) and a "vector" group (norms, mHC base/scale, sinks), both with
    V4's wd 0.1 unless `vector_weight_decay` is given (HC-style "no decay on the static parts"
    is then one argument away; V4 states a single wd).
    """
    muon: dict[tuple[int, ...] | None, list] = {}
    adamw: dict[str, list] = {"matrix": [], "vector": []}
    for r in route_parameters(model, split_fused=split_fused):
        if r.optimizer == MUON:
            muon.setdefault(r.row_blocks, []).append((r.name, r.param))
        else:
            adamw["matrix" if r.param.ndim >= 2 else "vector"].append((r.name, r.param))
    muon_groups = [{"params": ps, "row_blocks": blocks, "weight_decay": weight_decay}
                   for blocks, ps in muon.items()]
    vector_wd = weight_decay if vector_weight_decay is None else vector_weight_decay
    adamw_groups = [{"params": ps, "kind": kind, "weight_decay": weight_decay if kind == "matrix" else vector_wd}
                    for kind, ps in adamw.items() if ps]
    return muon_groups, adamw_groups


class Optimizers:
    """Muon and AdamW stepped together: what a trainer and an atomic checkpoint need
    (`step`, `zero_grad`, `state_dict`, `load_state_dict`, `set_lr`, `param_groups`)."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW) -> None:
        self.muon = muon
        self.adamw = adamw

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        return self.muon, self.adamw

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr(self, lr: float) -> None:
        """One learning rate for both (V4: γ makes Muon's update RMS match AdamW's)."""
        for group in self.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def build_optimizers(model: nn.Module, lr: float, *, weight_decay: float = 0.1,
                     vector_weight_decay: float | None = None, momentum: float = 0.95, rms_scale: float = 0.18,
                     betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-20,
                     ns_dtype: torch.dtype = torch.float32, split_fused: bool = True,
                     ns_schedule: Iterable[tuple[float, float, float]] = V4_NS_SCHEDULE) -> Optimizers:
    """V4's optimizer pair for `model` with V4's values as defaults (training.md §1.3, §8):
    Muon μ 0.95 Nesterov, γ 0.18, wd 0.1, hybrid 8+2 NS; AdamW β (0.9, 0.95), ε 1e-20, wd 0.1.

    ε 1e-20 is V4's (effectively none, still representable in fp32 and bf16); an entry whose gradient
    has always been zero still gets a zero update (0 / (0 + ε) = 0). `ns_dtype=torch.bfloat16` on GPUs.
    """
    muon_groups, adamw_groups = param_groups(model, split_fused=split_fused, weight_decay=weight_decay,
                                             vector_weight_decay=vector_weight_decay)
    muon = Muon(muon_groups, lr=lr, momentum=momentum, weight_decay=weight_decay, rms_scale=rms_scale,
                ns_dtype=ns_dtype, ns_schedule=tuple(ns_schedule))
    adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return Optimizers(muon, adamw)
