"""Precision recipes for training: exact FP8 / FP4 fake quantisation with straight-through gradients.

DeepSeek-V4 trains with the V3 FP8 recipe (E4M3 everywhere, activations in 1x128 per-token tiles, weights
in 128x128 tiles) and adds FP4 quantisation-aware training of the routed experts late in training
(training.md §3.1-3.4). On CPU both are simulated exactly: each quantiser maps a float tensor onto the
values the official checkpoint / kernels can hold, the matmul runs in fp32 on those values (V3's promoted
fp32 accumulation), and the backward passes the gradient straight through (STE, identity) to the fp32
master weights - "gradients are taken w.r.t. the same FP8 weights and passed straight to the FP32
master" (§3.2). No clipping convention applies: every scale is derived from the block's own amax, so no
element is ever outside the clamp range and the clipped-STE mask would be all ones.

The quantisers *are* the checkpoint codecs, run as ops of the kernel seam (`dsv4.kernels`: `fp8_simulate`,
`fp8_weight_simulate`, `fp4_weight_simulate`, and `linear` for the matmul), so a fast backend accelerates QAT
too; nothing here rounds on its own:

* ``fp8_act_fake_quant``: ``act_quant`` (1x128 per token, amax floored at 1e-4, scale
  ``2**ceil(log2(amax/448))``, e4m3 round-to-nearest-even) multiplied straight back.
* ``fp8_weight_fake_quant``: ``dequantize_fp8_weight(quantize_fp8_weight(w))`` - 128x128 tiles, ue8m0
  scales, the canonical form the saver writes.
* ``fp4_weight_fake_quant``: the rounding chain of §3.2/§3.4, ``W -> MXFP4 (1x32, e2m1 + ue8m0,
  quantize_fp4_weight) -> FP8 e4m3 with 128x128 ue8m0 scales (fp4_to_fp8_weight, the official lossless
  re-encoding with S_new = max tile scale / 2**6) -> dequantised``. The second step is what the V4 FP8
  training framework does with the FP4 weight; it is exact - i.e. the chain equals the plain MXFP4 round
  trip, which is also what the official FP4 inference GEMM computes (its e2m1 -> e4m3 cast is exact) -
  unless the 1x32 scales inside one 128x128 tile span more than 2**14, where the smallest values fall
  below e4m3's subnormals and round. The report says DeepSeek checked their weights never do; here the
  chain keeps that rounding (it is what the FP8 GEMM would see) and ``export_quantized`` refuses to write
  such a weight instead of silently exporting different values. ``fp8_step=False`` gives the plain MXFP4
  round trip.

``apply_precision(model, recipe)`` installs a recipe on a built model from outside (the model never
imports the trainer) by giving each affected ``Linear`` an instance-level ``forward``. That was chosen over
``torch.nn.utils.parametrize`` because (1) parametrisations rename the weight to
``parametrizations.weight.original``, which would break the official checkpoint names ``save_model``
and the optimiser grouping rely on, and (2) the activation quantiser needs the module's input, which a
weight parametrisation never sees. ``remove_precision`` deletes the instance attribute, so the class's
own ``forward`` is back, bit for bit.

Export: the fake-quantised weights are the canonical quantisers' dequantised values, and a quantiser
applied to its own output returns the same codes, so ``save_model`` - which quantises float weights with
the same canonical rules - writes exactly the weights the QAT model computed with. ``export_quantized``
checks that per weight (format the recipe simulated == format the layout stores, values equal bit for bit)
and then calls ``save_model``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import kernels
from ..checkpoint.saver import save_model
from ..checkpoint.schema import expected_tensors
from ..model.layers import Linear
from ..quant import FP8_BLOCK, dequantize_fp4_weight, dequantize_fp8_weight, quantize_fp4_weight, quantize_fp8_weight

RECIPES = ("fp32", "bf16", "fp8", "fp8+fp4", "fp8-torchao")

__all__ = [
    "RECIPES",
    "apply_precision",
    "export_quantized",
    "fp4_weight_fake_quant",
    "fp8_act_fake_quant",
    "fp8_weight_fake_quant",
    "bf16_fake_quant",
    "precision_of",
    "remove_precision",
]


# ---------------------------------------------------------------------------------------------- quantisers


class _StraightThrough(torch.autograd.Function):
    """Forward: ``quantize(x)``; backward: the incoming gradient unchanged (STE).

    A custom Function rather than ``x + (q - x).detach()``: that expression is not bit-exact in floating
    point (x + (q - x) can differ from q by an ulp), and the forward must equal the codec exactly."""

    @staticmethod
    def forward(ctx, x: Tensor, quantize: Callable[[Tensor], Tensor]) -> Tensor:
        return quantize(x.detach())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _fp8_act(x: Tensor) -> Tensor:
    return kernels.fp8_simulate(x, FP8_BLOCK)  # act_quant's 1x128 rule multiplied back, in x.dtype


def _bf16(x: Tensor) -> Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


def fp8_act_fake_quant(x: Tensor) -> Tensor:
    """Activations [..., K] through FP8 as the official ``act_quant`` stores them (1x128 per token,
    amax floor 1e-4, power-of-two scale, e4m3 RNE) and back, in x.dtype; gradient straight through."""
    return _StraightThrough.apply(x, _fp8_act)


def fp8_weight_fake_quant(w: Tensor) -> Tensor:
    """A [out, in] weight through the checkpoint's FP8 format (e4m3, 128x128 ue8m0 tiles, canonical) and
    back, in w.dtype; gradient straight through."""
    return _StraightThrough.apply(w, kernels.fp8_weight_simulate)


def fp4_weight_fake_quant(w: Tensor, fp8_step: bool = True) -> Tensor:
    """A routed-expert [out, in] weight through MXFP4 (1x32 along the input dim, e2m1 + ue8m0, canonical)
    and, with ``fp8_step``, on through the lossless-by-design FP4 -> FP8 128x128 re-encoding the V4
    training framework multiplies with (see the module docstring); in w.dtype, gradient straight through."""
    return _StraightThrough.apply(w, lambda t: kernels.fp4_weight_simulate(t, fp8_step))


def bf16_fake_quant(x: Tensor) -> Tensor:
    """Round to bf16 and back to x.dtype (a bf16 GEMM operand); gradient straight through."""
    return _StraightThrough.apply(x, _bf16)


# ---------------------------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class _Precision:
    """What one Linear's forward does under a recipe: ``kind`` is fp8 / fp4 / bf16 / fp8-torchao."""

    kind: str
    act: Callable[[Tensor], Tensor] | None = None
    weight: Callable[[Tensor], Tensor] | None = None
    torchao: nn.Module | None = None  # kept out of the module tree, so state_dict is unchanged


