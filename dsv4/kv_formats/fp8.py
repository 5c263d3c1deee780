"""The "fp8" KV format: the production byte layouts of the official DeepSeek kernels (spec §4.2).

Two per-entry layouts, each a row of ``uint8`` bytes:

**Main KV entry** (window and compressed rows; FlashMLA "MODEL1"). A row ``[D]`` is ``N = D - R`` "nope"
dims followed by ``R`` rope dims (the model applies RoPE to the last R dims, spec §3.0). One entry is::

    bytes [0, N)                 N x e4m3, the nope dims divided by their block scale
    bytes [N, N + 2R)            R x bf16, the rope dims as raw little-endian bf16 bytes
    bytes [N + 2R, N + 2R + S)   ceil(N/64) x ue8m0 block scales (scale k covers nope dims 64k..64k+63),
                                 then zero pad bytes up to S = ceil(ceil(N/64) / 8) * 8

For V4 (D = 512, R = 64): 448 + 128 + 7 + 1 pad = **584 bytes**. Other head dims generalise it the same way
(scale bytes padded to a multiple of 8, a partial last 64-block getting its own scale); `dsv4.plan` reads these
sizes through the registry (`dsv4.kv_formats`). The official paged-block layout stores all tokens' ``N + 2R`` data
bytes first and then the ``S`` scale bytes per token; this module packs one entry per row in the order
above, from which that block layout is a plain gather.

Scales follow ``fp8sim64`` exactly (the seam's ``act_quant`` with 64-blocks, as ``dsv4.kernels.fp8_simulate``
rounds): per 64-block amax floored at 1e-4, scale ``2**ceil(log2(amax/448))``, e4m3 round-to-nearest-even with
clamp at ±448. Hence
``unpack_kv(pack_kv(x)) == fp8_simulate(nope) ++ rope`` bit for bit, and rows the exact model already
cached (nope dims FP8-rounded) round-trip losslessly.

**Indexer key entry** (DeepGEMM ``fp8_fp4_paged_mqa_logits``). A key ``[I]`` (I = 128 for V4) is::

    bytes [0, I/2)               I x e2m1 codes, two per byte: low nibble = even element, high = odd
    bytes [I/2, I/2 + I/32)      ceil(I/32) x ue8m0 block scales, scale k in byte k; for I = 128 the four
                                 bytes read as one little-endian int32 (scale k in bits 8k..8k+7)

For I = 128: 64 + 4 = **68 bytes**. Scales follow ``fp4sim32`` (the seam's ``fp4_quant``, as
``dsv4.kernels.fp4_simulate`` rounds): amax floored at ``6 * 2**-126``, scale ``2**ceil(log2(amax/6))``, e2m1
round-to-nearest-even saturating at ±6.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..quant import (
    INDEXER_SIM_BLOCK,
    KV_SIM_BLOCK,
    e2m1_decode,
    e8m0_to_float,
    merge_blocks,
    pack_fp4,
    scale_to_e8m0,
    split_blocks,
    unpack_fp4,
)

KV_SCALE_ALIGN = 8  # scale bytes of a main KV entry are padded to a multiple of 8 (7 scales + 1 pad for V4)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------- sizes


def kv_scale_count(nope_dim: int) -> int:
    """Number of ue8m0 scales of a main KV entry: one per 64 nope dims (a partial block gets one too)."""
    return _ceil(nope_dim, KV_SIM_BLOCK)


def kv_layout(head_dim: int, rope_dim: int) -> tuple[int, int, int, int]:
    """(nope bytes, rope bytes, scale bytes incl. pad, total bytes) of one main KV entry."""
    if not 0 <= rope_dim <= head_dim:
        raise ValueError(f"rope_dim must be in [0, head_dim={head_dim}], got {rope_dim}")
    nope = head_dim - rope_dim
    scales = _ceil(kv_scale_count(nope), KV_SCALE_ALIGN) * KV_SCALE_ALIGN
    return nope, 2 * rope_dim, scales, nope + 2 * rope_dim + scales


def index_key_layout(index_dim: int) -> tuple[int, int, int]:
    """(packed e2m1 bytes, scale bytes, total bytes) of one indexer key entry."""
    if index_dim <= 0 or index_dim % 2:
        raise ValueError(f"indexer key dim must be positive and even, got {index_dim}")
    data = index_dim // 2
    scales = _ceil(index_dim, INDEXER_SIM_BLOCK)
    return data, scales, data + scales


# ---------------------------------------------------------------------------------------------- main KV


def _check_rows(rows: torch.Tensor, name: str) -> None:
    if rows.dim() != 2:
        raise ValueError(f"{name} expects rows [N, D], got shape {tuple(rows.shape)}")


def pack_kv(rows: torch.Tensor, rope_dim: int = 64) -> torch.Tensor:
    """Encode main KV rows ``[N, D]`` (nope dims first, last ``rope_dim`` dims rope) as uint8 ``[N, bytes]``.

    The nope dims are quantised with the ``fp8sim64`` rule; the rope dims are stored as their bf16 bytes
    (rows of another float dtype are cast to bf16 first, as the reference cache is bf16).
    """
    _check_rows(rows, "pack_kv")
    n, d = rows.shape
    nope, rope_bytes, scale_bytes, total = kv_layout(d, rope_dim)
    out = torch.zeros(n, total, dtype=torch.uint8, device=rows.device)
    q, scale = kernels.act_quant(rows[:, :nope], KV_SIM_BLOCK)  # [N, nope] e4m3, [N, nb] fp32
    out[:, :nope] = q.view(torch.uint8)
    rope = rows[:, nope:].to(torch.bfloat16).contiguous()
    out[:, nope:nope + rope_bytes] = rope.view(torch.uint8).reshape(n, rope_bytes)
    out[:, nope + rope_bytes:nope + rope_bytes + scale.shape[1]] = scale_to_e8m0(scale).view(torch.uint8)
    return out


def unpack_kv(packed: torch.Tensor, head_dim: int = 512, rope_dim: int = 64) -> torch.Tensor:
    """Decode uint8 ``[N, bytes]`` from ``pack_kv`` back to bf16 rows ``[N, head_dim]``."""
    _check_rows(packed, "unpack_kv")
    nope, rope_bytes, _, total = kv_layout(head_dim, rope_dim)
    if packed.dtype != torch.uint8 or packed.shape[1] != total:
        raise ValueError(f"unpack_kv expects uint8 [N, {total}], got {packed.dtype} {tuple(packed.shape)}")
    n = packed.shape[0]
    nb = kv_scale_count(nope)
    q = packed[:, :nope].contiguous().view(torch.float8_e4m3fn)
    scale = e8m0_to_float(packed[:, nope + rope_bytes:nope + rope_bytes + nb].contiguous())  # [N, nb]
    blocks = split_blocks(q, KV_SIM_BLOCK)
    nope_vals = merge_blocks(blocks * scale.unsqueeze(-1), nope).to(torch.bfloat16)
    rope = packed[:, nope:nope + rope_bytes].contiguous().view(torch.bfloat16).reshape(n, rope_dim)
    return torch.cat((nope_vals, rope), dim=-1)


# ---------------------------------------------------------------------------------------------- indexer keys


def pack_index_key(rows: torch.Tensor) -> torch.Tensor:
    """Encode indexer keys ``[N, I]`` as uint8 ``[N, I/2 + ceil(I/32)]`` with the ``fp4sim32`` rule."""
    _check_rows(rows, "pack_index_key")
    n, dim = rows.shape
    data, scale_bytes, total = index_key_layout(dim)
    codes, scale = kernels.fp4_quant(rows, INDEXER_SIM_BLOCK)  # [N, I] e2m1 codes, [N, nb] fp32
    out = torch.empty(n, total, dtype=torch.uint8, device=rows.device)
    out[:, :data] = pack_fp4(codes).view(torch.uint8)
    out[:, data:] = scale_to_e8m0(scale).view(torch.uint8)
    return out


def unpack_index_key(packed: torch.Tensor, index_dim: int = 128) -> torch.Tensor:
    """Decode uint8 ``[N, bytes]`` from ``pack_index_key`` back to bf16 keys ``[N, index_dim]``."""
    _check_rows(packed, "unpack_index_key")
    data, scale_bytes, total = index_key_layout(index_dim)
    if packed.dtype != torch.uint8 or packed.shape[1] != total:
        raise ValueError(f"unpack_index_key expects uint8 [N, {total}], got {packed.dtype} {tuple(packed.shape)}")
    codes = unpack_fp4(packed[:, :data])  # [N, I]
    scale = e8m0_to_float(packed[:, data:].contiguous())  # [N, nb]
    blocks = split_blocks(e2m1_decode(codes), INDEXER_SIM_BLOCK)
    return merge_blocks(blocks * scale.unsqueeze(-1), index_dim).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- codec


class PackedCodec:
    """A `dsv4.kernels.RowCodec` for the "fp8" format: rows [..., D] stored as uint8 rows of the layouts above
    (`kind` "kv": `pack_kv`; "index": `pack_index_key`), decoded to `compute`."""

    format = "fp8"

    def __init__(self, kind: str, dim: int, rope_dim: int, compute: torch.dtype) -> None:
        self.kind, self.dim, self.rope_dim, self.compute = kind, dim, rope_dim, compute

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1, self.dim)
        packed = pack_kv(flat, self.rope_dim) if self.kind == "kv" else pack_index_key(flat)
        return packed.view(*rows.shape[:-1], packed.shape[-1])

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        flat = stored.reshape(-1, stored.shape[-1])
        rows = (unpack_kv(flat, self.dim, self.rope_dim) if self.kind == "kv"
                else unpack_index_key(flat, self.dim))
        return rows.to(self.compute).view(*stored.shape[:-1], self.dim)

    def round_trips(self, dtype: torch.dtype, exact: bool) -> bool:
        # the exact numerics round the cached KV's nope dims through these FP8 blocks, and the indexer keys through
        # these FP4 blocks, in bf16 (`Fp8.check_model`)
        return exact and dtype == torch.bfloat16
