"""Routed experts as two grouped GEMM launches over rows sorted by expert (FP8, packed-FP4 or float weights).

The reference runs expert by expert (a mask, a gather and three GEMMs each, 256 experts in a V4 layer). Here
the routed rows are sorted by expert once (`group_routed_rows`: the reference's row groups, token order inside
each; on the device `_schedule_kernel`), the tokens quantised once, and the sorted rows cut into tiles that never
straddle two experts; each program of a launch takes one tile and one block of output columns and finds its
expert's weights through a table of pointers (no stacked copy of the weights):

1. gate and up together, each sorted row reading its token's quantised row: ``h = w * silu(min(w1 x, L)) *
   clamp(w3 x, -L, L)``, each projection rounded to the activation dtype first as the reference's linear returns
   it, the routing weight applied before w2;
2. down: ``w2 act_quant(h)``, written at the row's (token, slot) place;
3. `_combine_kernel`: each token's k outputs added in increasing expert id (`add_routed_rows`' order).

Each projection of quantised experts is the block-scaled GEMM of `gemm.py` (`fp8_tile` / `fp4_tile`) over the
activations quantised once; float experts (the weights in the activations' dtype, a plain model's) multiply the
activations as they are (`gemm.float_tile`: fp32 accumulation, fp32 dots without TF32), as the reference's linear
does. So the rounding is the reference's up to the order of additions inside a dot.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsv4.quant import FP4_BLOCK, FP8_BLOCK, is_packed_fp4_dtype

from ..experts import ExpertWeights, group_routed_rows
from . import quant
from .gemm import block_m_for, block_n_for, float_tile, fp4_tile, fp8_tile, span, store_tile
from .numerics import TL_DTYPES, exp, interpreting, libdevice_exp, round_to

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _tile_rows(tiles_ptr, tile, BLOCK_M: tl.constexpr):
    """The expert, rows and row mask of one tile: tiles_ptr holds (expert, first row, end row) per tile."""
    expert = tl.load(tiles_ptr + 3 * tile)
    lo = tl.load(tiles_ptr + 3 * tile + 1)
    hi = tl.load(tiles_ptr + 3 * tile + 2)
    rows = lo + tl.arange(0, BLOCK_M)
    return expert, rows.to(tl.int64), rows < hi


# the experts' weight format (constexpr FORMAT of the kernels)
_FP8, _FP4, _FLOAT = 0, 1, 2


@triton.jit
def _project(x_ptr, xs_ptr, w_ptrs, s_ptrs, expert, rows64, row_ok, cols64, col_ok, pid_n, K,
             stride_xm, stride_xsm, stride_wn, stride_wsn,
             FORMAT: tl.constexpr, W_DTYPE: tl.constexpr, WIDEN_DOTS: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """One tile of one expert's projection, fp32 [BLOCK_M, BLOCK_N]."""
    if FORMAT == 2:
        w = tl.multiple_of(tl.load(w_ptrs + expert).to(tl.pointer_type(W_DTYPE)), 16)
        acc = float_tile(x_ptr, w, rows64, row_ok, cols64, col_ok, K, stride_xm, stride_wn, BLOCK_M, BLOCK_N, 32,
                         WIDEN_DOTS)
    elif FORMAT == 1:
        w = tl.multiple_of(tl.load(w_ptrs + expert).to(tl.pointer_type(tl.uint8)), 16)
        s = tl.load(s_ptrs + expert).to(tl.pointer_type(tl.uint8))
        acc = fp4_tile(x_ptr, xs_ptr, w, s, rows64, row_ok, cols64, col_ok, K,
                       stride_xm, stride_xsm, stride_wn, stride_wsn, BLOCK_M, BLOCK_N, 32, 4)
    else:
        w = tl.multiple_of(tl.load(w_ptrs + expert).to(tl.pointer_type(tl.float8e4nv)), 16)
        s = tl.load(s_ptrs + expert).to(tl.pointer_type(tl.uint8))
        acc = fp8_tile(x_ptr, xs_ptr, w, s, rows64, row_ok, cols64, col_ok, pid_n * BLOCK_N // 128, K,
                       stride_xm, stride_xsm, stride_wn, stride_wsn, BLOCK_M, BLOCK_N, 128)
    return acc


