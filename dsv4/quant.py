"""Number formats of DeepSeek-V4 checkpoints and kernels (spec §3.0, §4.2, §5.1).

Everything here is plain torch and runs on CPU. Three formats matter:

* **e4m3** (``torch.float8_e4m3fn``): FP8 weights and activations; torch's cast rounds to nearest even.
* **e2m1** (FP4): 16 codes, bit 3 = sign, bits 0-2 index ``E2M1_GRID``; torch has a packed dtype
  (``float4_e2m1fn_x2``) but no casts to or from it, so rounding, packing and decoding are written here.
* **ue8m0** (``torch.float8_e8m0fnu``): a bare biased exponent, i.e. a power-of-two scale ``2**(byte-127)``.

Every scale is a power of two chosen as ``2**ceil(log2(amax / elem_max))``, so dividing by it is exact and
the largest element of a block lands in ``(elem_max/2, elem_max]``.
"""

from __future__ import annotations

import functools

import torch

FP8_MAX = 448.0  # largest finite e4m3 value
FP4_MAX = 6.0  # largest e2m1 value
FP8_BLOCK = 128  # FP8 weight tile is FP8_BLOCK x FP8_BLOCK
FP4_BLOCK = 32  # FP4 weights carry one scale per FP4_BLOCK consecutive input elements

E8M0_BIAS = 127
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127  # byte 255 is NaN
E8M0_NAN_BYTE = 255

# Magnitudes addressed by bits 0-2 of an e2m1 code.
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_SIGN_BIT = 0x8

# The smallest amax the FP4 path admits (reference: 6 * 2**-126), so that the scale stays a normal number.
FP4_AMAX_FLOOR = FP4_MAX * 2.0**-126
ACT_AMAX_FLOOR = 1e-4  # activation blocks never get a scale below 2**ceil(log2(1e-4 / 448))
KV_SIM_BLOCK = 64  # FP8 block of the KV nope dims (the fp8sim64 QAT simulation and the cached e4m3 rows)
INDEXER_SIM_BLOCK = 32  # FP4 block of indexer queries and keys (fp4sim32 and the cached e2m1 keys)

_FLOAT4_X2 = getattr(torch, "float4_e2m1fn_x2", None)


# ---------------------------------------------------------------------------------------------- scales


def ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ``ceil(log2(x))`` as int32 for positive finite fp32 ``x``.

    ``torch.log2`` is rounded and can land on the wrong side of an integer, so the exponent is read with
    ``frexp`` instead: ``x = m * 2**e`` with ``m`` in [0.5, 1) gives ``ceil(log2 x) = e - 1`` exactly when
    ``m == 0.5`` (x is a power of two) and ``e`` otherwise. Works for subnormals too.
    """
    mantissa, exponent = torch.frexp(x.float())
    return torch.where(mantissa == 0.5, exponent - 1, exponent)


def pow2_scale(amax: torch.Tensor, elem_max: float) -> torch.Tensor:
    """Power-of-two scale ``2**ceil(log2(amax / elem_max))`` in fp32, representable as ue8m0.

    The ratio is formed as ``amax * fp32(1/elem_max)``, exactly as the reference kernels do (they multiply
    by a precomputed inverse before taking the exponent bits); the two forms differ only when
    ``amax/elem_max`` lies within an ulp of a power of two. The exponent is clamped to the e8m0 range
    [-127, 127]; a non-positive amax gets the smallest scale, 2**-127.
    """
    ratio = amax.float() * (1.0 / elem_max)
    smallest = torch.full_like(ratio, E8M0_MIN_EXP, dtype=torch.int32)
    exponent = torch.where(ratio > 0, ceil_log2(ratio), smallest)
    exponent = exponent.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    return torch.ldexp(torch.ones_like(ratio), exponent)


def scale_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Store fp32 powers of two as ``float8_e8m0fnu`` by writing the biased exponent byte directly.

    torch's own cast also works for exact powers of two on CPU, but it rounds other values to nearest; doing
    it by hand makes the "must already be a power of two" contract explicit (a non-power-of-two keeps the
    exponent of its leading bit, i.e. is truncated). Exponents outside [-127, 127] are clamped.
    """
    mantissa, exponent = torch.frexp(scale.float())
    exponent = exponent - 1  # frexp's mantissa is in [0.5, 1): value = 2**(exponent-1) * (2*mantissa)
    exponent = torch.where(mantissa > 0, exponent, torch.full_like(exponent, E8M0_MIN_EXP))
    biased = (exponent.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP) + E8M0_BIAS).to(torch.uint8)
    return biased.view(torch.float8_e8m0fnu)


