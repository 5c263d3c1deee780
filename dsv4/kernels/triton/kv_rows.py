"""The cache's stored rows written and read by one kernel each (the seam's `store_rows` and `load_rows`).

The engine keeps window rings and compressed entries in a KV format (`dsv4.kv_formats`): the model's dtype, or the
production "fp8" layouts (584-byte main-KV entries: e4m3 nope bytes, raw bf16 rope bytes, one ue8m0 scale per 64
nope dims; 68-byte indexer keys: packed e2m1 pairs and one ue8m0 scale per 32 dims). The reference encodes a row
with a dozen torch ops, looks up its page with three more and stores it with an `index_put_`; it decodes the same
way. In a batch-1 decode step those are ~16 launches per written row set and ~12 per read, each a few microseconds
on a GPU, for a few hundred bytes. Here:

* `store_rows`: one program per written row finds its page through the block table, encodes the row in registers
  (the FP8 / FP4 block scales and codes by `quant.quantize_rows`, the arithmetic `act_quant` / `fp4_quant` run,
  bit for bit) and stores its bytes, pad bytes included;
* `load_rows`: one program per (block of rows, batch row) gathers the rows from their pages and decodes them (the
  fp8 main-KV rows as the attention kernel decodes them, `attention.fp8_kv_rows`; the FP4 keys' codes times their
  scale, exact in fp32 and in bf16).

Both equal the reference bit for bit (`tests/test_triton_kv_rows.py`). Taken (`covers_store`, `covers_load`): rows
of the pool's own dtype (no codec), or the "fp8" format's rows in bf16; a cast codec and other dtypes run the
reference's ops. Where a row is stored and how it is encoded are `@triton.jit` helpers over a tile of rows
(`store_entries`, `store_encoded`), which `rows.norm_rope_store`'s kernel calls too: it stores the rows it makes
as `store_rows` would, without writing them anywhere else first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsv4.quant import ACT_AMAX_FLOOR, FP4_AMAX_FLOOR, FP4_MAX, FP8_MAX, INDEXER_SIM_BLOCK, KV_SIM_BLOCK

from ..paged import PagedRows, RowCodec
from .attention import fp8_kv_pool, fp8_kv_rows
from .quant import pow2_scale_bits, quantize_rows

# how a row is stored (constexpr KIND)
COPY, FP8_KV, FP4_INDEX = 0, 1, 2
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a row's elements moved as their bits
# the encoders' amax floors and inverse maxima, as `quant.act_quant` and `quant.fp4_quant` launch with them
_FP8_FLOOR, _FP8_INV_MAX = tl.constexpr(ACT_AMAX_FLOOR), tl.constexpr(1.0 / FP8_MAX)
_FP4_FLOOR, _FP4_INV_MAX = tl.constexpr(FP4_AMAX_FLOOR), tl.constexpr(1.0 / FP4_MAX)


@triton.jit
def _page_entry(tab_ptr, st_b, st_p, b, j, ok, sp_0, sp_1, ROWS_PER_PAGE: tl.constexpr):
    """Element offset in the pool of row j of batch row b: pool[table[b, j // rows_per_page], j % rows_per_page]."""
    page = tl.load(tab_ptr + b * st_b + (j // ROWS_PER_PAGE) * st_p, mask=ok, other=0).to(tl.int64)
    return page * sp_0 + (j % ROWS_PER_PAGE) * sp_1


@triton.jit
def store_encoded(bits, x, entry, ok, cols, pool_ptr, pool16_ptr, D: tl.constexpr, KIND: tl.constexpr,
                  NOPE: tl.constexpr, NSCALE: tl.constexpr, SCALE_BYTES: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                  R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [R, BLOCK_D] stored at element offsets `entry` [R] of the pool where `ok` [R], encoded as KIND says:
    `bits` are the rows as the pool's elements (copy) or bf16 as int16 bits (the fp8 format), `x` the same bf16
    values widened to fp32 (what the encoders quantise; not read for a copy). Columns from D on are padding."""
    col_ok = cols < D
    if KIND == 0:  # the pool holds compute rows: the bits as they are
        tl.store(pool_ptr + entry[:, None] + cols[None, :], bits, mask=ok[:, None] & col_ok[None, :])
    elif KIND == 1:  # e4m3 nope dims by 64-blocks, raw bf16 rope dims, the scales' bytes and zero pad bytes
        x = tl.where((cols < NOPE)[None, :], x, 0.0)  # (a partial last block: the reference's zero padding)
        blocks = tl.reshape(x, (R * (BLOCK_D // 64), 64))
        scale_bits = pow2_scale_bits(tl.max(tl.abs(blocks), axis=1), _FP8_FLOOR, _FP8_INV_MAX)
        codes = tl.reshape(quantize_rows(blocks, scale_bits, False, False), (R, BLOCK_D))
        tl.store(pool_ptr + entry[:, None] + cols[None, :], codes, mask=ok[:, None] & (cols < NOPE)[None, :])
        tl.store(pool16_ptr + ((entry + NOPE) // 2)[:, None] + (cols - NOPE)[None, :], bits,
                 mask=ok[:, None] & ((cols >= NOPE) & col_ok)[None, :])
        blk = tl.arange(0, BLOCK_D // 64)
        scale_at = pool_ptr + entry + (NOPE + 2 * (D - NOPE))  # [R]
        scale_bytes = tl.reshape(((scale_bits >> 23) & 0xFF).to(tl.uint8), (R, BLOCK_D // 64))
        tl.store(scale_at[:, None] + blk[None, :], scale_bytes, mask=ok[:, None] & (blk < NSCALE)[None, :])
        pad = tl.arange(0, SCALE_BLOCK)
        tl.store(scale_at[:, None] + pad[None, :], tl.zeros((R, SCALE_BLOCK), tl.uint8),
                 mask=ok[:, None] & ((pad >= NSCALE) & (pad < SCALE_BYTES))[None, :])
    else:  # e2m1 codes by 32-blocks, two a byte (low nibble the even element), then the scales' bytes
        blocks = tl.reshape(x, (R * (BLOCK_D // 32), 32))
        scale_bits = pow2_scale_bits(tl.max(tl.abs(blocks), axis=1), _FP4_FLOOR, _FP4_INV_MAX)
        codes = tl.reshape(quantize_rows(blocks, scale_bits, True, False), (R, BLOCK_D // 2, 2))
        low, high = tl.split(codes)
        half = tl.arange(0, BLOCK_D // 2)
        tl.store(pool_ptr + entry[:, None] + half[None, :], low | (high << 4),
                 mask=ok[:, None] & (half < D // 2)[None, :])
        blk = tl.arange(0, BLOCK_D // 32)
        scale_bytes = tl.reshape(((scale_bits >> 23) & 0xFF).to(tl.uint8), (R, BLOCK_D // 32))
        tl.store(pool_ptr + entry[:, None] + D // 2 + blk[None, :], scale_bytes,
                 mask=ok[:, None] & (blk < NSCALE)[None, :])


@triton.jit
def store_entries(i, ok, rows_ptr, idx_ptr, S, tab_ptr, st_b, st_p, sp_0, sp_1, HAS_ROWS: tl.constexpr,
                  ROWS_PER_PAGE: tl.constexpr):
    """Where rows i [R] (int64) of a `store_rows` go: element offsets [R] in the pool of row index[i] of batch row
    rows[i] (without HAS_ROWS, batch row i // S)."""
    j = tl.load(idx_ptr + i, mask=ok, other=0).to(tl.int64)
    if HAS_ROWS:
        b = tl.load(rows_ptr + i, mask=ok, other=0).to(tl.int64)
    else:
        b = i // S
    return _page_entry(tab_ptr, st_b, st_p, b, j, ok & (j >= 0), sp_0, sp_1, ROWS_PER_PAGE)


@triton.jit
def _store_rows_kernel(
    val_ptr, sv_m,  # values [M, D] (unit column stride): bf16 as int16 bits, or the pool's elements as their bits
    rows_ptr, idx_ptr, S,  # rows [M] and index [M]; without ROWS, row i belongs to batch row i // S
    pool_ptr, pool16_ptr, sp_0, sp_1,  # the pool [pages, rows_per_page, width] (pool16: its int16 view, fp8 only)
    tab_ptr, st_b, st_p,
    D: tl.constexpr, KIND: tl.constexpr, HAS_ROWS: tl.constexpr, ROWS_PER_PAGE: tl.constexpr,
    NOPE: tl.constexpr, NSCALE: tl.constexpr, SCALE_BYTES: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) + tl.zeros((1,), tl.int64)  # [1]: this program's row
    ok = i >= 0
    entry = store_entries(i, ok, rows_ptr, idx_ptr, S, tab_ptr, st_b, st_p, sp_0, sp_1, HAS_ROWS, ROWS_PER_PAGE)
    cols = tl.arange(0, BLOCK_D)
    bits = tl.load(val_ptr + i[:, None] * sv_m + cols[None, :], mask=(cols < D)[None, :], other=0)
    x = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)  # bf16 widened exactly (fp8 kinds)
    store_encoded(bits, x, entry, ok, cols, pool_ptr, pool16_ptr, D, KIND, NOPE, NSCALE, SCALE_BYTES, SCALE_BLOCK,
                  1, BLOCK_D)


@triton.jit
def _load_rows_kernel(
    pool_ptr, pool16_ptr, sp_0, sp_1,
    tab_ptr, st_b, st_p,
    out_ptr, so_b, so_n,  # out [B, N, D]: the pool's elements as their bits (no codec), or bf16 as int16 bits
    N,
    D: tl.constexpr, KIND: tl.constexpr, ROWS_PER_PAGE: tl.constexpr, NOPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    ok = j < N
    entry = _page_entry(tab_ptr, st_b, st_p, b, j, ok, sp_0, sp_1, ROWS_PER_PAGE)
    cols = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (cols < D)[None, :]
    out = out_ptr + b * so_b + j[:, None] * so_n + cols[None, :]
    if KIND == 0:
        tl.store(out, tl.load(pool_ptr + entry[:, None] + cols[None, :], mask=mask, other=0), mask=mask)
    elif KIND == 1:
        rows = fp8_kv_rows(pool_ptr, pool16_ptr, entry, ok, cols, D, NOPE, D - NOPE, BLOCK_N, BLOCK_D)
        tl.store(out, rows.to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(out, fp4_key_bits(pool_ptr, entry, ok, cols, D), mask=mask)


@triton.jit
def fp4_key_bits(pool_ptr, entry, valid, cols, D: tl.constexpr):
    """The bf16 bits (int16) of fp4 indexer keys [len(entry), len(cols)] at byte offsets `entry` of the pool (read
    where `valid`): each e2m1 code times its 32-block's ue8m0 scale."""
    mask = valid[:, None] & (cols < D)[None, :]
    byte = tl.load(pool_ptr + entry[:, None] + (cols // 2)[None, :], mask=mask, other=0).to(tl.int32)
    code = tl.where((cols % 2 == 0)[None, :], byte & 0xF, byte >> 4)
    m = code & 7  # e2m1 magnitudes 0, .5, 1, 1.5 (m / 2), then 2, 3, 4, 6 ((2 + m % 2) * 2**(m // 2 - 2))
    mag = tl.where(m < 4, m.to(tl.float32) * 0.5, (2 + (m & 1)).to(tl.float32) * tl.where(m >= 6, 2.0, 1.0))
    # the sign as the sign bit (a negation may be 0 - x, which turns -0.0 into +0.0: triton 3.6 does)
    value = (mag.to(tl.int32, bitcast=True) | ((code & 8) << 28)).to(tl.float32, bitcast=True)
    sbyte = tl.load(pool_ptr + entry[:, None] + (D // 2 + cols // 32)[None, :], mask=mask, other=127)
    sbyte = sbyte.to(tl.int32)
    # 2**(byte - 127) from its fp32 bits: byte 0 is the fp32 subnormal 2**-127, byte 255 NaN
    scale = tl.where(sbyte == 0, 0x400000, tl.where(sbyte == 255, 0x7FC00000, sbyte << 23))
    # a code times a power of two has at most 2 significant bits: exact in fp32, and its top half is its bf16
    rows = value * scale.to(tl.float32, bitcast=True)
    return (rows.to(tl.int32, bitcast=True) >> 16).to(tl.int16)


# ---------------------------------------------------------------------------------------------- host side


def _kind(codec: RowCodec | None, pool: Tensor, d: int) -> int | None:
    """How the kernels read and write the pool's rows of compute width d, or None where they do not."""
    if pool.dim() != 3 or pool.stride(2) != 1:
        return None
    if codec is None:
        return COPY if pool.shape[-1] == d and pool.element_size() in _BITS else None
    # codecs are recognised by the format they name, as the attention kernel does (`attention._second_run_kind`)
    if getattr(codec, "format", None) != "fp8" or getattr(codec, "compute", None) != torch.bfloat16:
        return None
    if pool.dtype != torch.uint8 or getattr(codec, "dim", None) != d:
        return None
    kind = getattr(codec, "kind", None)
    if kind == "kv":  # (the attention kernel's layout, with a nope block to encode: 64 dims and more)
        return FP8_KV if d >= 64 and getattr(codec, "rope_dim", d) < d and fp8_kv_pool(codec, pool, d) else None
    if kind == "index":
        ok = d % INDEXER_SIM_BLOCK == 0 and pool.shape[-1] == d // 2 + d // INDEXER_SIM_BLOCK
        return FP4_INDEX if ok else None
    return None


def fp4_keys(src: PagedRows, d: int) -> bool:
    """Whether `src` holds the fp8 format's fp4 indexer keys of width d that `fp4_key_bits` decodes (in bf16)."""
    return _kind(src.codec, src.pool, d) == FP4_INDEX


def _table_ok(table: Tensor, b: int) -> bool:
    return table.dim() == 2 and table.shape[0] >= b and table.dtype in (torch.int32, torch.int64)


def covers_store(values: Tensor, dest: PagedRows, rows: Tensor | None, index: Tensor) -> bool:
    """Whether `store_rows` runs here: a pool the kernels write (`_kind`), values in the pool's dtype (no codec) or
    bf16 (the fp8 format), integer rows and index of matching shapes."""
    if not isinstance(dest, PagedRows) or values.dim() < 1 or index.dtype not in (torch.int32, torch.int64):
        return False
    d = values.shape[-1]
    kind = _kind(dest.codec, dest.pool, d)
    if kind is None or values.dtype != (dest.pool.dtype if kind == COPY else torch.bfloat16):
        return False
    if rows is None:
        return index.dim() == 2 and tuple(values.shape) == (*index.shape, d) and _table_ok(dest.table, index.shape[0])
    return (rows.dtype in (torch.int32, torch.int64) and rows.shape == index.shape and index.dim() == 1
            and tuple(values.shape) == (index.shape[0], d) and dest.table.dim() == 2)


def store_kind(dest: PagedRows, d: int) -> int | None:
    """How the kernels store rows of width d into `dest` (COPY, FP8_KV, FP4_INDEX), or None where they do not."""
    return _kind(dest.codec, dest.pool, d)


@dataclass(frozen=True)
class StoreArgs:
    """A store's launch arguments as the kernels that store rows take them (`store_entries`, `store_encoded`): the
    tensors and integers in order (None: a pointer not read), then the constexprs by name."""

    tensors: tuple = (None, None, 1, None, None, 0, 0, None, 0, 0)
    constants: dict = field(default_factory=lambda: dict(KIND=COPY, HAS_ROWS=False, ROWS_PER_PAGE=1, NOPE=0,
                                                           NSCALE=1, SCALE_BYTES=0, SCALE_BLOCK=1))


NO_STORE = StoreArgs()


def store_args(store: tuple[PagedRows, Tensor | None, Tensor], d: int) -> StoreArgs:
    """The arguments of a `store_rows` (dest, rows, index) of rows of width d (`covers_store`)."""
    dest, rows, index = store
    kind = _kind(dest.codec, dest.pool, d)
    pool = dest.pool
    nope = d - getattr(dest.codec, "rope_dim", 0) if kind == FP8_KV else 0
    nscale = triton.cdiv(nope, KV_SIM_BLOCK) if kind == FP8_KV else d // INDEXER_SIM_BLOCK
    scale_bytes = pool.shape[-1] - nope - 2 * (d - nope) if kind == FP8_KV else 0  # (pad bytes included)
    index_flat = index.reshape(-1).contiguous()
    rows_flat = index_flat if rows is None else rows.reshape(-1).contiguous()
    tensors = (rows_flat, index_flat, max(1, index.shape[-1]) if rows is None else 1,
               pool.view(_BITS[pool.element_size()]) if kind == COPY else pool,
               pool.view(torch.int16) if kind == FP8_KV else pool, pool.stride(0), pool.stride(1),
               dest.table, dest.table.stride(0), dest.table.stride(1))
    return StoreArgs(tensors, dict(KIND=kind, HAS_ROWS=rows is not None, ROWS_PER_PAGE=pool.shape[1], NOPE=nope,
                                   NSCALE=nscale, SCALE_BYTES=scale_bytes,
                                   SCALE_BLOCK=triton.next_power_of_2(max(1, scale_bytes))))


def store_rows(values: Tensor, dest: PagedRows, rows: Tensor | None, index: Tensor) -> None:
    """`ReferenceBackend.store_rows` in one launch (see `covers_store`)."""
    d = values.shape[-1]
    flat = values.detach().reshape(-1, d)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    if flat.shape[0] == 0:
        return
    at = store_args((dest, rows, index), d)
    _store_rows_kernel[(flat.shape[0],)](
        flat.view(_BITS[flat.element_size()]), flat.stride(0), *at.tensors, D=d, **at.constants,
        BLOCK_D=triton.next_power_of_2(max(d, 64)), num_warps=1 if d <= 256 else 2)


def covers_load(src: PagedRows) -> bool:
    """Whether `load_rows` runs here: a pool the kernels read (`_kind`) through a block table that addresses every
    row asked for."""
    if not isinstance(src, PagedRows) or src.count < 0 or not _table_ok(src.table, src.table.shape[0]):
        return False
    d = getattr(src.codec, "dim", None) if src.codec is not None else src.pool.shape[-1]
    return (isinstance(d, int) and _kind(src.codec, src.pool, d) is not None
            and src.count <= src.table.shape[1] * src.pool.shape[1])


def load_rows(src: PagedRows) -> Tensor:
    """`ReferenceBackend.load_rows` in one launch (see `covers_load`): [B, count, D]."""
    pool, table, n = src.pool, src.table, src.count
    d = src.codec.dim if src.codec is not None else pool.shape[-1]
    kind = _kind(src.codec, pool, d)
    batch = table.shape[0]
    out = torch.empty(batch, n, d, dtype=pool.dtype if kind == COPY else torch.bfloat16, device=pool.device)
    if batch and n:
        block_d = triton.next_power_of_2(max(d, 64))
        block_n = max(1, min(triton.next_power_of_2(n), 4096 // block_d))
        nope = d - src.codec.rope_dim if kind == FP8_KV else 0
        _load_rows_kernel[(triton.cdiv(n, block_n), batch)](
            pool.view(_BITS[pool.element_size()]) if kind == COPY else pool,
            pool.view(torch.int16) if kind == FP8_KV else pool, pool.stride(0), pool.stride(1),
            table, table.stride(0), table.stride(1),
            out.view(_BITS[out.element_size()]), out.stride(0), out.stride(1), n,
            D=d, KIND=kind, ROWS_PER_PAGE=pool.shape[1], NOPE=nope, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=4 if block_n * block_d >= 2048 else 2)
    return out