@triton.jit
def _gate_up_kernel(x_ptr, xs_ptr, rw_ptr, keep_ptr, tiles_ptr, w1_ptrs, s1_ptrs, w3_ptrs, s3_ptrs, h_ptr, N, K,
                    limit, k, stride_xm, stride_xsm, stride_wn, stride_wsn, stride_hm,
                    FORMAT: tl.constexpr, W_DTYPE: tl.constexpr, WIDEN_DOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, LIBDEVICE: tl.constexpr, WEIGHTED: tl.constexpr):
    """Sorted rows `rows` of the tile: routed row keep[row] (token keep[row] // k, its routing weight
    rw[keep[row]] if WEIGHTED) -> hidden[row]."""
    pid_n = tl.program_id(1)
    expert, rows64, row_ok = _tile_rows(tiles_ptr, tl.program_id(0), BLOCK_M)
    if expert < 0:  # past the end of a schedule built on the device (its grid is an upper bound)
        return
    cols64, col_ok = span(pid_n, N, BLOCK_N)
    routed = tl.load(keep_ptr + rows64, mask=row_ok, other=0).to(tl.int64)
    tokens = routed // k
    out_ty = h_ptr.dtype.element_ty
    gate = _project(x_ptr, xs_ptr, w1_ptrs, s1_ptrs, expert, tokens, row_ok, cols64, col_ok, pid_n, K,
                    stride_xm, stride_xsm, stride_wn, stride_wsn, FORMAT, W_DTYPE, WIDEN_DOTS, BLOCK_M, BLOCK_N)
    up = _project(x_ptr, xs_ptr, w3_ptrs, s3_ptrs, expert, tokens, row_ok, cols64, col_ok, pid_n, K,
                  stride_xm, stride_xsm, stride_wn, stride_wsn, FORMAT, W_DTYPE, WIDEN_DOTS, BLOCK_M, BLOCK_N)
    gate = tl.minimum(round_to(gate, out_ty).to(tl.float32), limit)  # the linear's output dtype, then the clamp
    up = tl.minimum(tl.maximum(round_to(up, out_ty).to(tl.float32), -limit), limit)
    hidden = gate / (1.0 + exp(-gate, LIBDEVICE)) * up  # silu(gate) * up
    if WEIGHTED:
        hidden = tl.load(rw_ptr + routed, mask=row_ok, other=0.0)[:, None] * hidden
    store_tile(h_ptr, stride_hm, rows64, row_ok, cols64, col_ok, hidden)