def e8m0_exponent(scale: torch.Tensor) -> torch.Tensor:
    """Unbiased int32 exponent of ue8m0 scales (byte - 127); byte 255 (NaN) is returned as 128."""
    return scale.view(torch.uint8).to(torch.int32) - E8M0_BIAS


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Exact fp32 value ``2**(byte-127)`` of ue8m0 scales; byte 255 decodes to NaN.

    ``ldexp`` builds the power of two exactly, including 2**-127 which is an fp32 subnormal.
    """
    exponent = e8m0_exponent(scale)
    value = torch.ldexp(torch.ones(exponent.shape, dtype=torch.float32, device=exponent.device), exponent)
    return torch.where(exponent == E8M0_NAN_BYTE - E8M0_BIAS, torch.full_like(value, float("nan")), value)


# ---------------------------------------------------------------------------------------------- blocks


def split_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 view of x [..., K] as [..., ceil(K/block), block], zero-padding a partial last block.

    Zero padding is harmless for a block's amax (|0| never raises it) and is cut off again by `merge_blocks`.
    Every per-block quantiser (activations, KV rows, indexer keys) shapes its input this way.
    """
    k = x.shape[-1]
    padded_k = -(-k // block) * block
    xf = x.float()
    if padded_k != k:
        xf = torch.nn.functional.pad(xf, (0, padded_k - k))
    return xf.unflatten(-1, (padded_k // block, block))


def merge_blocks(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `split_blocks`: [..., nb, block] -> [..., k]."""
    return blocks.flatten(-2)[..., :k]


# ---------------------------------------------------------------------------------------------- e2m1


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round values to the nearest e2m1 code (uint8 in [0, 16)), ties to even, saturating at ±6.

    The grid {0, .5, 1, 1.5, 2, 3, 4, 6} has step 0.5 below 2, 1 below 4 and 2 up to 6, and code index
    = 2v, v + 2 and v/2 + 4 on those ranges. `torch.round` rounds half to even, and on each range an
    even rounded value is an even index, so one rounding per range gives round-to-nearest-even codes
    (a midpoint on a range border, 1.75 or 3.5, rounds up to the border's even index either way). The
    sign comes from the sign bit, so -0.0 and small negatives encode as negative zero (code 8).
    """
    xf = x.float()
    mag = xf.abs().clamp(max=FP4_MAX)
    index = torch.where(mag < 2, torch.round(mag * 2), torch.where(mag < 4, torch.round(mag) + 2,
                                                                     torch.round(mag * 0.5) + 4))
    sign = torch.signbit(xf).to(torch.uint8) * E2M1_SIGN_BIT
    return index.to(torch.uint8) | sign


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """fp32 value of e2m1 codes (only the low four bits are looked at)."""
    return _e2m1_table(codes.device)[(codes.view(torch.uint8) & 0xF).long()]


@functools.cache
def _e2m1_table(device: torch.device) -> torch.Tensor:
    """The 16 code values on `device`, made once per device: a table made from host data at every call would be a
    copy from the host in every decode of FP4 rows (and a copy a CUDA graph cannot capture). A normal tensor
    even when first asked for in inference mode, so that training may use it too."""
    with torch.inference_mode(False):
        return torch.tensor(E2M1_GRID + tuple(-v for v in E2M1_GRID), dtype=torch.float32, device=device)


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """View a packed FP4 tensor (int8, uint8 or float4_e2m1fn_x2) as uint8 without copying."""
    allowed = (torch.int8, torch.uint8) + ((_FLOAT4_X2,) if _FLOAT4_X2 is not None else ())
    if packed.dtype not in allowed:
        raise TypeError(f"packed FP4 data must be int8, uint8 or float4_e2m1fn_x2, got {packed.dtype}")
    return packed.view(torch.uint8)


def is_packed_fp4_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is one the checkpoint or kernels use for packed FP4 (int8 or float4_e2m1fn_x2)."""
    return dtype == torch.int8 or (_FLOAT4_X2 is not None and dtype == _FLOAT4_X2)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack e2m1 codes [..., n] into int8 bytes [..., n//2]: low nibble = element 2i, high = element 2i+1."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.uint8) & 0xF
    low, high = codes[..., 0::2], codes[..., 1::2]
    return (low | (high << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack bytes [..., m] into e2m1 codes uint8 [..., 2m] (inverse of ``pack_fp4``)."""
    raw = _as_bytes(packed)
    pairs = torch.stack((raw & 0xF, raw >> 4), dim=-1)  # [..., m, 2]: (element 2i, element 2i+1)
    return pairs.flatten(-2)


# ---------------------------------------------------------------------------------------------- tiles


def _tile_amax(w: torch.Tensor, tile: int) -> torch.Tensor:
    """Max |w| over each ``tile x tile`` block of a 2-D tensor; trailing partial tiles are their own block."""
    rows, cols = w.shape
    row_tiles, col_tiles = -(-rows // tile), -(-cols // tile)
    padded = w.abs().new_zeros(row_tiles * tile, col_tiles * tile)  # zeros never raise a max of |w|
    padded[:rows, :cols] = w.abs()
    return padded.view(row_tiles, tile, col_tiles, tile).amax(dim=(1, 3))  # [row_tiles, col_tiles]


def expand_tiles(per_tile: torch.Tensor, tile: int, shape: tuple[int, int]) -> torch.Tensor:
    """Broadcast a per-tile tensor [ceil(r/tile), ceil(c/tile)] back to element shape ``shape`` = (r, c)."""
    rows, cols = shape
    return per_tile.repeat_interleave(tile, dim=0)[:rows].repeat_interleave(tile, dim=1)[:, :cols]


def _check_2d(w: torch.Tensor, name: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{name} expects a 2-D [out, in] weight, got shape {tuple(w.shape)}")


# ---------------------------------------------------------------------------------------------- FP8 weights


def quantize_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [out, in] weight to e4m3 with one ue8m0 scale per 128x128 tile (checkpoint format).

    Returns ``(q float8_e4m3fn [out, in], scale float8_e8m0fnu [ceil(out/128), ceil(in/128)])``. An all-zero
    tile has its amax floored at the smallest normal fp32 so its scale is finite (2**-127) and q is 0.
    """
    _check_2d(w, "quantize_fp8_weight")
    wf = w.float()
    amax = _tile_amax(wf, FP8_BLOCK).clamp(min=torch.finfo(torch.float32).tiny)
    scale = pow2_scale(amax, FP8_MAX)  # [row_tiles, col_tiles] fp32
    q = (wf / expand_tiles(scale, FP8_BLOCK, wf.shape)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    # Canonical form: rounding can leave a tile's largest code at 224 = 448/2 (amax/scale in (224, 232));
    # the same values are then stored with half the scale and doubled codes (exact in e4m3), so that
    # quantize(dequantize(q, s)) == (q, s) and plain <-> official conversions round-trip bit for bit.
    code_max = _tile_amax(q.float(), FP8_BLOCK)
    shrink = (code_max > 0) & (code_max <= FP8_MAX / 2) & (scale > 2.0 ** E8M0_MIN_EXP)
    if bool(shrink.any()):
        factor = torch.where(shrink, 2.0, 1.0)
        q = (q.float() * expand_tiles(factor, FP8_BLOCK, wf.shape)).to(torch.float8_e4m3fn)
        scale = scale / factor
    return q, scale_to_e8m0(scale)


def dequantize_fp8_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [out, in] value of an e4m3 weight with 128x128 ue8m0 tile scales (exact)."""
    _check_2d(q, "dequantize_fp8_weight")
    return q.float() * expand_tiles(e8m0_to_float(scale), FP8_BLOCK, q.shape)


# ---------------------------------------------------------------------------------------------- FP4 weights


def quantize_fp4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [out, in] weight to packed e2m1 with one ue8m0 scale per 32 inputs (routed-expert format).

    Returns ``(packed int8 [out, in/2], scale float8_e8m0fnu [out, in/32])``.
    """
    _check_2d(w, "quantize_fp4_weight")
    rows, cols = w.shape
    if cols % FP4_BLOCK:
        raise ValueError(f"quantize_fp4_weight needs in % {FP4_BLOCK} == 0, got shape {tuple(w.shape)}")
    groups = w.float().view(rows, cols // FP4_BLOCK, FP4_BLOCK)
    amax = groups.abs().amax(dim=-1).clamp(min=FP4_AMAX_FLOOR)  # [out, in/32]
    scale = pow2_scale(amax, FP4_MAX)
    codes = e2m1_encode(groups / scale.unsqueeze(-1))  # [out, in/32, 32]
    # Canonical form (see quantize_fp8_weight): a group whose largest value rounded down to 3 = 6/2 is
    # stored with half the scale and doubled values (0.5..3 -> 1..6, all exact in e2m1).
    code_max = e2m1_decode(codes).abs().amax(dim=-1)
    shrink = (code_max > 0) & (code_max <= FP4_MAX / 2) & (scale > 2.0 ** E8M0_MIN_EXP)
    if bool(shrink.any()):
        factor = torch.where(shrink, 2.0, 1.0)
        codes = e2m1_encode(e2m1_decode(codes) * factor.unsqueeze(-1))
        scale = scale / factor
    return pack_fp4(codes.view(rows, cols)), scale_to_e8m0(scale)


def dequantize_fp4_weight(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [out, in] value of a packed e2m1 weight [out, in/2] with per-32 ue8m0 scales [out, in/32]."""
    _check_2d(packed, "dequantize_fp4_weight")
    values = e2m1_decode(unpack_fp4(packed))  # [out, in]
    rows, cols = values.shape
    per_group = values.view(rows, cols // FP4_BLOCK, FP4_BLOCK) * e8m0_to_float(scale).unsqueeze(-1)
    return per_group.view(rows, cols)


def fp4_to_fp8_weight(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-encode an FP4 weight as FP8 with 128x128 tile scales, losslessly (convert.py --expert-dtype fp8).

    Per tile the new scale is ``max(scales in tile) / 2**6``; each e2m1 value is multiplied by its power of
    two ratio ``scale / S_new`` (at most 2**6, so |value| <= 6 * 64 = 384 < 448) and cast to e4m3. The cast is
    exact as long as no ratio drops below 2**-8 (scales inside one tile spanning less than 2**14), otherwise
    the smallest values underflow e4m3's subnormals, a limit shared with the official conversion.

    Returns ``(q float8_e4m3fn [out, in], scale float8_e8m0fnu [ceil(out/128), ceil(in/128)])``.
    """
    _check_2d(packed, "fp4_to_fp8_weight")
    values = e2m1_decode(unpack_fp4(packed))  # [out, in]
    rows, cols = values.shape
    exponent = e8m0_exponent(scale)  # [out, in/32]
    groups_per_tile = FP8_BLOCK // FP4_BLOCK
    row_tiles, col_tiles = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    padded = exponent.new_full((row_tiles * FP8_BLOCK, col_tiles * groups_per_tile), E8M0_MIN_EXP)
    padded[:rows, : exponent.shape[1]] = exponent
    tile_max = padded.view(row_tiles, FP8_BLOCK, col_tiles, groups_per_tile).amax(dim=(1, 3))
    new_exponent = (tile_max - 6).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)  # [row_tiles, col_tiles]
    # Per element: its group's exponent minus its tile's new exponent, a power-of-two shift <= 6.
    shift = exponent.repeat_interleave(FP4_BLOCK, dim=1) - expand_tiles(new_exponent, FP8_BLOCK, (rows, cols))
    q = torch.ldexp(values, shift).to(torch.float8_e4m3fn)
    new_scale = torch.ldexp(torch.ones_like(new_exponent, dtype=torch.float32), new_exponent)
    return q, scale_to_e8m0(new_scale)
