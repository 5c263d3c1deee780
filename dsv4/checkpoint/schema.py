"""What an official DeepSeek-V4 checkpoint contains, derived from its config alone (spec §5.1-5.2).

`expected_tensors(args)` enumerates every tensor of the Hugging Face release layout - key, shape,
safetensors dtype and the component it belongs to - without touching a file. The loader validates
downloads against it, the random-checkpoint maker writes it, `dsv4 inspect` summarises it, and the
converter derives the model-parallel layout from it. For the released Flash config it yields the
69,187 tensors of the real index (BF16 433, F32 417, F8_E4M3 375, F8_E8M0 34,167, I8 33,792, I64 3).

Layouts:
* ``"hf"``: the download. FP8 linears (e4m3 + 128x128 ue8m0 `.scale`), FP4 routed experts as I8
  `[out, in/2]` (two e2m1 codes per byte) + 1x32 `.scale`, `wo_a` still FP8.
* ``"converted"``: what the official `convert.py` writes (spec §5.3; dsv4 runs from it and writes it
  per rank): `wo_a` dequantised to BF16 without a scale, and the FP4 expert weights re-viewed as
  `torch.float4_e2m1fn_x2`, which safetensors stores as dtype "F4" with the *logical* shape `[out, in]`
  in the header - the same bytes as the download's I8 `[out, in/2]` (their scales are unchanged).
  With FP8 experts (``--expert-dtype fp8``) there is no F4 tensor.
* ``"plain"``: every linear a float weight without scale (`dsv4 convert --to bf16|fp32`); the
  BF16 entries become F32 in an fp32 export, F32 entries stay F32 in a bf16 export.

A spec's `shape` is the one the safetensors header holds. For F4 that is the logical shape, while the
torch tensor (`float4_e2m1fn_x2`, one byte per element pair) has `torch_shape`, the last dim halved;
`nbytes` and `parameters` account for it (an F4 element is half a byte and one parameter, an I8 byte of
packed FP4 is two parameters).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import torch

from ..config import CSA_RATIO, ModelArgs

FP8_TILE = 128
FP4_GROUP = 32

# safetensors dtype names <-> torch dtypes (packed FP4 travels as I8 in the release, as F4 after convert.py)
DTYPES: dict[str, torch.dtype] = {
    "F4": torch.float4_e2m1fn_x2,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# bits per element as the header counts elements (F4: half a byte per logical element)
DTYPE_BITS = {"F4": 4, "F8_E4M3": 8, "F8_E8M0": 8, "BF16": 16, "F16": 16, "F32": 32, "F64": 64, "I8": 8, "U8": 8,
              "I32": 32, "I64": 64}
DTYPE_BYTES = {k: v // 8 for k, v in DTYPE_BITS.items() if v >= 8}  # whole-byte dtypes only (not F4)
PACKED_FP4 = ("I8", "U8")  # how the release stores FP4 weights: two e2m1 codes per byte, shape [out, in/2]
LAYOUTS = ("hf", "converted", "plain")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    component: str  # embed, head, attention, compressor, indexer, gate, routed_experts, shared_expert, mhc, norm
    block: str  # "top", "layers.{i}" or "mtp.{j}"
    fmt: str = "plain"  # fp8 / fp4 weight or their scale, else plain

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """Shape of the torch tensor holding it: for F4 (float4_e2m1fn_x2, two per byte) the last dim halved."""
        if self.dtype == "F4":
            return (*self.shape[:-1], self.shape[-1] // 2)
        return self.shape

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BITS[self.dtype] // 8

    @property
    def parameters(self) -> int:
        """Weight elements as the release counts them: packed FP4 bytes (I8) hold two, an F4 element (whose
        shape is already the logical one) one; scales and tables none."""
        if self.name.endswith((".scale", "tid2eid")):
            return 0
        return self.numel * (2 if self.fmt == "fp4" and self.dtype in PACKED_FP4 else 1)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class _Builder:
    def __init__(self, args: ModelArgs, layout: str) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
        self.args, self.layout = args, layout
        if layout == "plain":  # every linear stored as a float weight
            self.args = args.replace(dtype="bf16", expert_dtype="bf16", scale_fmt=None)
        self.specs: list[TensorSpec] = []
        self.block = "top"

    def plain(self, name: str, shape: tuple[int, ...], dtype: str, component: str) -> None:
        self.specs.append(TensorSpec(name, tuple(shape), dtype, component, self.block))

    def linear(self, name: str, out_f: int, in_f: int, fmt: str, component: str) -> None:
        """A Linear `name` ([out, in] weight + scale when quantised); fmt is fp8 / fp4 / bf16."""
        if fmt == "fp8":
            self.specs.append(TensorSpec(f"{name}.weight", (out_f, in_f), "F8_E4M3", component, self.block, "fp8"))
            self.specs.append(TensorSpec(f"{name}.scale", (_ceil(out_f, FP8_TILE), _ceil(in_f, FP8_TILE)),
                                         "F8_E8M0", component, self.block, "fp8"))
        elif fmt == "fp4":
            if in_f % FP4_GROUP:
                raise ValueError(f"{name}: FP4 weights need in_features divisible by {FP4_GROUP}, got {in_f}")
            if self.layout == "converted":  # convert.py: the I8 bytes viewed as float4_e2m1fn_x2 ("F4")
                weight = TensorSpec(f"{name}.weight", (out_f, in_f), "F4", component, self.block, "fp4")
            else:
                weight = TensorSpec(f"{name}.weight", (out_f, in_f // 2), "I8", component, self.block, "fp4")
            self.specs.append(weight)
            self.specs.append(TensorSpec(f"{name}.scale", (out_f, in_f // FP4_GROUP), "F8_E8M0", component,
                                         self.block, "fp4"))
        elif fmt == "bf16":
            self.plain(f"{name}.weight", (out_f, in_f), "BF16", component)
        else:
            raise ValueError(f"unknown weight format {fmt!r}")

    # ---------------------------------------------------------------- pieces
    def compressor(self, prefix: str, head_dim: int, ratio: int, component: str) -> None:
        a = self.args
        coff = 2 if ratio == CSA_RATIO else 1
        self.plain(f"{prefix}.ape", (ratio, coff * head_dim), "F32", component)
        self.linear(f"{prefix}.wkv", coff * head_dim, a.dim, "bf16", component)
        self.linear(f"{prefix}.wgate", coff * head_dim, a.dim, "bf16", component)
        self.plain(f"{prefix}.norm.weight", (head_dim,), "BF16", component)

    def attention(self, p: str, ratio: int) -> None:
        a = self.args
        dense = a.dtype  # fp8 or bf16 storage of the non-expert linears
        self.plain(f"{p}.attn_sink", (a.n_heads,), "F32", "attention")
        self.linear(f"{p}.wq_a", a.q_lora_rank, a.dim, dense, "attention")
        self.plain(f"{p}.q_norm.weight", (a.q_lora_rank,), "BF16", "attention")
        self.linear(f"{p}.wq_b", a.n_heads * a.head_dim, a.q_lora_rank, dense, "attention")
        self.linear(f"{p}.wkv", a.head_dim, a.dim, dense, "attention")
        self.plain(f"{p}.kv_norm.weight", (a.head_dim,), "BF16", "attention")
        wo_a_fmt = "bf16" if self.layout == "converted" else dense
        self.linear(f"{p}.wo_a", a.o_groups * a.o_lora_rank, a.n_heads * a.head_dim // a.o_groups, wo_a_fmt,
                    "attention")
        self.linear(f"{p}.wo_b", a.dim, a.o_groups * a.o_lora_rank, dense, "attention")
        if ratio > 0:
            self.compressor(f"{p}.compressor", a.head_dim, ratio, "compressor")
        if ratio == CSA_RATIO:
            self.linear(f"{p}.indexer.wq_b", a.index_n_heads * a.index_head_dim, a.q_lora_rank, dense, "indexer")
            self.linear(f"{p}.indexer.weights_proj", a.index_n_heads, a.dim, "bf16", "indexer")
            self.compressor(f"{p}.indexer.compressor", a.index_head_dim, CSA_RATIO, "indexer")

    def moe(self, p: str, hash_routed: bool) -> None:
        a = self.args
        self.linear(f"{p}.gate", a.n_routed_experts, a.dim, "bf16", "gate")
        if hash_routed:
            self.plain(f"{p}.gate.tid2eid", (a.vocab_size, a.n_activated_experts), "I64", "gate")
        else:
            self.plain(f"{p}.gate.bias", (a.n_routed_experts,), "F32", "gate")
        expert_fmt = a.routed_expert_dtype
        for e in range(a.n_routed_experts):
            self.linear(f"{p}.experts.{e}.w1", a.moe_inter_dim, a.dim, expert_fmt, "routed_experts")
            self.linear(f"{p}.experts.{e}.w2", a.dim, a.moe_inter_dim, expert_fmt, "routed_experts")
            self.linear(f"{p}.experts.{e}.w3", a.moe_inter_dim, a.dim, expert_fmt, "routed_experts")
        for w, (o, i) in (("w1", (a.moe_inter_dim, a.dim)), ("w2", (a.dim, a.moe_inter_dim)),
                          ("w3", (a.moe_inter_dim, a.dim))):
            self.linear(f"{p}.shared_experts.{w}", o, i, a.dtype, "shared_expert")

    def mhc(self, p: str, name: str, rows: int) -> None:
        a = self.args
        self.plain(f"{p}{name}_fn", (rows, a.hc_mult * a.dim), "F32", "mhc")
        self.plain(f"{p}{name}_base", (rows,), "F32", "mhc")
        self.plain(f"{p}{name}_scale", (3 if rows != a.hc_mult else 1,), "F32", "mhc")

    def block_body(self, p: str, layer_id: int) -> None:
        a = self.args
        mix = (2 + a.hc_mult) * a.hc_mult
        self.mhc(f"{p}.", "hc_attn", mix)
        self.mhc(f"{p}.", "hc_ffn", mix)
        self.plain(f"{p}.attn_norm.weight", (a.dim,), "BF16", "norm")
        self.plain(f"{p}.ffn_norm.weight", (a.dim,), "BF16", "norm")
        self.attention(f"{p}.attn", a.layer_ratio(layer_id))
        self.moe(f"{p}.ffn", a.is_hash_layer(layer_id))

    def build(self) -> list[TensorSpec]:
        a = self.args
        self.plain("embed.weight", (a.vocab_size, a.dim), "BF16", "embed")
        for i in range(a.n_layers):
            self.block = f"layers.{i}"
            self.block_body(f"layers.{i}", i)
        for j in range(a.n_mtp_layers):
            p = f"mtp.{j}"
            self.block = p
            self.block_body(p, a.n_layers + j)
            self.linear(f"{p}.e_proj", a.dim, a.dim, a.dtype, "mtp_proj")
            self.linear(f"{p}.h_proj", a.dim, a.dim, a.dtype, "mtp_proj")
            for n in ("enorm", "hnorm", "norm"):
                self.plain(f"{p}.{n}.weight", (a.dim,), "BF16", "norm")
            self.mhc(f"{p}.", "hc_head", a.hc_mult)
        self.block = "top"
        self.plain("norm.weight", (a.dim,), "BF16", "norm")
        self.plain("head.weight", (a.vocab_size, a.dim), "BF16", "head")
        self.mhc("", "hc_head", a.hc_mult)
        return self.specs


def expected_tensors(args: ModelArgs, layout: str = "hf", float_dtype: str = "BF16") -> dict[str, TensorSpec]:
    """Every tensor of a checkpoint for `args` in `layout`, keyed by name, in a stable order.

    `float_dtype` = "F32" only for an fp32 plain export (BF16 entries stored as F32)."""
    specs = _Builder(args, layout).build()
    if float_dtype != "BF16":
        if layout != "plain" or float_dtype != "F32":
            raise ValueError(f"float_dtype {float_dtype!r} only exists for the plain layout (F32)")
        specs = [dataclasses.replace(s, dtype="F32") if s.dtype == "BF16" else s for s in specs]
    return {s.name: s for s in specs}


def dtype_histogram(specs: dict[str, TensorSpec] | list[TensorSpec]) -> Counter:
    values = specs.values() if isinstance(specs, dict) else specs
    return Counter(s.dtype for s in values)


def active_parameters(spec: TensorSpec, args: ModelArgs) -> float:
    """Parameters of `spec` used per token: routed experts count k/E of theirs, everything else all."""
    if spec.component == "routed_experts":
        return spec.parameters * args.n_activated_experts / args.n_routed_experts
    return spec.parameters
