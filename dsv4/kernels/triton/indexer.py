"""The lightning indexer's scores as one Triton kernel (the seam's `index_scores`).

``I[b, t, j] = sum_h w[b, t, h] * ReLU(q[b, t, h] . K[b, j])``: one program per (block of entries, block of
queries, batch row) loads its keys tile [BLOCK_N, D] once and walks the heads in order 0..Hi-1: the head's query
tile [BLOCK_S, D] times the keys via ``tl.dot`` with fp32 accumulation, ReLU, times the head's weight per query,
added into an fp32 accumulator [BLOCK_S, BLOCK_N] one head after the other (a sequential sum, like torch's over a
16-bit head dim), stored once. Given each query's visible entry count, a program whose entries no query of its
block sees returns at once (a static decode step reads up to twice the entries its rows hold; a batch's short rows
read as many as its longest), leaving those scores unspecified: the top-k masks them. The keys may be the engine's
pages, read in place through the block table (`PagedRows`), in q's dtype or in the fp8 format's FP4 layout (68
bytes a V4 key: packed e2m1 pairs and a ue8m0 scale per 32 dims, DeepGEMM's ``fp8_fp4_paged_mqa_logits`` input),
decoded in registers to the bf16 keys the reference scores: no per-step copy of every key.

Numerics against `ReferenceBackend.index_scores` (torch's einsum, ReLU, product, sum over heads): the output has
the reference's dtype (q's, promoted with the weights'), and the kernel rounds where the reference does: with
16-bit queries and keys each head's score is rounded to their dtype (torch's 16-bit matmul accumulates in fp32 and
rounds its output), the weighted score to the output dtype, the sum is accumulated in fp32 and rounded once. What
differs is the summation order inside each dot (and torch's order over 8+ fp32 heads, which it sums in a blocked
order), so fp32 results agree to fp32 rounding and 16-bit ones are the reference's bits except where a dot lands
on the other side of a rounding boundary (one 16-bit step of one head's term).

Under Triton's CPU interpreter 16-bit dots are computed as fp32 ones (exact; the interpreter's bf16 dot is
broken) and bf16 rounding goes through `numerics.round_to`; on the GPU 16-bit dots run on the tensor cores and
fp32 ones with ``input_precision="ieee"`` (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..paged import KVRows, PagedRows
from .kv_rows import covers_load, fp4_key_bits, fp4_keys
from .numerics import TL_DTYPES, dot, interpreting, round_to

MAX_DIM = 256  # one keys tile [BLOCK_N, D] per program (V4: index_head_dim 128)
_MAX_GRID_YZ = 65535  # CUDA's limit on the second and third grid dimensions

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _index_scores_kernel(
    q_ptr, q_sb, q_ss, q_sh, q_sd,
    k_ptr, k_sb, k_sn, k_sd,  # dense keys [B, N, D]; paged: the pool [pages, rows_per_page, width] (k_sd unused)
    tab_ptr, t_sb, t_sp,  # paged keys: the block table [B, pages]
    w_ptr, w_sb, w_ss, w_sh,
    out_ptr, o_sb, o_ss, o_sn,
    vis_ptr, v_sb, v_ss,  # the entries each query sees (HAS_VISIBLE): a tile past all its queries' is skipped
    S, N, weight_scale,
    HAS_VISIBLE: tl.constexpr,
    KEYS: tl.constexpr,  # 0 dense, 1 paged rows of q's dtype, 2 paged fp4 keys (the fp8 format's, decoded here)
    ROWS_PER_PAGE: tl.constexpr,
    HEADS: tl.constexpr, D: tl.constexpr, SCORE: tl.constexpr, OUT: tl.constexpr, WIDEN_DOTS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SCALED: tl.constexpr, W_DT: tl.constexpr,  # SCALED: the weights times weight_scale first, rounded to W_DT
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)  # query positions (int64)
    ents = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # entries (int64)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < S
    ent_ok = ents < N
    dim_ok = dims < D
    if HAS_VISIBLE:  # no query of the tile sees an entry of it: nothing to score (its top-k masks these)
        seen = tl.load(vis_ptr + b * v_sb + rows * v_ss, mask=row_ok, other=0)
        if pid_n * BLOCK_N >= tl.max(seen, axis=0):
            return

    # the keys tile [BLOCK_N, BLOCK_D], read once and used by every head (transposed for the dots)
    if KEYS == 0:
        keys = tl.load(k_ptr + b * k_sb + ents[:, None] * k_sn + dims[None, :] * k_sd,
                       mask=ent_ok[:, None] & dim_ok[None, :], other=0.0)
    else:  # entry j of batch row b: pool[table[b, j // rows_per_page], j % rows_per_page]
        page = tl.load(tab_ptr + b * t_sb + (ents // ROWS_PER_PAGE) * t_sp, mask=ent_ok, other=0).to(tl.int64)
        entry = page * k_sb + (ents % ROWS_PER_PAGE) * k_sn
        if KEYS == 1:
            keys = tl.load(k_ptr + entry[:, None] + dims[None, :], mask=ent_ok[:, None] & dim_ok[None, :], other=0.0)
        else:
            keys = fp4_key_bits(k_ptr, entry, ent_ok, dims, D).to(tl.bfloat16, bitcast=True)
    keys_t = tl.trans(keys)
    q_rows = q_ptr + b * q_sb + rows[:, None] * q_ss + dims[None, :] * q_sd  # the head's [BLOCK_S, BLOCK_D]
    q_mask = row_ok[:, None] & dim_ok[None, :]
    w_rows = w_ptr + b * w_sb + rows * w_ss  # the head's weight per query [BLOCK_S]

    acc = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    for _ in range(HEADS):  # in head order: the sum is sequential
        q = tl.load(q_rows, mask=q_mask, other=0.0)
        score = round_to(dot(q, keys_t, WIDEN_DOTS), SCORE).to(tl.float32)  # the reference's einsum output
        score = tl.where(score < 0.0, 0.0, score)  # ReLU (NaN stays NaN, like torch's)
        w = tl.load(w_rows, mask=row_ok, other=0.0).to(tl.float32)
        if SCALED:  # (torch's `weights * weight_scale`: the product in fp32, rounded to the weights' dtype)
            w = round_to(w * weight_scale, W_DT).to(tl.float32)
        acc += round_to(score * w[:, None], OUT).to(tl.float32)
        q_rows += q_sh  # on to the next head (pointer arithmetic: 64-bit)
        w_rows += w_sh

    tl.store(out_ptr + b * o_sb + rows[:, None] * o_ss + ents[None, :] * o_sn, round_to(acc, OUT),
             mask=row_ok[:, None] & ent_ok[None, :])


def out_dtype(q: Tensor, weights: Tensor) -> torch.dtype:
    """The dtype of the reference's result: the scores' (q's) promoted with the weights'."""
    return torch.promote_types(q.dtype, weights.dtype)


def covers(q: Tensor, keys: KVRows, weights: Tensor, visible: Tensor | None = None) -> bool:
    """Whether the kernel takes these inputs: q [B, S, Hi, D] and keys [B, N, D] of one dtype (or paged, see
    `_keys_kind`), weights [B, S, Hi],
    all fp32 / bf16 / fp16 on one device, non-empty, D <= `MAX_DIM`, no gradient wanted (the reference is
    differentiable, the kernel is not), and `visible` None or integer [B, S] there. `_runs_here` is the backend's
    check, not this one."""
    if visible is not None and (not isinstance(visible, Tensor) or visible.dtype not in (torch.int32, torch.int64)
                                or tuple(visible.shape) != tuple(q.shape[:2]) or visible.device != q.device):
        return False
    if not all(isinstance(t, Tensor) for t in (q, weights)) or q.dim() != 4 or weights.dim() != 3:
        return False
    b, s, h, d = q.shape
    if _keys_kind(keys, q) is None:
        return False
    n = keys.count if isinstance(keys, PagedRows) else keys.shape[1]
    if tuple(weights.shape) != (b, s, h):
        return False
    if min(b, s, h, d, n) == 0 or d > MAX_DIM:
        return False
    if q.dtype not in _FLOATS or weights.dtype not in _FLOATS:
        return False
    block_s, block_n, _, _ = _launch_config(s, d, q.dtype == torch.float32)
    if b > _MAX_GRID_YZ or triton.cdiv(s, block_s) > _MAX_GRID_YZ or triton.cdiv(n, block_n) >= 2**31:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, weights)):
        return False
    return weights.device == q.device


def _keys_kind(keys: KVRows, q: Tensor) -> int | None:
    """The kernel's KEYS for these keys and queries q [B, S, Hi, D], or None when it does not read them: dense [B, N,
    D] keys of q's dtype (no gradient wanted), or paged keys (`PagedRows`, the engine's) of q's dtype or in the fp8
    format's fp4 layout with bf16 queries, through a table of q's batch rows."""
    b, d = q.shape[0], q.shape[-1]
    if isinstance(keys, Tensor):
        ok = (keys.dim() == 3 and keys.shape[0] == b and keys.shape[2] == d and keys.dtype == q.dtype
              and keys.device == q.device and not (torch.is_grad_enabled() and keys.requires_grad))
        return 0 if ok else None
    # (the pages `kv_rows.load_rows` reads: a table that addresses the rows, a layout its kernel decodes)
    if not covers_load(keys) or keys.table.shape[0] != b or keys.pool.device != q.device:
        return None
    if keys.codec is None:
        return 1 if keys.pool.dtype == q.dtype and keys.pool.shape[-1] == d else None
    return 2 if q.dtype == torch.bfloat16 and fp4_keys(keys, d) else None


def _launch_config(s: int, d: int, f32: bool) -> tuple[int, int, int, int]:
    """(BLOCK_S, BLOCK_N, BLOCK_D, num_warps): 64 entries and the whole head dim per program, as many queries as
    there are up to a cap (tl.dot wants every dim >= 16, so a decode step's 1 or 2 queries are padded to 16).
    16-bit dots run on the tensor cores (wgmma from 64 queries): up to 64 queries, 8 warps (4 for 16 queries).
    fp32 ones run on the FMA units and hold far more registers: up to 32 queries (16 beyond D = 128), 8 warps.
    No spills for D <= 256 by ptxas for sm_90 (about 170 registers at 64 x 64 x 128 bf16, 100 at 32 x 64 x 128
    fp32)."""
    block_d = max(16, triton.next_power_of_2(d))
    cap = (32 if block_d <= 128 else 16) if f32 else 64
    block_s = min(cap, max(16, triton.next_power_of_2(s)))
    return block_s, 64, block_d, 4 if block_s == 16 and not f32 else 8


def index_scores(q: Tensor, keys: KVRows, weights: Tensor, visible: Tensor | None = None,
                 weight_scale: float = 1.0) -> Tensor:
    """[B, S, N] like ReferenceBackend.index_scores: sum over heads h in order of weights[b, t, h] *
    ReLU(q[b, t, h] . keys[b, j]) (the weights times `weight_scale` first); with `visible` [B, S], the tiles of
    entries no query of theirs sees are not computed (left as allocated). Inputs must satisfy `covers` (ValueError
    otherwise)."""
    if not covers(q, keys, weights, visible):
        raise ValueError("triton index_scores does not cover these inputs (check `covers` first)")
    b, s, h, d = q.shape
    kind = _keys_kind(keys, q)
    paged = kind != 0
    n = keys.count if paged else keys.shape[1]
    dtype = out_dtype(q, weights)
    out = torch.empty(b, s, n, dtype=dtype, device=q.device)
    block_s, block_n, block_d, num_warps = _launch_config(s, d, q.dtype == torch.float32)
    if kind == 2:  # (decoding FP4 keys takes registers: at 4 warps a decode step's tile spills, ptxas for sm_90)
        num_warps = 8
    grid = (triton.cdiv(n, block_n), triton.cdiv(s, block_s), b)
    _index_scores_kernel[grid](
        q, *q.stride(),
        *((keys.pool, keys.pool.stride(0), keys.pool.stride(1), 1) if paged else (keys, *keys.stride())),
        *((keys.table, *keys.table.stride()) if paged else (q, 0, 0)),
        weights, *weights.stride(),
        out, *out.stride(),
        q if visible is None else visible, *((0, 0) if visible is None else visible.stride()),
        s, n, float(weight_scale),
        HAS_VISIBLE=visible is not None, KEYS=kind, ROWS_PER_PAGE=keys.pool.shape[1] if paged else 1, HEADS=h, D=d,
        SCORE=TL_DTYPES[q.dtype], OUT=TL_DTYPES[dtype],
        WIDEN_DOTS=interpreting(), BLOCK_S=block_s, BLOCK_N=block_n, BLOCK_D=block_d,
        SCALED=weight_scale != 1.0, W_DT=TL_DTYPES[weights.dtype], num_warps=num_warps, num_stages=2,
    )
    return out


__all__ = ["MAX_DIM", "covers", "index_scores", "out_dtype"]
