"""Test-only oracle: the official DeepSeek-V4 inference, re-implemented in plain torch on the CPU.

The official reference (`inference/model.py` + `inference/kernel.py`, final revision 60d8d70) needs CUDA
and tilelang. This module re-implements its *structure and order of operations* so that dsv4's `exact`
numerics can be checked against it on any machine:

  * one prefill from position 0, then single-token decodes (the only call shapes the reference has);
  * the reference's own per-layer state, kept the way it keeps it (spec §4.1): a window ring of
    `window_size` slots written at p mod window, the compressed KV rows behind it in the same tensor,
    compressor state rows (fp32) with the CSA "previous block" rows 0..r-1 and "current block" rows
    r..2r-1 (copied down after every pooled entry), and the indexer's own key cache;
  * only the last position's logits are produced (spec §9 item 9);
  * bf16 activations with fp32 exactly where the reference computes in fp32 (RMSNorm, RoPE, mHC,
    compressor, gate, SwiGLU, the GEMM accumulators, the softmax of the sparse attention).

The kernels are written here from the spec formulas (§3.0), not taken from dsv4:
  * `act_quant`: per token per 128 inputs, amax floored at 1e-4, scale 2^ceil(log2(amax * fp32(1/448)))
    obtained from the float's exponent bits like the tilelang kernel, e4m3 round-to-nearest-even;
  * FP8 GEMM: one fp32 product per 128-wide K block, times both scales, added into a second fp32
    accumulator; FP4 GEMM the same per 32-wide K block (factor act_scale[k//128] * w_scale[n, k//32]);
  * `fp8sim64` on the non-rope dims of every KV row, `fp4sim32` on the indexer's queries and keys;
  * Hadamard as an explicit Sylvester matrix / sqrt(n) in fp32;
  * sparse attention as the kernel does it: gathered candidates in blocks of 64, online softmax in
    fp32, the unnormalised probabilities cast to bf16 before the product with the values, the sink
    added to the denominator at the end.

Independence: nothing from `dsv4` is imported; the checkpoint formats (e4m3, e8m0, packed e2m1) are
decoded here too. The oracle is built from a state dict in the official checkpoint layout (names and
storage formats of `model0-mp1.safetensors` after convert.py), e.g. a dsv4 model's `state_dict()` after
`dsv4.formats.to_official_formats`.

One convention where the reference is unspecified: torch.topk's order among equal index scores (frequent
in bf16 on random weights) is undefined and device-dependent; ties go to the lower entry id here, and
`indexer_ties` counts the queries where that convention decided something.

Switches for negative controls: `kv_fp8=False` is the first release's KV "FP8 simulation" (before
kernel fix 553034d it rounded only to bf16, i.e. did nothing); `shared_clamp=False` is the first
release's unclamped shared expert (before model fix 2b2bebc).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

BF16, FP32 = torch.bfloat16, torch.float32
FP8_MAX, FP4_MAX = 448.0, 6.0
ATTN_BLOCK = 64  # candidates per step of the sparse-attention kernel's online softmax


@contextmanager
def default_dtype(dtype: torch.dtype):
    """The reference runs with torch's default dtype set to bf16; restore whatever was there."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ============================================================================ checkpoint formats