@triton.jit
def _down_kernel(x_ptr, xs_ptr, keep_ptr, tiles_ptr, w_ptrs, s_ptrs, y_ptr, add_ptr, N, K,
                 stride_xm, stride_xsm, stride_wn, stride_wsn, stride_ym, stride_am,
                 FORMAT: tl.constexpr, W_DTYPE: tl.constexpr, WIDEN_DOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, ADD: tl.constexpr):
    """hidden[row] (sorted rows) -> y[keep[row]]: each routed row's output at its (token, slot) place; ADD: plus
    add[keep[row]] (fp32) after the output's rounding to y's dtype, the sum rounded again."""
    pid_n = tl.program_id(1)
    expert, rows64, row_ok = _tile_rows(tiles_ptr, tl.program_id(0), BLOCK_M)
    if expert < 0:
        return
    cols64, col_ok = span(pid_n, N, BLOCK_N)
    acc = _project(x_ptr, xs_ptr, w_ptrs, s_ptrs, expert, rows64, row_ok, cols64, col_ok, pid_n, K,
                   stride_xm, stride_xsm, stride_wn, stride_wsn, FORMAT, W_DTYPE, WIDEN_DOTS, BLOCK_M, BLOCK_N)
    routed = tl.load(keep_ptr + rows64, mask=row_ok, other=0).to(tl.int64)
    if ADD:
        acc = round_to(acc, y_ptr.dtype.element_ty).to(tl.float32) + tl.load(
            add_ptr + routed[:, None] * stride_am + cols64[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    store_tile(y_ptr, stride_ym, routed, row_ok, cols64, col_ok, acc)


@triton.jit
def _schedule_kernel(ids_ptr, keep_ptr, tiles_ptr, n, n_tiles, E, block_m, EP: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the routed rows ids.flatten() [n] sorted by expert, stably (keep [n]: the sorted order's
    rows), and the tiles [n_tiles, 3] (expert or -1 past the end, first row, end row) of at most block_m rows of
    one expert, in expert order; what `group_routed_rows` and the tile loops give, laid out on the device."""
    experts = tl.arange(0, EP)
    lane = tl.arange(0, BLOCK)
    counts = tl.zeros((EP,), tl.int32)
    for r0 in range(0, n, BLOCK):
        e = tl.load(ids_ptr + r0 + lane, mask=r0 + lane < n, other=-1)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    row_end = tl.cumsum(counts, 0)
    row_start = row_end - counts
    for r0 in range(0, n, BLOCK):
        ok = r0 + lane < n
        e = tl.load(ids_ptr + r0 + lane, mask=ok, other=-1)
        # each row's place: its expert's first row, then the rows of that expert before it
        place = tl.sum(tl.where(e[:, None] == experts[None, :], row_start[None, :], 0), axis=1)
        place += tl.sum(((e[:, None] == e[None, :]) & (lane[None, :] < lane[:, None])).to(tl.int32), axis=1)
        for j0 in range(0, r0, BLOCK):
            earlier = tl.load(ids_ptr + j0 + lane)
            place += tl.sum((e[:, None] == earlier[None, :]).to(tl.int32), axis=1)
        tl.store(keep_ptr + place, r0 + lane, mask=ok)
    tiles_of = (counts + block_m - 1) // block_m
    tile_end = tl.cumsum(tiles_of, 0)
    tile_start = tile_end - tiles_of
    for t0 in range(0, n_tiles, BLOCK):
        tile = t0 + lane
        expert = tl.sum((tile_end[None, :] <= tile[:, None]).to(tl.int32), axis=1)  # E (or more) past the end
        mine = experts[None, :] == tl.minimum(expert, E - 1)[:, None]  # (the spare tiles' rows: the last expert's)
        first = (tl.sum(tl.where(mine, row_start[None, :], 0), axis=1)
                 + (tile - tl.sum(tl.where(mine, tile_start[None, :], 0), axis=1)) * block_m)
        end = tl.sum(tl.where(mine, row_end[None, :], 0), axis=1)
        ok = tile < n_tiles
        tl.store(tiles_ptr + 3 * tile, tl.where(expert < E, expert, -1), mask=ok)
        tl.store(tiles_ptr + 3 * tile + 1, first, mask=ok)
        tl.store(tiles_ptr + 3 * tile + 2, end, mask=ok)


@triton.jit
def _combine_kernel(slots_ptr, ids_ptr, y_ptr, D, k, K_P: tl.constexpr, BD: tl.constexpr):
    """slots [T*k, D] (each routed row's output at its (token, slot) place) -> y [T, D] fp32: a token's k outputs
    added in increasing expert id, ties in slot order (`add_routed_rows`' order: the first two added, then each
    next one)."""
    t = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BD + tl.arange(0, BD)
    col_ok = col < D
    slot = tl.arange(0, K_P)
    ids = tl.load(ids_ptr + t * k + slot, mask=slot < k, other=0)
    before = (ids[None, :] < ids[:, None]) | ((ids[None, :] == ids[:, None]) & (slot[None, :] < slot[:, None]))
    rank = tl.sum((before & (slot < k)[None, :]).to(tl.int32), axis=1)  # [K_P] each slot's place in the order
    first = tl.sum(tl.where((rank == 0) & (slot < k), slot, 0), axis=0)
    y = tl.load(slots_ptr + (t * k + first) * D + col, mask=col_ok, other=0.0).to(tl.float32)
    for q in range(1, k):
        s = tl.sum(tl.where((rank == q) & (slot < k), slot, 0), axis=0)
        y += tl.load(slots_ptr + (t * k + s) * D + col, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * D + col, y, mask=col_ok)


class ExpertPointers:
    """Per expert table, the device arrays of every expert's weight and scale addresses (w1, s1, w3, s3, w2,
    s2), kept while the experts' tensors stay the same objects at the same addresses (checked for the experts
    about to run) and dropped with the table."""

    def __init__(self) -> None:
        self._tables: dict[int, tuple] = {}
        self._plans: dict[tuple, tuple] = {}
        self._singles: dict[tuple, list[Tensor]] = {}

    def get(self, experts: Sequence[ExpertWeights | None], which: list[int], device: torch.device) -> list[Tensor]:
        key = id(experts)
        entry = self._tables.get(key)
        if entry is not None and entry[0]() is experts and all(entry[2][e] == _stamp(experts[e]) for e in which):
            return entry[1]
        stamps = [_stamp(w) if w is not None else None for w in experts]
        columns = [[0] * len(experts) for _ in range(6)]
        for e, w in enumerate(experts):
            if w is not None:
                for i, t in enumerate((w.w1, w.s1, w.w3, w.s3, w.w2, w.s2)):
                    columns[i][e] = 0 if t is None else t.data_ptr()  # (float experts have no scales)
        arrays = [torch.tensor(c, dtype=torch.int64, device=device) for c in columns]
        try:
            owner = weakref.ref(experts, lambda _, k=key: self._tables.pop(k, None))
        except TypeError:  # a plain list: built for this call only
            return arrays
        self._tables[key] = (owner, arrays, stamps)
        return arrays

    def single(self, expert: ExpertWeights, device: torch.device) -> list[Tensor]:
        """The pointer arrays of one expert (a shared expert, whose `ExpertWeights` is built anew at each call),
        kept by its tensors' identities and addresses while its first weight lives."""
        key = (_stamp(expert), device)
        arrays = self._singles.get(key)
        if arrays is None:
            arrays = [torch.tensor([0 if t is None else t.data_ptr()], dtype=torch.int64, device=device)
                      for t in (expert.w1, expert.s1, expert.w3, expert.s3, expert.w2, expert.s2)]
            self._singles[key] = arrays
            weakref.finalize(expert.w1, self._singles.pop, key, None)
        return arrays

    def plan(self, x: Tensor, experts: Sequence[ExpertWeights | None]) -> TablePlan | None:
        """The plan for running every expert of `experts` on x with the schedule on the device, or None where the
        kernels do not take them all (an expert held elsewhere, mixed formats, float weights of another dtype than
        x's: see `covers`) or x.

        Validating a table reads every expert's weights (~1.7 us an expert: 0.4 ms for V4's 256), too slow for each
        call, so a plan is kept per table and device and checked on each call against the first and last
        experts' tensors only, which a move of the model (`.to`), a reload by assignment or a re-quantisation
        changes. The contract it rests on, which the engine keeps: a middle expert's tensors are not swapped alone
        while the table serves (an in-place load, `load_state_dict`'s copy, changes no pointer and needs no
        check)."""
        if x.dtype not in _FLOATS or (torch.is_grad_enabled() and x.requires_grad) or not len(experts):
            return None
        key = (id(experts), x.device, x.shape[-1], x.dtype)  # (float experts take activations of their dtype)
        entry = self._plans.get(key)
        ends = (experts[0], experts[len(experts) - 1])
        if entry is not None and entry[0]() is experts:
            plan, stamps = entry[1], entry[2]
            if stamps == tuple(None if w is None else _stamp(w) for w in ends):
                return plan
        plan = None
        if all(w is not None for w in ends) and covers(x, experts, range(len(experts))):
            plan = TablePlan(self.get(experts, list(range(len(experts))), x.device), experts[0])
        try:
            owner = weakref.ref(experts, lambda _, k=key: self._plans.pop(k, None))
        except TypeError:  # a plain list: nothing to keep it by
            return plan
        self._plans[key] = (owner, plan, tuple(None if w is None else _stamp(w) for w in ends))
        return plan


@dataclass(frozen=True)
class TablePlan:
    """What the device-scheduled experts need of a whole table: every expert's pointers and the first's weights
    (the shapes and format all share)."""

    pointers: list[Tensor]
    first: ExpertWeights


def _stamp(w: ExpertWeights) -> tuple:
    return tuple(None if t is None else (id(t), t.data_ptr()) for t in (w.w1, w.s1, w.w3, w.s3, w.w2, w.s2))


# The kernels read an expert's weights through a pointer table and tell the compiler that each weight starts on a
# 16-byte boundary (`tl.multiple_of`): without it a pointer loaded from memory is assumed unaligned and every
# weight element is its own load (an FP8 tile's 128 x 128 bytes 16,384 loads, not 1,024 of 16 bytes). torch's
# allocations are aligned; a weight that is a view at an odd offset is left to the reference.
WEIGHT_ALIGN = 16


def _aligned(t: Tensor) -> bool:
    return t.data_ptr() % WEIGHT_ALIGN == 0


def covers(x: Tensor, experts: Sequence[ExpertWeights | None], which: Sequence[int]) -> bool:
    """The kernels take float activations and experts whose three weights are all FP8 (128 x 128 tile scales), all
    packed FP4 (per-32 scales) or all float in the activations' dtype (no scales), contiguous, 16-byte aligned
    (`WEIGHT_ALIGN`), with the same shapes; no gradients."""
    if x.dtype not in _FLOATS or not which or (torch.is_grad_enabled() and x.requires_grad):
        return False
    first = experts[which[0]]
    if first is None:
        return False
    if first.s1 is None:
        return _covers_float(x, experts, which)
    fp4 = is_packed_fp4_dtype(first.w1.dtype)
    if not fp4 and first.w1.dtype != torch.float8_e4m3fn:
        return False
    d, inter = x.shape[-1], first.w1.shape[0]
    if fp4 and (d % FP4_BLOCK or inter % FP4_BLOCK):
        return False
    for e in which:
        w = experts[e]
        if w is None or w.s1 is None or w.s3 is None or w.s2 is None:
            return False
        for t, s, out_features in ((w.w1, w.s1, inter), (w.w3, w.s3, inter), (w.w2, w.s2, d)):
            if (t.dtype != first.w1.dtype or t.shape[0] != out_features or not t.is_contiguous() or not _aligned(t)
                    or not s.is_contiguous() or t.device != x.device or s.dtype not in (torch.float8_e8m0fnu,
                                                                                         torch.uint8)):
                return False
    return first.w1.shape[1] * (2 if fp4 else 1) == d and first.w2.shape[1] * (2 if fp4 else 1) == inter


def _covers_float(x: Tensor, experts: Sequence[ExpertWeights | None], which: Sequence[int]) -> bool:
    """`covers` for float experts: w1, w3 [inter, d] and w2 [d, inter] in x's dtype, contiguous and aligned, on x's
    device."""
    d, inter = x.shape[-1], experts[which[0]].w1.shape[0]
    for e in which:
        w = experts[e]
        if w is None or w.s1 is not None or w.s3 is not None or w.s2 is not None:
            return False
        for t, shape in ((w.w1, (inter, d)), (w.w3, (inter, d)), (w.w2, (d, inter))):
            if (t.dtype != x.dtype or tuple(t.shape) != shape or not t.is_contiguous() or not _aligned(t)
                    or t.device != x.device):
                return False
    return True


def routed_experts(x: Tensor, weights: Tensor, ids: Tensor, experts: Sequence[ExpertWeights | None],
                   which: Sequence[int], limit: float, pointers: ExpertPointers,
                   quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The routed experts' weighted sum [T, d] fp32 (see `ReferenceBackend.routed_experts`), scheduled on the host
    from the per-expert counts (one read of the device)."""
    rows = group_routed_rows(ids, len(experts), list(which))
    if not rows.which:
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    block_m = block_m_for(max(rows.sizes))
    tiles, lo = [], 0
    for e, n in zip(rows.which, rows.sizes, strict=True):
        for start in range(lo, lo + n, block_m):
            tiles += (e, start, lo + n)
        lo += n
    tiles = torch.tensor(tiles, dtype=torch.int32, device=x.device).view(-1, 3)
    arrays = pointers.get(experts, rows.which, x.device)
    slots = _grouped_swiglu(x, weights, rows.keep, ids.shape[1], tiles, block_m, experts[rows.which[0]], arrays, limit,
                            quantized=quantized)
    return _combine(slots, ids)


# the most routed rows (tokens x k) the one-program schedule lays out; more take torch's sort and scans
SCHEDULE_ROWS = 1024


def routed_experts_on_device(x: Tensor, weights: Tensor, ids: Tensor, plan: TablePlan, limit: float,
                             quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """`routed_experts` over every expert of a table `ExpertPointers.plan` accepted, with no read of the device:
    the rows sorted by expert (stably, as `group_routed_rows`), the per-expert counts added up on the device and
    the tiles laid out there, for a grid of as many tiles as any routing can need (a token picks an expert once,
    so an expert has at most T rows: at most ceil(T*k / BLOCK_M) full tiles plus one partial tile per expert
    chosen); the tiles past the schedule's end return at once. What a CUDA graph can capture, and a decode step's
    MoE layers no longer wait for the device one by one. Up to `SCHEDULE_ROWS` routed rows the schedule is one
    kernel (`_schedule_kernel`), above it torch's sort and scans (the same tensors)."""
    t, k = ids.shape
    n, n_experts = t * k, len(plan.pointers[0])
    block_m = block_m_for(t)
    n_tiles = triton.cdiv(n, block_m) + min(n_experts, n)
    schedule = _kernel_schedule if n <= SCHEDULE_ROWS else _torch_schedule
    keep, tiles = schedule(ids, n_experts, block_m, n_tiles)
    slots = _grouped_swiglu(x, weights, keep, k, tiles, block_m, plan.first, plan.pointers, limit, quantized=quantized)
    return _combine(slots, ids)


def covers_add(x: Tensor, add: Tensor) -> bool:
    """`swiglu`'s add: fp32 [n, d] like x, a unit last stride."""
    return add.dtype == torch.float32 and add.shape == x.shape and add.stride(-1) == 1


def swiglu(x: Tensor, expert: ExpertWeights, limit: float, weights: Tensor | None, pointers: ExpertPointers,
           add: Tensor | None = None, quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """`ReferenceBackend.swiglu` (one expert on every row of x [n, d], weights [n, 1] or None) through the grouped
    kernels: a table of one expert, its rows in order (a decode step's shared experts in four launches, not
    eleven)."""
    n = x.shape[0]
    if n == 0:
        return torch.empty_like(x)
    block_m = block_m_for(n)
    keep, tiles = _in_order(n, block_m, x.device)
    return _grouped_swiglu(x, weights, keep, 1, tiles, block_m, expert, pointers.single(expert, x.device), limit,
                           add, quantized)


@functools.lru_cache(maxsize=64)
def _in_order(n: int, block_m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """keep [n] (the rows in order) and the tiles [ceil(n / block_m), 3] of expert 0 over n rows: made once per
    size (a copy from the host at each call would be one no CUDA graph can hold)."""
    with torch.inference_mode(False):
        tiles = [(0, start, n) for start in range(0, n, block_m)]
        return (torch.arange(n, dtype=torch.int32, device=device),
                torch.tensor(tiles, dtype=torch.int32, device=device))


def _kernel_schedule(ids: Tensor, n_experts: int, block_m: int, n_tiles: int) -> tuple[Tensor, Tensor]:
    """The sorted rows keep [n] and tiles [n_tiles, 3] of ids [T, k] by `_schedule_kernel` (one program)."""
    n = ids.numel()
    keep = torch.empty(n, dtype=torch.int32, device=ids.device)
    tiles = torch.empty((n_tiles, 3), dtype=torch.int32, device=ids.device)
    experts_p = triton.next_power_of_2(n_experts)
    _schedule_kernel[(1,)](ids.contiguous(), keep, tiles, n, n_tiles, n_experts, block_m, EP=experts_p,
                           BLOCK=max(16, min(64, 8192 // experts_p)), num_warps=8 if experts_p >= 256 else 4)
    return keep, tiles


def _torch_schedule(ids: Tensor, n_experts: int, block_m: int, n_tiles: int) -> tuple[Tensor, Tensor]:
    """`_schedule_kernel`'s keep [n] and tiles [n_tiles, 3] in torch ops (for many rows: a sort, not the kernel's
    one program)."""
    device = ids.device
    flat = ids.flatten().to(torch.int64)
    keep = torch.sort(flat, stable=True).indices  # [n] the routed rows grouped by expert, token order inside
    counts = torch.zeros(n_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int64))  # [E] (bincount's output size would need a read)
    row_end = counts.cumsum(0)  # [E] each expert's rows end here in `keep`
    tiles_of = torch.div(counts + block_m - 1, block_m, rounding_mode="floor")  # [E]
    tile_end = tiles_of.cumsum(0)
    tile = torch.arange(n_tiles, device=device)
    expert = torch.searchsorted(tile_end, tile, right=True)  # [n_tiles] the expert of each tile, E past the end
    owned = expert.clamp(max=n_experts - 1)
    first = row_end[owned] - counts[owned] + (tile - (tile_end[owned] - tiles_of[owned])) * block_m
    tiles = torch.stack((torch.where(expert < n_experts, expert, -1), first, row_end[owned]), dim=1).to(torch.int32)
    return keep, tiles


def _combine(slots: Tensor, ids: Tensor) -> Tensor:
    """`add_routed_rows` from the (token, slot) places: slots [T*k, d] -> [T, d] fp32."""
    t, k = ids.shape
    d = slots.shape[-1]
    y = torch.empty((t, d), dtype=torch.float32, device=slots.device)
    if y.numel():
        block_d = min(512, triton.next_power_of_2(d))
        _combine_kernel[(t, triton.cdiv(d, block_d))](slots, ids.contiguous(), y, d, k,
                                                      K_P=triton.next_power_of_2(k), BD=block_d, num_warps=2)
    return y


def _grouped_swiglu(x: Tensor, weights: Tensor | None, keep: Tensor, k: int, tiles: Tensor, block_m: int,
                    first: ExpertWeights, pointers: list[Tensor], limit: float, add: Tensor | None = None,
                    quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Each routed row's expert output at its (token, slot) place, [T*k, d] in x.dtype (zero where `keep` names no
    row), for the rows `keep` [R] of ids.flatten() in expert order and their tiles [n_tiles, 3] (expert or -1,
    first row, end row), weighted by weights [T, k] (None: not weighted); `first` gives the experts' shapes and
    format. The tokens are quantised once, not once a routed row: a row's quantisation is its own. With `add`
    [T, d] fp32 (k = 1, rows in order: the shared expert) each output is add + it, rounded (`swiglu`'s add).
    `quantized`: act_quant(x) [T, d] and its scales, where the caller has it (read instead of quantising x)."""
    fmt = _FLOAT if first.s1 is None else _FP4 if is_packed_fp4_dtype(first.w1.dtype) else _FP8
    t, (d, inter) = x.shape[0], (x.shape[-1], first.w1.shape[0])
    r = keep.shape[0]
    routing = x if weights is None else weights.to(torch.float32).contiguous()  # [T, k]: routed row i's at i
    n_tiles = tiles.shape[0]
    w1, s1, w3, s3, w2, s2 = pointers
    # (fp32 dots run on the FMA units: the gate's and the up's [BLOCK_M, BLOCK_N] accumulators in registers at once)
    narrow = fmt == _FP4 or (fmt == _FLOAT and x.dtype == torch.float32)
    block_n = block_n_for(n_tiles, max(d, inter), 64 if narrow else 128, x.device)
    w_dtype = TL_DTYPES.get(first.w1.dtype, tl.float32)  # (a float format's; the others' pointers are cast inside)
    common = dict(FORMAT=fmt, W_DTYPE=w_dtype, WIDEN_DOTS=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n)

    def quantised(rows: Tensor) -> tuple[Tensor, Tensor]:
        """What a projection reads: the rows quantised once, or as they are for float experts (the scale
        pointer then a stand-in that is never read)."""
        return (rows, rows) if fmt == _FLOAT else quant.act_quant(rows, FP8_BLOCK)

    def scale_stride(s: Tensor | None) -> int:
        return 0 if s is None else s.stride(0)

    if fmt != _FLOAT and quantized is not None:
        xq, xs = (t if t.stride(-1) == 1 else t.contiguous() for t in quantized)
    else:
        xq, xs = quantised(x if x.stride(-1) == 1 else x.contiguous())
    hidden = torch.empty(r, inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(n_tiles, triton.cdiv(inter, block_n))](
        xq, xs, routing, keep, tiles, w1, s1, w3, s3, hidden, inter, d, float(limit), k,
        xq.stride(0), xs.stride(0), first.w1.stride(0), scale_stride(first.s1), hidden.stride(0),
        LIBDEVICE=libdevice_exp(), WEIGHTED=weights is not None, **common)

    hq, hs = quantised(hidden)
    slots = (torch.empty if r == t * k else torch.zeros)(t * k, d, dtype=x.dtype, device=x.device)
    _down_kernel[(n_tiles, triton.cdiv(d, block_n))](
        hq, hs, keep, tiles, w2, s2, slots, slots if add is None else add, d, inter,
        hq.stride(0), hs.stride(0), first.w2.stride(0), scale_stride(first.s2), slots.stride(0),
        0 if add is None else add.stride(0), ADD=add is not None, **common)
    return slots