def _fake_quant_forward(self: Linear, x: Tensor) -> Tensor:
    """Linear forward under a fake-quant recipe: quantised operands, fp32 matmul, output in x.dtype."""
    p: _Precision = self._dsv4_precision
    xq = p.act(x) if p.act is not None else x
    wq = p.weight(self.weight) if p.weight is not None else self.weight
    return kernels.linear(xq.float(), wq.float()).to(x.dtype)


def _torchao_forward(self: Linear, x: Tensor) -> Tensor:
    return self._dsv4_precision.torchao(x.to(self.weight.dtype)).to(x.dtype)


def _torchao_float8(targets: dict[str, Linear]) -> dict[str, nn.Module]:
    """torchao Float8Linear modules sharing each target's weight Parameter (GPU only; see apply_precision)."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise RuntimeError("recipe 'fp8-torchao' needs torchao (pip install torchao); use 'fp8' for the exact "
                           "CPU simulation") from e
    if not torch.cuda.is_available():
        raise RuntimeError("recipe 'fp8-torchao' needs a CUDA device; use 'fp8' for the exact CPU simulation")
    if torch.cuda.get_device_capability() < (8, 9):
        raise RuntimeError(f"recipe 'fp8-torchao' needs FP8 tensor cores (compute capability >= 8.9), this GPU "
                           f"has {torch.cuda.get_device_capability()}")
    config = Float8LinearConfig.from_recipe_name("rowwise")
    out = {}
    for name, module in targets.items():
        if not module.weight.is_cuda:
            raise RuntimeError(f"recipe 'fp8-torchao': {name}.weight is on {module.weight.device}; move the "
                               "model to the GPU first")
        # torchao swaps nn.Linear children; a shadow nn.Linear holding our Parameter gets swapped, and
        # Float8Linear.from_float keeps that same Parameter, so the optimiser and state_dict see no change.
        shadow = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        shadow.weight = module.weight
        holder = convert_to_float8_training(nn.ModuleDict({"linear": shadow}), config=config)
        out[name] = holder["linear"]
    return out


def remove_precision(model: nn.Module) -> nn.Module:
    """Undo ``apply_precision``: every Linear gets its class's own forward back (weights untouched)."""
    for module in model.modules():
        if "_dsv4_precision" in module.__dict__:
            del module.forward
            del module._dsv4_precision
    return model


def precision_of(model: nn.Module) -> dict[str, str]:
    """{module name: kind} of the Linears a recipe currently changes (empty for plain fp32)."""
    return {name: m._dsv4_precision.kind for name, m in model.named_modules() if "_dsv4_precision" in m.__dict__}