def e8m0_values(scale: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu -> fp32 2**(byte - 127)."""
    exponent = scale.view(torch.uint8).to(torch.int32) - 127
    return torch.ldexp(torch.ones(exponent.shape, dtype=FP32), exponent)


_E2M1_TABLE = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=FP32)


def e2m1_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Packed FP4 bytes [N, K/2] -> fp32 values [N, K]; the low nibble holds the even element."""
    raw = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack((raw & 0xF, raw >> 4), dim=-1).flatten(-2)
    return _E2M1_TABLE[codes]


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values already clamped to [-6, 6] onto the e2m1 grid, nearest-even (as a cvt.rn).

    The grid has spacing 0.5 below 2, 1 in [2, 4), 2 in [4, 6]; rounding to even multiples of the
    local spacing is rounding to the even code, so torch.round (half to even) does it exactly.
    """
    mag = v.abs()
    step = torch.where(mag < 2.0, 0.5, torch.where(mag < 4.0, 1.0, 2.0))
    return torch.copysign(torch.round(mag / step) * step, v)


# ============================================================================ kernels


def _pow2_ceil(ratio: torch.Tensor) -> torch.Tensor:
    """2**ceil(log2(ratio)) read off the fp32 bits (exponent, +1 if any mantissa bit is set)."""
    bits = ratio.to(FP32).view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return ((exponent + 127) << 23).view(FP32)


_INV_FP8_MAX = torch.tensor(1.0 / FP8_MAX, dtype=FP32)
_INV_FP4_MAX = torch.tensor(1.0 / FP4_MAX, dtype=FP32)


def act_quant(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], fp32 pow-2 scales [..., K/block])."""
    k = x.shape[-1]
    assert k % block == 0
    blocks = x.to(FP32).unflatten(-1, (k // block, block))
    amax = blocks.abs().amax(dim=-1).clamp_min(1e-4)
    scale = _pow2_ceil(amax * _INV_FP8_MAX)
    q = (blocks / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), scale


def fp8_simulate(x: torch.Tensor, block: int = 64, rounding: bool = True) -> torch.Tensor:
    """In-place FP8 quantize-dequantize (act_quant(..., inplace=True)); returns x's dtype.

    rounding=False is the first release's kernel, whose "FP8" cast went to the input dtype (bf16)."""
    k = x.shape[-1]
    blocks = x.to(FP32).unflatten(-1, (k // block, block))
    amax = blocks.abs().amax(dim=-1).clamp_min(1e-4)
    scale = _pow2_ceil(amax * _INV_FP8_MAX).unsqueeze(-1)
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX)
    q = q.to(torch.float8_e4m3fn) if rounding else q.to(x.dtype)
    return (q.to(FP32) * scale).flatten(-2).to(x.dtype)


def fp4_simulate(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """In-place FP4 quantize-dequantize (fp4_act_quant(..., inplace=True)); returns x's dtype."""
    k = x.shape[-1]
    blocks = x.to(FP32).unflatten(-1, (k // block, block))
    amax = blocks.abs().amax(dim=-1).clamp_min(FP4_MAX * 2.0**-126)
    scale = _pow2_ceil(amax * _INV_FP4_MAX).unsqueeze(-1)
    q = e2m1_round((blocks / scale).clamp(-FP4_MAX, FP4_MAX))
    return (q * scale).flatten(-2).to(x.dtype)


def fp8_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """y[M,N] = xq[M,K] @ w[N,K]^T, FP8 x FP8 with 1x128 activation and 128x128 weight scales."""
    k, n = xq.shape[-1], w.shape[0]
    a, sa = xq.reshape(-1, k).to(FP32), xs.reshape(-1, k // 128)
    b = w.to(FP32)
    sb = e8m0_values(ws).repeat_interleave(128, dim=0)[:n]  # [N, K/128]: the scale of row n's tile
    acc = torch.zeros(a.shape[0], n, dtype=FP32)
    for kb in range(k // 128):
        cols = slice(kb * 128, (kb + 1) * 128)
        block = a[:, cols] @ b[:, cols].T  # the kernel's inner fp32 accumulator
        acc += block * (sa[:, kb:kb + 1] * sb[:, kb].unsqueeze(0))
    return acc.to(BF16).reshape(*xq.shape[:-1], n)


def fp4_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """y[M,N] = xq[M,K] @ w[N,K]^T, FP8 activations x packed FP4 weights with 1x32 scales."""
    k = xq.shape[-1]
    a, sa = xq.reshape(-1, k).to(FP32), xs.reshape(-1, k // 128)
    b = e2m1_unpack(w)  # e2m1 -> e4m3 is exact, so fp32 values are the same numbers
    sb = e8m0_values(ws)  # [N, K/32]
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=FP32)
    for kb in range(k // 32):
        cols = slice(kb * 32, (kb + 1) * 32)
        block = a[:, cols] @ b[:, cols].T
        acc += block * sa[:, kb // 4].unsqueeze(1) * sb[:, kb].unsqueeze(0)
    return acc.to(BF16).reshape(*xq.shape[:-1], b.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's `linear`: FP8 / FP4 weights quantise the activation first; else F.linear."""
    if weight.dtype == torch.float8_e4m3fn:
        return fp8_gemm(*act_quant(x), weight, scale)
    if weight.dtype in (torch.int8, torch.float4_e2m1fn_x2):  # packed e2m1 pairs (I8 download, F4 converted)
        return fp4_gemm(*act_quant(x), weight, scale)
    return F.linear(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(FP32)
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (weight * xf).to(x.dtype)


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=FP32)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    assert h.shape[0] == n
    return h


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """fast_hadamard_transform(x, scale=n**-0.5): bf16 in, fp32 math, bf16 out, natural order."""
    n = x.shape[-1]
    return ((x.to(FP32) @ sylvester(n)) * n**-0.5).to(x.dtype)


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                scale: float) -> torch.Tensor:
    """q [b,s,h,d] bf16, kv [b,n,d] bf16, sink [h] fp32, idx [b,s,k] int (-1 = none) -> [b,s,h,d] bf16.

    Block by block of ATTN_BLOCK candidates (in idx order): fp32 logits, running max, p = exp(l - max)
    summed in fp32, p cast to bf16 for the product with the values (fp32 accumulator rescaled by the
    change of max); at the end the sink's exp(sink - max) joins the denominator."""
    b, s, h, d = q.shape
    qf = q.to(FP32)
    run_max = torch.full((b, s, h), float("-inf"), dtype=FP32)
    run_sum = torch.zeros(b, s, h, dtype=FP32)
    acc = torch.zeros(b, s, h, d, dtype=FP32)
    rows_of = torch.arange(b).view(b, 1, 1)
    for lo in range(0, idx.shape[-1], ATTN_BLOCK):
        ids = idx[..., lo:lo + ATTN_BLOCK].long()
        valid = ids != -1  # [b,s,t]
        cand = torch.where(valid.unsqueeze(-1), kv[rows_of, ids.clamp_min(0)], 0).to(FP32)  # [b,s,t,d]
        logits = torch.einsum("bshd,bstd->bsht", qf, cand)
        logits = torch.where(valid.unsqueeze(2), logits, float("-inf")) * scale
        prev_max = run_max
        run_max = torch.maximum(prev_max, logits.amax(dim=-1))
        rescale = torch.exp(prev_max - run_max)
        p = torch.exp(logits - run_max.unsqueeze(-1))
        run_sum = run_sum * rescale + p.sum(dim=-1)
        acc = acc * rescale.unsqueeze(-1) + torch.einsum("bsht,bstd->bshd", p.to(BF16).to(FP32), cand)
    run_sum = run_sum + torch.exp(sink.view(1, 1, h) - run_max)
    return (acc / run_sum.unsqueeze(-1)).to(BF16)


def hc_split_sinkhorn(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc: int,
                      iters: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixes [b,s,(2+hc)*hc] fp32 -> pre [b,s,hc], post [b,s,hc], comb [b,s,hc,hc] (row j = source)."""
    pre = torch.sigmoid(mixes[..., :hc] * hc_scale[0] + hc_base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[..., hc:2 * hc] * hc_scale[1] + hc_base[hc:2 * hc])
    comb = (mixes[..., 2 * hc:] * hc_scale[2] + hc_base[2 * hc:]).unflatten(-1, (hc, hc))
    comb = torch.exp(comb - comb.amax(dim=-1, keepdim=True))
    comb = comb / comb.sum(dim=-1, keepdim=True) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


# ============================================================================ RoPE


def precompute_freqs_cis(rope_dim: int, seqlen: int, original_seq_len: int, base: float, factor: float,
                         beta_fast: int, beta_slow: int) -> torch.Tensor:
    """complex64 [seqlen, rope_dim/2]: e^(i * p * f_k), with YaRN interpolation when original_seq_len > 0."""
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=FP32) / rope_dim))
    if original_seq_len > 0:
        def corr(rotations: float) -> float:
            return rope_dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr(beta_fast)), 0)
        high = min(math.ceil(corr(beta_slow)), rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=FP32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp  # the reference's formulation: keep `smooth`, interpolate 1 - smooth
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    angles = torch.outer(torch.arange(seqlen).to(FP32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def rope_(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> None:
    """Rotate interleaved pairs of x (a bf16 view [b,s,r] or [b,s,h,r]) in place, complex math in fp32."""
    z = torch.view_as_complex(x.to(FP32).unflatten(-1, (-1, 2)).contiguous())
    f = freqs_cis.conj() if inverse else freqs_cis
    f = f.view(1, z.shape[1], z.shape[-1]) if z.dim() == 3 else f.view(1, z.shape[1], 1, z.shape[-1])
    x.copy_(torch.view_as_real(z * f).flatten(-2))


# ============================================================================ model


@dataclass
class Config:
    """The inference-config fields the reference reads."""

    vocab_size: int
    dim: int
    moe_inter_dim: int
    n_layers: int
    n_hash_layers: int
    n_heads: int
    n_routed_experts: int
    n_activated_experts: int
    score_func: str
    route_scale: float
    swiglu_limit: float
    q_lora_rank: int
    head_dim: int
    rope_head_dim: int
    norm_eps: float
    o_groups: int
    o_lora_rank: int
    window_size: int
    compress_ratios: tuple
    compress_rope_theta: float
    original_seq_len: int
    rope_theta: float
    rope_factor: float
    beta_fast: int
    beta_slow: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    max_batch_size: int = 4
    max_seq_len: int = 4096

    @classmethod
    def from_object(cls, args: Any, **overrides: Any) -> Config:
        """Read the fields by name from any config object (e.g. a dsv4 ModelArgs)."""
        names = cls.__dataclass_fields__
        values = {n: getattr(args, n) for n in names if hasattr(args, n)}
        values.update(overrides)
        return cls(**values)


class Weights:
    """Parameters by official name, converted to the dtypes the reference module holds after
    `load_model`: norms, compressor projections and the head upcast to fp32 from bf16, FP8/FP4 kept
    quantised with their e8m0 scales, everything else as stored."""

    _BF16_IN_CHECKPOINT_FP32_IN_MODEL = ("norm.weight", "compressor.wkv.weight", "compressor.wgate.weight",
                                         "head.weight")
    _BF16_IN_MODEL = ("embed.weight", ".gate.weight", "weights_proj.weight", "wo_a.weight")

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.t: dict[str, torch.Tensor] = {}
        for name, value in state_dict.items():
            value = value.detach().cpu()
            if name.endswith(self._BF16_IN_CHECKPOINT_FP32_IN_MODEL) or name.endswith(self._BF16_IN_MODEL):
                stored = value.to(BF16)  # the checkpoint holds bf16
                if not torch.equal(stored.to(value.dtype), value):
                    raise ValueError(f"{name}: not bf16-valued, so not an official-format tensor")
                value = stored if name.endswith(self._BF16_IN_MODEL) else stored.to(FP32)
            elif name.endswith("tid2eid"):
                value = value.to(torch.int32)
            self.t[name] = value

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.t[name]

    def get(self, name: str) -> torch.Tensor | None:
        return self.t.get(name)

    def lin(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.t[prefix + ".weight"], self.t.get(prefix + ".scale")


class Compressor:
    def __init__(self, w: Weights, prefix: str, cfg: Config, ratio: int, head_dim: int, rotate: bool,
                 kv_cache: torch.Tensor, freqs_cis: torch.Tensor, kv_fp8: bool) -> None:
        self.w, self.p, self.cfg = w, prefix, cfg
        self.ratio, self.head_dim, self.rotate = ratio, head_dim, rotate
        self.rope_dim = cfg.rope_head_dim
        self.overlap = ratio == 4
        coff = 1 + self.overlap
        self.kv_cache, self.freqs_cis, self.kv_fp8 = kv_cache, freqs_cis, kv_fp8
        rows, width = coff * ratio, coff * head_dim
        self.kv_state = torch.zeros(cfg.max_batch_size, rows, width, dtype=FP32)
        self.score_state = torch.full((cfg.max_batch_size, rows, width), float("-inf"), dtype=FP32)

    def _overlap(self, t: torch.Tensor, fill: float) -> torch.Tensor:
        """[b,n,r,2c] -> [b,n,2r,c]: entry j = first halves of block j-1's rows, second halves of block j's."""
        b, n, r, _ = t.shape
        c = self.head_dim
        out = t.new_full((b, n, 2 * r, c), fill)
        out[:, :, r:] = t[..., c:]
        out[:, 1:, :r] = t[:, :-1, :, :c]
        return out

    def __call__(self, x: torch.Tensor, start_pos: int) -> torch.Tensor | None:
        bsz, seqlen, _ = x.shape
        r, c, rd = self.ratio, self.head_dim, self.rope_dim
        ape = self.w[self.p + ".ape"]
        xf = x.to(FP32)  # compression is done in fp32
        kv = linear(xf, self.w[self.p + ".wkv.weight"])
        score = linear(xf, self.w[self.p + ".wgate.weight"])
        if start_pos == 0:
            compress = seqlen >= r
            remainder = seqlen % r
            cutoff = seqlen - remainder
            first_free = r if self.overlap else 0
            if self.overlap and cutoff >= r:  # the last complete block becomes the "previous" rows
                self.kv_state[:bsz, :r] = kv[:, cutoff - r:cutoff]
                self.score_state[:bsz, :r] = score[:, cutoff - r:cutoff] + ape
            if remainder:
                self.kv_state[:bsz, first_free:first_free + remainder] = kv[:, cutoff:]
                self.score_state[:bsz, first_free:first_free + remainder] = score[:, cutoff:] + ape[:remainder]
            kv = kv[:, :cutoff].unflatten(1, (-1, r))
            score = score[:, :cutoff].unflatten(1, (-1, r)) + ape
            if self.overlap:
                kv, score = self._overlap(kv, 0.0), self._overlap(score, float("-inf"))
            pooled = (kv * score.softmax(dim=2)).sum(dim=2)
        else:
            compress = (start_pos + 1) % r == 0
            score = score + ape[start_pos % r]
            if self.overlap:
                row = r + start_pos % r
                self.kv_state[:bsz, row] = kv[:, 0]
                self.score_state[:bsz, row] = score[:, 0]
                if compress:
                    kv_rows = torch.cat((self.kv_state[:bsz, :r, :c], self.kv_state[:bsz, r:, c:]), dim=1)
                    score_rows = torch.cat((self.score_state[:bsz, :r, :c], self.score_state[:bsz, r:, c:]), dim=1)
                    pooled = (kv_rows * score_rows.softmax(dim=1)).sum(dim=1, keepdim=True)
                    self.kv_state[:bsz, :r] = self.kv_state[:bsz, r:].clone()
                    self.score_state[:bsz, :r] = self.score_state[:bsz, r:].clone()
            else:
                self.kv_state[:bsz, start_pos % r] = kv[:, 0]
                self.score_state[:bsz, start_pos % r] = score[:, 0]
                if compress:
                    pooled = (self.kv_state[:bsz] * self.score_state[:bsz].softmax(dim=1)).sum(dim=1, keepdim=True)
        if not compress:
            return None
        entry = rms_norm(pooled.to(x.dtype), self.w[self.p + ".norm.weight"], self.cfg.norm_eps)
        if start_pos == 0:
            freqs = self.freqs_cis[:cutoff:r]
        else:
            freqs = self.freqs_cis[start_pos + 1 - r].unsqueeze(0)
        rope_(entry[..., -rd:], freqs)
        if self.rotate:
            entry = fp4_simulate(hadamard(entry))
        else:
            entry[..., :-rd] = fp8_simulate(entry[..., :-rd], 64, rounding=self.kv_fp8)
        if start_pos == 0:
            self.kv_cache[:bsz, :seqlen // r] = entry
        else:
            self.kv_cache[:bsz, start_pos // r] = entry[:, 0]
        return entry


class Indexer:
    def __init__(self, w: Weights, prefix: str, cfg: Config, freqs_cis: torch.Tensor, kv_fp8: bool) -> None:
        self.w, self.p, self.cfg = w, prefix, cfg
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.freqs_cis = freqs_cis
        self.kv_cache = torch.zeros(cfg.max_batch_size, cfg.max_seq_len // 4, self.head_dim, dtype=BF16)
        self.compressor = Compressor(w, prefix + ".compressor", cfg, 4, self.head_dim, True, self.kv_cache,
                                     freqs_cis, kv_fp8)
        self.ties = 0  # queries whose top-k had equal scores (resolved by the lower entry id)

    def __call__(self, x: torch.Tensor, qr: torch.Tensor, start_pos: int, offset: int) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
        rd = self.cfg.rope_head_dim
        q = linear(qr, *self.w.lin(self.p + ".wq_b")).unflatten(-1, (self.n_heads, self.head_dim))
        rope_(q[..., -rd:], self.freqs_cis[start_pos:end_pos])
        q = fp4_simulate(hadamard(q))
        self.compressor(x, start_pos)
        weights = linear(x, self.w[self.p + ".weights_proj.weight"]) * (self.head_dim**-0.5 * self.n_heads**-0.5)
        score = torch.einsum("bshd,btd->bsht", q, self.kv_cache[:bsz, :end_pos // 4])  # bf16
        score = (score.relu() * weights.unsqueeze(-1)).sum(dim=2)  # [b,s,t] bf16
        if start_pos == 0:
            future = torch.arange(seqlen // 4).repeat(seqlen, 1) >= torch.arange(1, seqlen + 1).unsqueeze(1) // 4
            score = score + torch.where(future, float("-inf"), 0.0)
        k = min(self.cfg.index_topk, end_pos // 4)
        # torch.topk's order among equal scores is unspecified (and differs between devices): break ties by
        # the lower entry id, i.e. a stable descending sort, and count the ties that this convention decides
        ranked = score.sort(dim=-1, descending=True, stable=True)
        top_scores, top = ranked.values[..., :k], ranked.indices[..., :k]
        self._count_ties(score, top_scores)
        if start_pos == 0:
            future = top >= torch.arange(1, seqlen + 1).unsqueeze(1) // 4
            return torch.where(future, -1, top + offset)
        return top + offset

    def _count_ties(self, score: torch.Tensor, top_scores: torch.Tensor) -> None:
        """Queries whose selection (which entries: a tie at the cut) or candidate order (a tie inside the
        selection) depends on the tie-breaking convention."""
        if top_scores.shape[-1] == 0:
            return
        finite = top_scores.isfinite()
        inside = ((top_scores[..., 1:] == top_scores[..., :-1]) & finite[..., 1:]).any(-1)
        kth = top_scores[..., -1:]
        at_cut = ((score == kth).sum(-1) > (top_scores == kth).sum(-1)) & finite[..., -1]
        self.ties += int((inside | at_cut).sum())


def window_topk_idxs(window: int, bsz: int, seqlen: int, start_pos: int) -> torch.Tensor:
    if start_pos >= window - 1:  # full ring, oldest slot first
        newest = start_pos % window
        m = torch.cat((torch.arange(newest + 1, window), torch.arange(0, newest + 1)))
    elif start_pos > 0:
        m = F.pad(torch.arange(start_pos + 1), (0, window - start_pos - 1), value=-1)
    else:
        pos = torch.arange(seqlen).unsqueeze(1)
        m = (pos - window + 1).clamp(0) + torch.arange(min(seqlen, window))
        m = torch.where(m > pos, -1, m)
    return m.unsqueeze(0).expand(bsz, -1, -1)


def compress_topk_idxs(ratio: int, bsz: int, seqlen: int, start_pos: int, offset: int) -> torch.Tensor:
    if start_pos > 0:
        m = torch.arange(0, (start_pos + 1) // ratio) + offset
    else:
        m = torch.arange(seqlen // ratio).repeat(seqlen, 1)
        future = m >= torch.arange(1, seqlen + 1).unsqueeze(1) // ratio
        m = torch.where(future, -1, m + offset)
    return m.unsqueeze(0).expand(bsz, -1, -1)


class Attention:
    def __init__(self, w: Weights, layer_id: int, cfg: Config, kv_fp8: bool) -> None:
        self.w, self.p, self.cfg = w, f"layers.{layer_id}.attn", cfg
        self.ratio = cfg.compress_ratios[layer_id]
        self.kv_fp8 = kv_fp8
        if self.ratio:
            theta, original = cfg.compress_rope_theta, cfg.original_seq_len
        else:  # sliding-only layers: plain RoPE, no YaRN
            theta, original = cfg.rope_theta, 0
        self.freqs_cis = precompute_freqs_cis(cfg.rope_head_dim, cfg.max_seq_len, original, theta, cfg.rope_factor,
                                              cfg.beta_fast, cfg.beta_slow)
        n_compressed = cfg.max_seq_len // self.ratio if self.ratio else 0
        # one tensor: window ring rows [0, W), compressed entries behind them
        self.kv_cache = torch.zeros(cfg.max_batch_size, cfg.window_size + n_compressed, cfg.head_dim, dtype=BF16)
        self.compressor = self.indexer = None
        if self.ratio:
            self.compressor = Compressor(w, self.p + ".compressor", cfg, self.ratio, cfg.head_dim, False,
                                         self.kv_cache[:, cfg.window_size:], self.freqs_cis, kv_fp8)
            if self.ratio == 4:
                self.indexer = Indexer(w, self.p + ".indexer", cfg, self.freqs_cis, kv_fp8)

    def __call__(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        cfg, w, p = self.cfg, self.w, self.p
        bsz, seqlen, _ = x.shape
        win, rd, eps = cfg.window_size, cfg.rope_head_dim, cfg.norm_eps
        freqs = self.freqs_cis[start_pos:start_pos + seqlen]
        # query
        qr = rms_norm(linear(x, *w.lin(p + ".wq_a")), w[p + ".q_norm.weight"], eps)
        q = linear(qr, *w.lin(p + ".wq_b")).unflatten(-1, (cfg.n_heads, cfg.head_dim))
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)  # bf16 arithmetic, as written
        rope_(q[..., -rd:], freqs)
        # window key/value (one shared head)
        kv = rms_norm(linear(x, *w.lin(p + ".wkv")), w[p + ".kv_norm.weight"], eps)
        rope_(kv[..., -rd:], freqs)
        kv[..., :-rd] = fp8_simulate(kv[..., :-rd], 64, rounding=self.kv_fp8)
        topk = window_topk_idxs(win, bsz, seqlen, start_pos)
        if self.ratio:
            offset = kv.shape[1] if start_pos == 0 else win
            if self.indexer is not None:
                chosen = self.indexer(x, qr, start_pos, offset)
            else:
                chosen = compress_topk_idxs(self.ratio, bsz, seqlen, start_pos, offset)
            topk = torch.cat((topk, chosen), dim=-1)
        topk = topk.int()
        if start_pos == 0:
            if seqlen <= win:
                self.kv_cache[:bsz, :seqlen] = kv
            else:
                cut = seqlen % win
                self.kv_cache[:bsz, cut:win] = kv[:, -win:][:, :win - cut]
                self.kv_cache[:bsz, :cut] = kv[:, -win:][:, win - cut:]
            if self.ratio:
                entries = self.compressor(x, 0)
                if entries is not None:
                    kv = torch.cat((kv, entries), dim=1)
            o = sparse_attn(q, kv, w[p + ".attn_sink"], topk, cfg.head_dim**-0.5)
        else:
            self.kv_cache[:bsz, start_pos % win] = kv[:, 0]
            if self.ratio:
                self.compressor(x, start_pos)
            o = sparse_attn(q, self.kv_cache[:bsz], w[p + ".attn_sink"], topk, cfg.head_dim**-0.5)
        rope_(o[..., -rd:], freqs, inverse=True)
        # grouped output projection: wo_a (bf16) per group as an einsum, then wo_b (FP8)
        o = o.view(bsz, seqlen, cfg.o_groups, -1)
        wo_a = w[p + ".wo_a.weight"].view(cfg.o_groups, cfg.o_lora_rank, -1)
        o = torch.einsum("bsgd,grd->bsgr", o, wo_a)
        return linear(o.flatten(2), *w.lin(p + ".wo_b"))


class MoE:
    def __init__(self, w: Weights, layer_id: int, cfg: Config, shared_clamp: bool) -> None:
        self.w, self.p, self.cfg = w, f"layers.{layer_id}.ffn", cfg
        self.hash = layer_id < cfg.n_hash_layers
        self.shared_clamp = shared_clamp

    def gate(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, p = self.cfg, self.p + ".gate"
        scores = linear(x.to(FP32), self.w[p + ".weight"].to(FP32))
        if cfg.score_func == "softmax":
            scores = scores.softmax(dim=-1)
        elif cfg.score_func == "sigmoid":
            scores = scores.sigmoid()
        else:
            scores = F.softplus(scores).sqrt()
        original = scores
        if self.hash:
            indices = self.w[p + ".tid2eid"][input_ids]
        else:
            indices = (scores + self.w[p + ".bias"]).topk(cfg.n_activated_experts, dim=-1)[1]
        weights = original.gather(1, indices.long())
        if cfg.score_func != "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * cfg.route_scale, indices.long()

    def expert(self, prefix: str, x: torch.Tensor, weights: torch.Tensor | None, limit: float) -> torch.Tensor:
        gate = linear(x, *self.w.lin(prefix + ".w1")).to(FP32)
        up = linear(x, *self.w.lin(prefix + ".w3")).to(FP32)
        if limit > 0:
            up = up.clamp(-limit, limit)
            gate = gate.clamp(max=limit)
        h = F.silu(gate) * up
        if weights is not None:
            h = weights * h
        return linear(h.to(x.dtype), *self.w.lin(prefix + ".w2"))

    def __call__(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        shape = x.shape
        x = x.view(-1, cfg.dim)
        weights, indices = self.gate(x, input_ids.flatten())
        y = torch.zeros(x.shape, dtype=FP32)
        for e in range(cfg.n_routed_experts):
            tokens, slot = torch.where(indices == e)
            if tokens.numel() == 0:
                continue
            y[tokens] += self.expert(f"{self.p}.experts.{e}", x[tokens], weights[tokens, slot, None],
                                     cfg.swiglu_limit)
        y += self.expert(self.p + ".shared_experts", x, None, cfg.swiglu_limit if self.shared_clamp else 0.0)
        return y.to(x.dtype).view(shape)


class Block:
    def __init__(self, w: Weights, layer_id: int, cfg: Config, kv_fp8: bool, shared_clamp: bool) -> None:
        self.w, self.p, self.cfg = w, f"layers.{layer_id}", cfg
        self.attn = Attention(w, layer_id, cfg, kv_fp8)
        self.ffn = MoE(w, layer_id, cfg, shared_clamp)

    def hc_pre(self, x: torch.Tensor, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, w = self.cfg, self.w
        shape, dtype = x.shape, x.dtype
        xf = x.flatten(2).to(FP32)
        rsqrt = torch.rsqrt(xf.square().mean(-1, keepdim=True) + cfg.norm_eps)
        mixes = F.linear(xf, w[f"{self.p}.hc_{site}_fn"]) * rsqrt
        pre, post, comb = hc_split_sinkhorn(mixes, w[f"{self.p}.hc_{site}_scale"], w[f"{self.p}.hc_{site}_base"],
                                            cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps)
        y = torch.sum(pre.unsqueeze(-1) * xf.view(shape), dim=2)
        return y.to(dtype), post, comb

    @staticmethod
    def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        y = post.unsqueeze(-1) * x.unsqueeze(-2) + torch.sum(comb.unsqueeze(-1) * residual.unsqueeze(-2), dim=2)
        return y.to(x.dtype)

    def __call__(self, x: torch.Tensor, start_pos: int, input_ids: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.norm_eps
        residual = x
        u, post, comb = self.hc_pre(x, "attn")
        a = self.attn(rms_norm(u, self.w[self.p + ".attn_norm.weight"], eps), start_pos)
        x = self.hc_post(a, residual, post, comb)
        residual = x
        u, post, comb = self.hc_pre(x, "ffn")
        f = self.ffn(rms_norm(u, self.w[self.p + ".ffn_norm.weight"], eps), input_ids)
        return self.hc_post(f, residual, post, comb)


class OfficialReference:
    """`OfficialReference(cfg, state_dict)(tokens, start_pos)` -> fp32 logits of the last position [b, vocab].

    Call it once with the whole prompt at start_pos 0, then with one token at a time at start_pos =
    the number of tokens consumed so far (like generate.py). MTP (`mtp.*`) is not used by generation
    and is ignored."""

    def __init__(self, cfg: Config, state_dict: dict[str, torch.Tensor], kv_fp8: bool = True,
                 shared_clamp: bool = True) -> None:
        self.cfg = cfg
        self.w = Weights(state_dict)
        with default_dtype(BF16):
            self.layers = [Block(self.w, i, cfg, kv_fp8, shared_clamp) for i in range(cfg.n_layers)]

    @property
    def indexer_ties(self) -> int:
        return sum(b.attn.indexer.ties for b in self.layers if b.attn.indexer is not None)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        bsz, seqlen = input_ids.shape
        assert bsz <= cfg.max_batch_size and start_pos + seqlen <= cfg.max_seq_len
        assert start_pos == 0 or seqlen == 1, "the reference only runs prefill-at-0 and single-token decode"
        with default_dtype(BF16):
            h = F.embedding(input_ids, w["embed.weight"])
            h = h.unsqueeze(2).repeat(1, 1, cfg.hc_mult, 1)
            for layer in self.layers:
                h = layer(h, start_pos, input_ids)
            return self._head(h)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        shape, dtype = x.shape, x.dtype
        xf = x.flatten(2).to(FP32)
        rsqrt = torch.rsqrt(xf.square().mean(-1, keepdim=True) + cfg.norm_eps)
        mixes = F.linear(xf, w["hc_head_fn"]) * rsqrt
        pre = torch.sigmoid(mixes * w["hc_head_scale"] + w["hc_head_base"]) + cfg.hc_eps
        y = torch.sum(pre.unsqueeze(-1) * xf.view(shape), dim=2).to(dtype)
        y = rms_norm(y, w["norm.weight"], cfg.norm_eps)
        return F.linear(y[:, -1].to(FP32), w["head.weight"])
