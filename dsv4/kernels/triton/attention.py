"""Sparse attention with an attention sink as one Triton kernel (the seam's `sparse_attn`).

One program per (batch row, query position, block of heads) walks the query's slots `ATTN_BLOCK` (64) at a time,
exactly as `ReferenceBackend.sparse_attn` does (a block whose every slot is unused, which changes nothing, is
skipped: the padding of a static decode step's entries, a young sequence's window): each slot's row is gathered
in the kernel from the run its index falls in (a dense run by its batch stride; a paged run through its block
table, page ``table[b, j // rows_per_page]`` row ``j % rows_per_page``, so no page is ever copied), decoded in
registers where the run is stored in another format, the block's logits come from one ``tl.dot``
(heads x D) @ (D x 64) with fp32 accumulation, then the fp32 online softmax (running max, p = exp(logit - m),
running sum), the *unnormalised* p cast to the rows' dtype before ``tl.dot(p, rows)`` into an fp32 accumulator,
and at the end exp(sink - m) added to the denominator.

Where a launch's programs would leave most of the GPU idle (a decode step: V4-Flash's 64 heads at batch 1 are two
programs on 132 processors) and a query has several slot blocks, its blocks are split across programs
(`split_slots`): a first pass writes each block's largest logit, a second walks each split's blocks from the running
max the blocks before them leave (so every p is the reference's, rounded at the reference's max), and
`_split_combine_kernel` merges the splits' sums and accumulators, then normalises, rotates and stores.

Supported runs (`covers`): a first run, dense [B, n, D] or a `PagedRows` of one page per batch row holding compute
rows or the fp8 main-KV layout below (a cache's window rings seen through some of its rows: the engine's decode
steps; fp8 rings are decoded in the kernel, and a second run must then be fp8 entries, each slot's row decoded
from its own pool in one pass), optionally followed by one second run, either dense or a
`PagedRows` whose pool holds compute rows (codec None), rows of another float dtype (a cast codec such as
`kv_formats.CastCodec`: `stored` and `compute` dtypes) or the production "fp8" main-KV entries (format "fp8",
kind "kv", as `kv_formats.fp8.PackedCodec` writes them: e4m3 nope bytes, raw bf16
rope bytes, one ue8m0 scale per 64 nope dims), decoded in the kernel. Rows of the second run are cast to the
first run's dtype through the same intermediate dtypes as the reference's decode and `concat_rows`.

Numerics against the reference: the same operations in the same order per slot block; what differs is the
summation order inside the dot products and the row sums (and the GPU's `exp`), so fp32 results agree to a few
ulps and bf16 ones to about one bf16 step where an unnormalised p lands on the other side of a rounding.
An index past the last row of the runs counts as an unused slot here (the reference raises).

Details for Triton's CPU interpreter (``TRITON_INTERPRET=1``, how the tests run it) that cost the GPU nothing:
casts to bf16 round to nearest even from the fp32 bits (`numerics.round_to`; the interpreter truncates), exp is
libdevice's on the GPU and numpy's under the interpreter (`numerics.exp`), and under
the interpreter 16-bit dots are computed as fp32 ones (`WIDEN_DOTS`; it multiplies bf16 bit patterns as
integers), which is exact, as every product of two 16-bit floats is an fp32 value. On the GPU the 16-bit dots
run on the tensor cores with fp32 accumulation and fp32 ones with ``input_precision="ieee"`` (no TF32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..paged import KVRows, PagedRows, RowCodec
from . import gemm
from .numerics import TL_DTYPES, dot, exp, interpreting, libdevice_exp, round_to

ATTN_BLOCK = 64  # slots per online-softmax step (the reference's ATTN_BLOCK; the rounding of p depends on it)
MAX_HEAD_DIM = 512  # larger rows would not fit a program's registers and shared memory (V4: 512)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)

# what the second run is (constexpr RUN1 of the kernel)
_NO_RUN, _DENSE, _PAGED, _PAGED_FP8 = 0, 1, 2, 3


@triton.jit
def fp8_kv_rows(pool8_ptr, pool16_ptr, entry, valid, cols, D: tl.constexpr, NOPE: tl.constexpr,
                ROPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Decode fp8 main-KV entries to bf16 [BLOCK_K, BLOCK_D]: `entry` [BLOCK_K] byte offsets of the entries in the
    pool (even), `valid` [BLOCK_K] which to read, `cols` [BLOCK_D]. The pool is read as bytes (pool8) and, for the
    rope dims' bf16 values, as int16 (pool16, the same memory)."""
    at8, at16 = pool8_ptr + entry, pool16_ptr + entry // 2
    is_nope = cols < NOPE
    nope_mask = valid[:, None] & is_nope[None, :]
    code = tl.load(at8[:, None] + cols[None, :], mask=nope_mask, other=0)
    # one ue8m0 scale per 64 nope dims (KV_SIM_BLOCK), read once per block and spread over its columns
    NBLK: tl.constexpr = BLOCK_D // 64 if BLOCK_D >= 64 else 1
    SUB: tl.constexpr = BLOCK_D // NBLK
    blk = tl.arange(0, NBLK)
    sbyte = tl.load(at8[:, None] + (NOPE + 2 * ROPE) + blk[None, :],
                    mask=valid[:, None] & (blk[None, :] * 64 < NOPE), other=127).to(tl.int32)
    # 2**(byte - 127) from its fp32 bits: byte 0 is the fp32 subnormal 2**-127, byte 255 NaN
    sbits = tl.where(sbyte == 0, 0x400000, tl.where(sbyte == 255, 0x7FC00000, sbyte << 23))
    scale = sbits.to(tl.float32, bitcast=True)  # [BLOCK_K, NBLK]
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_K, NBLK, SUB)), (BLOCK_K, BLOCK_D))
    # e4m3 x a power of two has 4 significant bits: the fp32 product is exact and so is its bf16 cast
    nope = (code.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale).to(tl.bfloat16)
    rope_mask = valid[:, None] & (~is_nope & (cols < D))[None, :]
    # (cols - NOPE stays contiguous so the loads vectorise; the nope columns' addresses are masked off)
    half = tl.load(at16[:, None] + (NOPE // 2 + cols - NOPE)[None, :], mask=rope_mask, other=0)
    rope = half.to(tl.bfloat16, bitcast=True)
    return tl.where(is_nope[None, :], nope, rope)


@triton.jit
def query_tile(S, H, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program's query and heads: program (b * S + s, head block) -> b, s (int64), its heads [BLOCK_H] and
    columns [BLOCK_D], and which of them exist."""
    pid = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    return (pid // S).to(tl.int64), (pid % S).to(tl.int64), heads, cols, heads < H, cols < D


@triton.jit
def _sparse_attn_kernel(
    q_ptr, sq_b, sq_s, sq_h, sq_d,
    idx_ptr, si_b, si_s, si_k,
    sink_ptr,
    out_ptr, so_b, so_s, so_h, so_d,
    r0_ptr, s0_b, s0_n, s0_d, n0,
    r0_16_ptr,  # fp8 first run: its pool as int16
    pools_apart,  # fp8 first and second runs: the second pool's address less the first's, in bytes
    tab0_ptr, st0_b,  # a paged first run (RUN0 1 or 2): batch row b's rows are pool row table[b, 0]
    r1_ptr, s1_0, s1_1, s1_2, n1,  # dense: [B, n1, D] strides; paged: pool [pages, rows_per_page, width] strides
    r1_16_ptr,  # fp8 entries: the pool as int16 (the rope dims' bf16 values)
    tab_ptr, st_b, st_p,
    cos_ptr, sin_ptr, sc_b, sc_s, HALF,  # ROTATE: the output's last 2*HALF dims rotated back, per (b, s)
    lse_ptr,  # LSE: [B, S, H] fp32, each head's log of its softmax denominator (the sink's term included)
    part_ptr, ml_ptr, CHUNK,  # SPLIT: [B*S, splits, H, D] fp32 accumulators, [B*S, splits, H, 2] max and sum
    bmax_ptr, NB,  # SPLIT: [B*S, H, NB] fp32, each 64-slot block's largest logit (-inf: none used)
    S, H, K, scale,
    D: tl.constexpr,
    # the first run: 0 dense, 1 one page of compute rows per batch row (a cache's window rings seen by rows), 2 the
    # same in the fp8 main-KV layout (the second run then none or fp8 entries too)
    RUN0: tl.constexpr,
    ROW_DT: tl.constexpr,  # the first run's (compute) dtype
    RUN1: tl.constexpr,  # 0 no second run, 1 dense, 2 paged rows, 3 paged fp8 main-KV entries
    ROWS_PER_PAGE: tl.constexpr,
    ENTRY_ALIGN: tl.constexpr,  # a power of two dividing every entry offset in a paged pool (and pools_apart)
    MID: tl.constexpr,  # the dtype a decoded row of the second run passes through before the first run's dtype
    NOPE: tl.constexpr,
    ROPE: tl.constexpr,
    SAME: tl.constexpr,  # the second run's stored rows are the first run's dtype, read as they are
    QK_F32: tl.constexpr,  # the logits' dot in fp32 (ieee): q and the rows differ in dtype, or are fp32
    WIDEN_DOTS: tl.constexpr,  # 16-bit dots as fp32 ones (Triton's interpreter multiplies bf16 as integers)
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LIBDEVICE: tl.constexpr,  # libdevice's expf (torch's on CUDA), where it exists
    ROTATE: tl.constexpr,
    LSE: tl.constexpr,
    # 0: all K slots. 1 or 2: the slots [CHUNK * program_id(2), + CHUNK), 1 writing each block's largest logit,
    # 2 (after 1) walking them from the running max the blocks before them leave, writing its partial state
    SPLIT: tl.constexpr,
):
    b, s, heads, cols, head_ok, col_ok = query_tile(S, H, D, BLOCK_H, BLOCK_D)
    row_dtype = ROW_DT

    q_ptrs = q_ptr + b * sq_b + s * sq_s + heads[:, None].to(tl.int64) * sq_h + cols[None, :] * sq_d
    q = tl.load(q_ptrs, mask=head_ok[:, None] & col_ok[None, :], other=0.0)
    if QK_F32:
        q = q.to(tl.float32)

    run_max = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    idx_base = idx_ptr + b * si_b + s * si_s
    if RUN0 > 0:
        row0 = tl.load(tab0_ptr + b * st0_b).to(tl.int64)
    else:
        row0 = b
    if SPLIT > 0:
        start = tl.program_id(2) * CHUNK
        end = tl.minimum(start + CHUNK, K)
    else:
        start, end = 0, K
    block_max = bmax_ptr + ((b * S + s) * H + heads) * NB  # [BLOCK_H]: this query's heads' block maxima
    if SPLIT == 2:  # the reference reaches this split's first block with the running max of all before it
        for t in range(0, start // BLOCK_K):
            run_max = tl.maximum(run_max, tl.load(block_max + t, mask=head_ok, other=float("-inf")))
    for lo in range(start, end, BLOCK_K):
        slots = lo + tl.arange(0, BLOCK_K)
        largest = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        j = tl.load(idx_base + slots.to(tl.int64) * si_k, mask=slots < K, other=-1).to(tl.int64)
        # a block of unused slots changes nothing (rescale 1, or 0 before any used slot, and p = 0): skipped
        if tl.max(j, axis=0) >= 0:
            valid = (j >= 0) & (j < n0 + n1)
            in0 = valid & (j < n0)
            ptrs0 = r0_ptr + row0 * s0_b + j[:, None] * s0_n + cols[None, :] * s0_d
            mask0 = in0[:, None] & col_ok[None, :]
            if RUN0 == 2:  # fp8 rows in both runs' pools, decoded in one pass from each slot's own entry
                entry0 = tl.multiple_of(row0 * s0_b + tl.maximum(j, 0) * s0_n, ENTRY_ALIGN)
                if RUN1 == 0:
                    rows = fp8_kv_rows(r0_ptr, r0_16_ptr, entry0, in0, cols, D, NOPE, ROPE, BLOCK_K, BLOCK_D)
                else:
                    j1 = tl.maximum(j - n0, 0)
                    page = tl.load(tab_ptr + b * st_b + tl.where(valid & (j >= n0), j1 // ROWS_PER_PAGE, 0) * st_p)
                    entry1 = tl.multiple_of(page.to(tl.int64) * s1_0 + (j1 % ROWS_PER_PAGE) * s1_1, ENTRY_ALIGN)
                    # each slot's entry as a byte offset from the first pool (the second's by the pools' distance
                    # `pools_apart`: offsets from one base keep the loads vectorised, where a choice between two
                    # pointers does not)
                    entry = tl.multiple_of(tl.where(in0, entry0, pools_apart + entry1), ENTRY_ALIGN)
                    rows = fp8_kv_rows(r0_ptr, r0_16_ptr, entry, valid, cols, D, NOPE, ROPE, BLOCK_K, BLOCK_D)
            elif RUN1 == 0:
                rows = tl.load(ptrs0, mask=mask0, other=0.0)
            else:
                in1 = valid & (j >= n0)
                j1 = tl.maximum(j - n0, 0)
                mask1 = in1[:, None] & col_ok[None, :]
                if RUN1 == 1:
                    ptrs1 = r1_ptr + b * s1_0 + j1[:, None] * s1_1 + cols[None, :] * s1_2
                else:
                    # (unmasked, the slots of no page of this run reading the table's first: triton 3.6 fails to
                    # build the masked load in the fp8 layout's kernel, its layout pass giving mask and pointers
                    # different layouts)
                    page = tl.load(tab_ptr + b * st_b + tl.where(in1, j1 // ROWS_PER_PAGE, 0) * st_p).to(tl.int64)
                    # (a hint of the entries' alignment, for vector loads: fp8 entries are 8-byte multiples, not 16)
                    entry = tl.multiple_of(page * s1_0 + (j1 % ROWS_PER_PAGE) * s1_1, ENTRY_ALIGN)
                    ptrs1 = r1_ptr + entry[:, None] + cols[None, :] * s1_2
                if SAME:  # the second run holds rows of the first's dtype: one load from either run
                    rows = tl.load(tl.where(in0[:, None], ptrs0, ptrs1), mask=mask0 | mask1, other=0.0)
                else:
                    if RUN1 == 3:  # the fp8 codec decodes to bf16 rows, then to its compute dtype
                        other = fp8_kv_rows(r1_ptr, r1_16_ptr, entry, in1, cols, D, NOPE, ROPE, BLOCK_K, BLOCK_D)
                    else:
                        other = tl.load(ptrs1, mask=mask1, other=0.0)
                    # rows of the first run where they are, the second's (cast as `concat_rows` does) elsewhere
                    rows = tl.load(ptrs0, mask=mask0, other=round_to(round_to(other, MID), row_dtype))

            logits = dot(q, tl.trans(rows), WIDEN_DOTS) * scale
            logits = tl.where(valid[None, :], logits, float("-inf"))
            largest = tl.max(logits, axis=1)
            if SPLIT != 1:
                new_max = tl.maximum(run_max, largest)
                # a head that has seen no used slot yet keeps a finite shift, so its exp() terms are exactly 0
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                rescale = exp(run_max - shift, LIBDEVICE)
                p = exp(logits - shift[:, None], LIBDEVICE)
                denom = denom * rescale + tl.sum(p, axis=1)
                acc = acc * rescale[:, None] + dot(round_to(p, row_dtype), rows, WIDEN_DOTS)
                run_max = new_max
        if SPLIT == 1:
            tl.store(block_max + lo // BLOCK_K, largest, mask=head_ok)

    if SPLIT == 2:  # the split's running max, sum and accumulator, for `_split_combine_kernel`
        part = ((b * S + s) * tl.num_programs(2) + tl.program_id(2)) * H + heads  # [BLOCK_H]
        tl.store(ml_ptr + 2 * part, run_max, mask=head_ok)
        tl.store(ml_ptr + 2 * part + 1, denom, mask=head_ok)
        tl.store(part_ptr + part[:, None].to(tl.int64) * D + cols[None, :], acc,
                 mask=head_ok[:, None] & col_ok[None, :])
    elif SPLIT == 0:
        _finish(acc, run_max, denom, sink_ptr, out_ptr, so_b, so_s, so_h, so_d, cos_ptr, sin_ptr, sc_b, sc_s, HALF,
                lse_ptr, b, s, S, H, heads, head_ok, cols, col_ok, D, BLOCK_H, BLOCK_D, LIBDEVICE, ROTATE, LSE)


@triton.jit
def _finish(acc, run_max, denom, sink_ptr, out_ptr, so_b, so_s, so_h, so_d, cos_ptr, sin_ptr, sc_b, sc_s, HALF,
            lse_ptr, b, s, S, H, heads, head_ok, cols, col_ok, D: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_D: tl.constexpr, LIBDEVICE: tl.constexpr, ROTATE: tl.constexpr, LSE: tl.constexpr):
    """The sink into the denominator, the output normalised, rounded, rotated back where asked, stored: acc
    [BLOCK_H, BLOCK_D] and denom [BLOCK_H] are relative to run_max [BLOCK_H] (-inf: no used slot)."""
    sink = tl.load(sink_ptr + heads, mask=head_ok, other=0.0)
    shift = tl.where(run_max == float("-inf"), sink, run_max)
    denom = denom + exp(sink - shift, LIBDEVICE)
    if LSE:  # (what a training step's backward recomputes the probabilities from)
        tl.store(lse_ptr + (b * S + s) * H + heads, shift + tl.log(denom), mask=head_ok)
    out = round_to(tl.math.div_rn(acc, tl.broadcast_to(denom[:, None], (BLOCK_H, BLOCK_D))), out_ptr.dtype.element_ty)
    if ROTATE:  # `rope(out, cos, -sin)` on the stored values: products rounded, then the sums (launched unfused)
        ev, od = tl.split(tl.reshape(out.to(tl.float32), (BLOCK_H, BLOCK_D // 2, 2)))
        pair = tl.arange(0, BLOCK_D // 2)
        first = D // 2 - HALF
        turn = (pair >= first) & (pair < D // 2)
        trig = b * sc_b + s * sc_s + (pair - first)
        c = tl.load(cos_ptr + trig, mask=turn, other=1.0)[None, :]
        sn = -tl.load(sin_ptr + trig, mask=turn, other=0.0)[None, :]
        dt = out_ptr.dtype.element_ty
        ev2 = tl.where(turn[None, :], round_to(ev * c - od * sn, dt).to(tl.float32), ev)
        od2 = tl.where(turn[None, :], round_to(ev * sn + od * c, dt).to(tl.float32), od)
        out = round_to(tl.reshape(tl.join(ev2, od2), (BLOCK_H, BLOCK_D)), dt)
    o_ptrs = out_ptr + b * so_b + s * so_s + heads[:, None].to(tl.int64) * so_h + cols[None, :] * so_d
    tl.store(o_ptrs, out, mask=head_ok[:, None] & col_ok[None, :])


@triton.jit
def _split_combine_kernel(
    part_ptr, ml_ptr, n_split, sink_ptr,
    out_ptr, so_b, so_s, so_h, so_d,
    cos_ptr, sin_ptr, sc_b, sc_s, HALF,
    S, H,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, LIBDEVICE: tl.constexpr, ROTATE: tl.constexpr,
):
    """A query's splits merged, then `_finish`: each split's sum and accumulator rescaled from its own running max
    to the largest, as the online softmax rescales from one block to the next."""
    b, s, heads, cols, head_ok, col_ok = query_tile(S, H, D, BLOCK_H, BLOCK_D)
    first = (b * S + s) * n_split * H + heads  # [BLOCK_H]: split 0's (query, head) partial
    run_max = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    for i in range(0, n_split):
        run_max = tl.maximum(run_max, tl.load(ml_ptr + 2 * (first + i * H), mask=head_ok, other=float("-inf")))
    shift = tl.where(run_max == float("-inf"), 0.0, run_max)
    denom = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for i in range(0, n_split):
        part = first + i * H
        rescale = exp(tl.load(ml_ptr + 2 * part, mask=head_ok, other=float("-inf")) - shift, LIBDEVICE)
        denom += rescale * tl.load(ml_ptr + 2 * part + 1, mask=head_ok, other=0.0)
        acc += rescale[:, None] * tl.load(part_ptr + part[:, None].to(tl.int64) * D + cols[None, :],
                                          mask=head_ok[:, None] & col_ok[None, :], other=0.0)
    _finish(acc, run_max, denom, sink_ptr, out_ptr, so_b, so_s, so_h, so_d, cos_ptr, sin_ptr, sc_b, sc_s, HALF,
            sink_ptr, b, s, S, H, heads, head_ok, cols, col_ok, D, BLOCK_H, BLOCK_D, LIBDEVICE, ROTATE, False)


# ---------------------------------------------------------------------------------------------- host side


def _runs(runs: Tensor | Sequence[KVRows]) -> list[KVRows]:
    return [runs] if isinstance(runs, Tensor) else list(runs)


def _second_run_kind(run: KVRows, d: int) -> int | None:
    """What the kernel's RUN1 is for this second run, or None when the kernel does not read it."""
    if isinstance(run, Tensor):
        return _DENSE if run.dtype in _FLOATS else None
    if not isinstance(run, PagedRows):
        return None
    pool, table = run.pool, run.table
    if pool.dim() != 3 or table.dim() != 2 or table.dtype not in (torch.int32, torch.int64):
        return None
    if run.count > table.shape[1] * pool.shape[1]:
        return None
    codec = run.codec
    if codec is None:
        return _PAGED if pool.dtype in _FLOATS and pool.shape[-1] == d else None
    # codecs are recognised by the format they name (`dsv4.kernels.RowCodec`), not by class: the kernels sit
    # below the KV formats and never import them
    fmt, kind, compute = getattr(codec, "format", None), getattr(codec, "kind", None), getattr(codec, "compute", None)
    stored = getattr(codec, "stored", None)
    if stored is not None and kind == "kv":  # a cast codec: rows stored in one float dtype, computed in another
        ok = stored == pool.dtype and pool.dtype in _FLOATS and compute in _FLOATS
        return _PAGED if ok and pool.shape[-1] == d else None
    if fmt == "fp8" and kind == "kv":
        return _PAGED_FP8 if compute in _FLOATS and fp8_kv_pool(codec, pool, d) else None
    return None


def fp8_kv_pool(codec: RowCodec, pool: Tensor, d: int) -> bool:
    """Whether `pool` [pages, rows, bytes] holds the "fp8" main-KV rows of width d that `fp8_kv_rows` decodes (the
    codec's format and kind checked by the caller)."""
    # the rope dims are read as int16: an even nope width and even byte strides keep them 2-byte aligned
    rope = getattr(codec, "rope_dim", -1)
    return (getattr(codec, "dim", None) == d and 0 <= rope <= d and (d - rope) % 2 == 0
            and pool.dtype == torch.uint8 and pool.dim() == 3
            and pool.shape[-1] == fp8_entry_bytes(d, rope) and pool.stride(2) == 1
            and pool.stride(0) % 2 == 0 and pool.stride(1) % 2 == 0 and pool.storage_offset() % 2 == 0)


def fp8_entry_bytes(d: int, rope: int) -> int:
    """Bytes of one "fp8" main-KV entry (`dsv4.kv_formats.fp8`, spec 4.2): the nope dims' e4m3 codes, the rope dims'
    bf16 bytes, one ue8m0 scale per 64 nope dims padded to a multiple of 8 bytes (584 for V4's D 512, R 64)."""
    nope = d - rope
    scales = triton.cdiv(nope, 64)
    return nope + 2 * rope + triton.cdiv(scales, 8) * 8


def _first_run_kind(run: KVRows, b: int, d: int) -> int | None:
    """What the kernel's RUN0 is for this first run (0 dense [B, n, D]; 1 a `PagedRows` of compute rows, 2 of the
    fp8 main-KV layout decoding to bf16, either one whose batch row i is the whole pool row table[i, 0]: a window
    ring per cache slot, `LayerCacheRows.window_rows`), or None when the kernel does not read it."""
    if isinstance(run, Tensor):
        return 0 if run.dim() == 3 and run.shape[0] == b and run.shape[2] == d and run.dtype in _FLOATS else None
    if not isinstance(run, PagedRows):
        return None
    pool, table = run.pool, run.table
    if not (pool.dim() == 3 and run.count <= pool.shape[1] and table.dim() == 2 and table.shape[0] == b
            and table.shape[1] >= 1 and table.dtype in (torch.int32, torch.int64)):
        return None
    if run.codec is None:
        return 1 if pool.dtype in _FLOATS and pool.shape[2] == d else None
    return 2 if fp8_first_run(run, d) else None


def fp8_first_run(run: PagedRows, d: int) -> bool:
    """Whether the kernel decodes `run`'s rows itself as a first run: the fp8 main-KV layout of width d in bf16."""
    codec = run.codec
    return (getattr(codec, "format", None) == "fp8" and getattr(codec, "kind", None) == "kv"
            and getattr(codec, "compute", None) == torch.bfloat16 and fp8_kv_pool(codec, run.pool, d))


def _tensors(run: KVRows) -> list[Tensor]:
    return [run] if isinstance(run, Tensor) else [run.pool, run.table]


def covers_rotation(q: Tensor, cos: Tensor | None, sin: Tensor | None) -> bool:
    """The output rotation the kernel takes: none, or cos / sin fp32 [B, S, half] with a unit last stride,
    2*half <= D (even), no gradient wanted."""
    if cos is None and sin is None:
        return True
    if cos is None or sin is None:
        return False
    b, s, _, d = q.shape
    half = cos.shape[-1]
    return (d % 2 == 0 and 0 < 2 * half <= d and all(
        t.dtype == torch.float32 and tuple(t.shape) == (b, s, half) and t.stride(-1) == 1 and t.device == q.device
        and not (torch.is_grad_enabled() and t.requires_grad) for t in (cos, sin)) and cos.stride() == sin.stride())


def covers(q: Tensor, runs: Sequence[KVRows], idx: Tensor, sink: Tensor) -> bool:
    """True when the kernel handles these inputs directly (else the backend falls back to the reference): a first
    run dense or of one page per batch row (`_paged_first_run`) and at most one more run (dense, or paged with
    codec None, a `CastCodec` or the fp8 "kv" `PackedCodec`), float32/bfloat16/float16 tensors (no fp64),
    head_dim <= MAX_HEAD_DIM, no gradient wanted, all on one device. Whether Triton runs on that device (CUDA, or
    the CPU under TRITON_INTERPRET=1) is the backend's check, not this one."""
    runs = _runs(runs)
    if not 1 <= len(runs) <= 2:
        return False
    if q.dim() != 4 or idx.dim() != 3 or sink.dim() != 1:
        return False
    b, s, h, d = q.shape
    if not 0 < d <= MAX_HEAD_DIM:
        return False
    if idx.dtype not in (torch.int32, torch.int64) or tuple(idx.shape[:2]) != (b, s) or sink.shape[0] != h:
        return False
    first = _first_run_kind(runs[0], b, d)
    if first is None:
        return False
    if q.dtype not in _FLOATS or sink.dtype not in _FLOATS:
        return False
    if len(runs) == 2:
        second = runs[1]
        kind = _second_run_kind(second, d)
        if kind is None or (first == 2 and not (kind == _PAGED_FP8 and second.codec.compute == torch.bfloat16)):
            return False
        if isinstance(second, Tensor):
            if second.dim() != 3 or second.shape[0] != b or second.shape[2] != d:
                return False
        elif second.table.shape[0] != b:
            return False
    tensors = [q, idx, sink] + [t for run in runs for t in _tensors(run)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device == q.device for t in tensors)


def _launch_config(h: int, d: int, f32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps, num_stages). tl.dot wants every dim >= 16. With 16-bit rows (tensor-core
    dots) the heads per program are capped so the fp32 accumulator [BLOCK_H, BLOCK_D] stays within 16K elements:
    32 heads for V4's D = 512, which ptxas fits in registers without spills at 8 warps and 2 stages for a dense
    window plus dense, paged or fp8 entries. fp32 dots run on the FMA units and take far more registers and
    shared memory: 16 heads, one stage, and more warps as D grows. ptxas spills ~200 bytes a thread of these at
    D = 128 (the fp32 small preset's) and 2-6 KB at D = 256-512 whatever the warps (`triton_hopper_build.py
    --resources`): V4's own D = 512 runs in bf16."""
    block_d = max(16, triton.next_power_of_2(d))
    if f32:
        return 16, block_d, 4 if block_d <= 32 else 8 if block_d <= 128 else 16, 1
    block_h = min(max(16, triton.next_power_of_2(h)), max(16, 16384 // block_d))
    return block_h, block_d, 4 if block_h * block_d <= 4096 else 8, 2


def sparse_attn(q: Tensor, runs: Sequence[KVRows], idx: Tensor, sink: Tensor, scale: float,
                cos: Tensor | None = None, sin: Tensor | None = None, lse: Tensor | None = None) -> Tensor:
    """[B,S,H,D] like ReferenceBackend.sparse_attn: attention of each query over the rows idx [B, S, K] names in
    the concatenation of `runs` (-1 = unused slot), with the per-head sink logit in the denominator only; with cos
    / sin [B, S, half], the output's last 2*half dims rotated back as it is written (`rope_back`: the stored values
    rotated by the negative angle, each product rounded before its sum: the kernel is then launched unfused,
    which leaves the softmax's products and sums unfused too, as the reference's are). Inputs must satisfy
    `covers` and `covers_rotation` (ValueError otherwise). `lse` [B, S, H] fp32 contiguous, where given, receives
    each head's log-sum-exp over its slots and the sink (a training step's backward, `attention_grad.py`)."""
    if not (covers(q, runs, idx, sink) and covers_rotation(q, cos, sin)):
        raise ValueError("triton sparse_attn does not cover these inputs (check `covers` first)")
    runs = _runs(runs)
    b, s, h, d = q.shape
    k = idx.shape[2]
    out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if k == 0:  # no slot: the sink alone, so every output is 0 (and so is its rotation)
        if lse is not None:
            lse.copy_(sink.to(torch.float32).expand(b, s, h))
        return out.zero_()
    run0 = _first_run_kind(runs[0], b, d)
    first, n0 = (runs[0].pool, runs[0].count) if run0 else (runs[0], runs[0].shape[1])
    table0 = runs[0].table if run0 else idx  # (a stand-in for a dense first run: never read)
    row_dtype = runs[0].dtype  # (a paged run's compute dtype)
    if n0 == 0:  # an empty tensor may have no storage; the kernel never reads this stand-in
        first, run0 = torch.zeros(b, 1, d, dtype=row_dtype, device=first.device), 0

    kind, n1, mid, rope, rows_per_page, align = _NO_RUN, 0, row_dtype, 0, 1, 1
    second, table = first, idx  # stand-ins for the pointers of a missing second run (never read)
    if len(runs) == 2 and (runs[1].shape[1] if isinstance(runs[1], Tensor) else runs[1].count) > 0:
        run = runs[1]
        kind = _second_run_kind(run, d)
        if isinstance(run, Tensor):
            n1, second, mid = run.shape[1], run, run.dtype
        else:
            n1, second, table, rows_per_page = run.count, run.pool, run.table, run.pool.shape[1]
            mid = run.pool.dtype if run.codec is None else run.codec.compute
            rope = run.codec.rope_dim if kind == _PAGED_FP8 else 0
            align = math.gcd(16, *second.stride()[:2])
    # fp8 rings beside fp8 entries: the kernel finds an entry of either as an offset from the rings' pool
    pools_apart = second.data_ptr() - first.data_ptr() if run0 == 2 and kind == _PAGED_FP8 else 0
    if run0 == 2:  # (the entries' alignment in both pools, and the pools' distance)
        rope, align = runs[0].codec.rope_dim, math.gcd(align if kind else 16, *first.stride()[:2], pools_apart)
    second16 = second.view(torch.int16) if kind == _PAGED_FP8 else second
    first16 = first.view(torch.int16) if run0 == 2 else first
    t_b, t_p = (table.stride(0), table.stride(1)) if kind in (_PAGED, _PAGED_FP8) else (0, 0)
    same = kind in (_DENSE, _PAGED) and second.dtype == row_dtype and mid == row_dtype
    qk_f32 = q.dtype != row_dtype or row_dtype == torch.float32
    block_h, block_d, num_warps, num_stages = _launch_config(h, d, qk_f32)
    grid = (b * s, triton.cdiv(h, block_h))
    rotate = cos is not None
    chunk, n_split = k, 1
    if lse is None:
        chunk, n_split = split_slots(grid[0] * grid[1], k, block_h * block_d, q.device)
    split = n_split > 1
    part = ml = block_max = sink  # (stand-ins, never read, unless split)
    n_blocks = triton.cdiv(k, ATTN_BLOCK)
    if split:
        part = torch.empty(b * s, n_split, h, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(b * s, n_split, h, 2, dtype=torch.float32, device=q.device)
        block_max = torch.empty(b * s, h, n_blocks, dtype=torch.float32, device=q.device)
    trig = (cos, sin, cos.stride(0), cos.stride(1), cos.shape[-1]) if rotate else (sink, sink, 0, 0, 0)
    sink = sink.to(torch.float32).contiguous()
    for phase in (1, 2) if split else (0,):
        _sparse_attn_kernel[(*grid, n_split)](
            q, *q.stride(),
            idx, *idx.stride(),
            sink,
            out, *out.stride(),
            first, *first.stride(), n0,
            first16, pools_apart,
            table0, table0.stride(0),
            second, *second.stride(), n1,
            second16,
            table, t_b, t_p,
            *trig,
            lse if lse is not None else sink,
            part, ml, chunk, block_max, n_blocks,
            s, h, k, float(scale),
            D=d, RUN0=run0, ROW_DT=TL_DTYPES[row_dtype], RUN1=kind, ROWS_PER_PAGE=rows_per_page, ENTRY_ALIGN=align,
            MID=TL_DTYPES[mid],
            NOPE=d - rope, ROPE=rope, SAME=same, QK_F32=qk_f32, WIDEN_DOTS=interpreting(), BLOCK_H=block_h,
            BLOCK_D=block_d, BLOCK_K=ATTN_BLOCK, LIBDEVICE=libdevice_exp(), ROTATE=rotate, LSE=lse is not None,
            SPLIT=phase,
            num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=not rotate,
        )
    if split:
        _split_combine_kernel[grid](
            part, ml, n_split, sink, out, *out.stride(), *trig, s, h,
            D=d, BLOCK_H=block_h, BLOCK_D=block_d, LIBDEVICE=libdevice_exp(), ROTATE=rotate,
            num_warps=4 if block_h * block_d <= 4096 else 8, enable_fp_fusion=not rotate,
        )
    return out


# the least work (slot blocks x heads x dims a program) worth splitting: four of V4-Flash's blocks (32 heads of 512).
# A split costs two launches more (a pass of block maxima, a merge), which a short walk does not repay: the small
# preset's decode (16 heads of 128, 4 blocks) stays whole, V4-Flash's (10 blocks of 32 x 512) splits.
MIN_SPLIT_WORK = 4 * 32 * 512


def split_slots(programs: int, k: int, block_work: int, device: torch.device) -> tuple[int, int]:
    """(slots a program walks, programs a query's heads take): all K slots in one program, unless the queries'
    programs would leave most processors idle, as a decode step's few do (V4-Flash at batch 1: 2 programs for its
    64 heads on 132 processors), and a program's walk is long: several 64-slot blocks, and at least
    `MIN_SPLIT_WORK` in all (`block_work`: BLOCK_H x BLOCK_D, a block's heads and dims). Then each of `splits`
    programs walks its
    own whole blocks and leaves its running max, sum and accumulator, which `_split_combine_kernel` merges
    ("flash-decoding"). To keep the reference's rounding, a first pass of the same programs writes each block's
    largest logit, and the second starts each split from the running max the blocks before it leave: every block's
    p is then taken against (and rounded at) the reference's max. Only the fp32 sums' order differs."""
    blocks = triton.cdiv(k, ATTN_BLOCK)
    available = gemm.processors(device)
    if blocks < 2 or blocks * block_work < MIN_SPLIT_WORK or 2 * programs > available:
        return k, 1
    per_split = triton.cdiv(blocks, min(blocks, triton.cdiv(available, programs)))
    return per_split * ATTN_BLOCK, triton.cdiv(blocks, per_split)


__all__ = ["ATTN_BLOCK", "covers", "covers_rotation", "sparse_attn"]