def apply_precision(model: nn.Module, recipe: str) -> dict[str, str]:
    """Install `recipe` on every `Linear` of `model` (replacing any recipe already there); returns
    ``precision_of(model)``.

    * ``fp32``: nothing (plain fp32 math).
    * ``bf16``: every Linear's input and weight rounded to bf16, fp32 accumulation - a bf16 GEMM.
    * ``fp8``: the V3 recipe on every Linear the official checkpoint stores as FP8 or FP4 (FP8 1x128
      activations, FP8 128x128 weights); the ones it keeps in bf16 (``wo_a`` after convert, compressor
      and indexer ``weights_proj`` projections, the head) stay as they are, as do the gate, norms and
      embedding, which are not Linears.
    * ``fp8+fp4``: as ``fp8``, but the routed experts (``official_format == "fp4"``) use the FP4 QAT
      weight chain (MXFP4 -> FP8) with FP8 activations - what the FP4 GEMM of the release computes.
    * ``fp8-torchao``: real FP8 GEMMs on the GPU through torchao's float8 training (rowwise scaling -
      not DeepSeek's 128x128 blocks, which torchao only has as a Hopper-only prototype) on the same
      Linears as ``fp8``. Needs torchao, CUDA and compute capability >= 8.9, and raises otherwise; Linears
      whose dims are not multiples of 16 (a torchao requirement) are left out and absent from the result.
      Untested here (no GPU, torchao not installed).

    Master weights stay whatever dtype the model holds (fp32 for training); only the forward changes.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown precision recipe {recipe!r}; choose from {RECIPES}")
    remove_precision(model)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    for name, module in linears.items():
        if not module.weight.is_floating_point() or module.weight.element_size() < 2:
            raise ValueError(f"apply_precision trains float master weights; {name}.weight is "
                             f"{module.weight.dtype} (load the checkpoint with numerics='plain')")
    plans: dict[str, _Precision] = {}
    quantised = {n: m for n, m in linears.items() if m.official_format in ("fp8", "fp4")}
    if recipe == "bf16":
        plans = {n: _Precision("bf16", bf16_fake_quant, bf16_fake_quant) for n in linears}
    elif recipe in ("fp8", "fp8+fp4"):
        for name, module in quantised.items():
            if recipe == "fp8+fp4" and module.official_format == "fp4":
                plans[name] = _Precision("fp4", fp8_act_fake_quant, fp4_weight_fake_quant)
            else:
                plans[name] = _Precision("fp8", fp8_act_fake_quant, fp8_weight_fake_quant)
    elif recipe == "fp8-torchao":
        eligible = {n: m for n, m in quantised.items() if m.in_features % 16 == 0 and m.out_features % 16 == 0}
        plans = {n: _Precision("fp8-torchao", torchao=t) for n, t in _torchao_float8(eligible).items()}
    for name, plan in plans.items():
        module = linears[name]
        module._dsv4_precision = plan
        forward = _torchao_forward if plan.torchao is not None else _fake_quant_forward
        module.forward = types.MethodType(forward, module)
    return precision_of(model)


# ---------------------------------------------------------------------------------------------- export


def _stored_value(weight: Tensor, fmt: str) -> Tensor:
    """fp32 value the checkpoint will hold for a float weight stored as `fmt` (what save_model writes)."""
    w = weight.detach().float()
    if fmt == "fp8":
        return dequantize_fp8_weight(*quantize_fp8_weight(w))
    if fmt == "fp4":
        return dequantize_fp4_weight(*quantize_fp4_weight(w))
    return w.to(torch.bfloat16).float()


@torch.no_grad()
def export_quantized(model: nn.Module, path: str | Path, *, layout: str = "converted",
                     shards: int | None = None) -> Path:
    """Save a model trained under a fake-quant recipe in the official checkpoint format, losslessly.

    For every Linear carrying an ``fp8`` or ``fp4`` recipe the weight the checkpoint will store
    (dequantised) must equal the fake-quantised weight the model computed with, bit for bit; otherwise a
    ValueError lists the offenders (an FP8-trained weight the layout stores as FP4 or bf16, or an FP4
    weight whose 1x32 scales span more than 2**14 inside a 128x128 tile, where the FP8 step rounded).
    Then ``save_model`` writes it. The default layout is ``converted`` (what dsv4 runs from): there
    ``wo_a``, which the recipes leave in bf16 as the official inference does, is stored bf16, while the
    ``hf`` download layout re-quantises it to FP8. Tensors stored as BF16 (norms, gate, embedding, head,
    compressor projections, ``wo_a``) are rounded to bf16 by the save, as for any bf16 checkpoint;
    that rounding is not part of the recipes.
    """
    specs = expected_tensors(model.args, layout)
    problems = []
    for name, module in model.named_modules():
        plan = module.__dict__.get("_dsv4_precision")
        if plan is None or plan.kind not in ("fp8", "fp4"):
            continue
        spec = specs[f"{name}.weight"]
        stored_fmt = spec.fmt if spec.fmt in ("fp8", "fp4") else "bf16"
        if stored_fmt != plan.kind:
            problems.append(f"{name}: trained with {plan.kind} weights, the {layout} layout stores {stored_fmt}")
            continue
        trained = plan.weight(module.weight).float()
        stored = _stored_value(module.weight, stored_fmt)
        if not torch.equal(trained, stored):
            bad = int((trained != stored).sum())
            problems.append(f"{name}: {bad} weights differ after export (FP4 scales spanning > 2**14 in a "
                            "128x128 tile make the FP8 step round)")
    if problems:
        raise ValueError("export would not reproduce the trained weights:\n  " + "\n  ".join(problems))
    return save_model(model, path, layout=layout, shards=shards)
