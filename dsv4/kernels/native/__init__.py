"""The "native" kernel backend: the "cpu" backend with its small, overhead-bound ops in C.

A decode step of a small model in exact numerics is thousands of torch ops, each costing a microsecond or two
before it touches a number: a routed expert is an activation quantisation, three block-scaled GEMMs and a SwiGLU,
tens of ops for a few thousand multiply-adds; the mHC Sinkhorn is 20 iterations of tiny divisions. Here each is
one call into `kernels.c` (built at first use, `build.py`):

* `linear` with an FP8 / FP4 weight: act_quant and the two-level block GEMM, row by row;
* `swiglu` and `routed_experts`: a token's whole expert chain, its experts added into its row in increasing id
  (the reference's order); float experts (plain numerics) too, whose dozens of torch ops per MoE cost more than
  their GEMVs (small preset, batch 1: six MoE calls 2.8 -> 1.8 ms);
* `sparse_attn` of a decode's few queries over fp32 rows, read in place from dense runs or pages; over a prefill
  chunk's fp32 rows one C call, 16 queries a block over the rows they name; over bf16 rows (exact numerics) the
  reference's 64-slot blocks bit for bit in two C calls around torch's exponential (the logits on the panel
  kernels, block sums in torch's order, the probabilities' bf16 rounding, the value products and folds), where a
  self-check per shape finds BLAS summing as these kernels do, else the "cpu" backend's blocks with their
  bookkeeping in C;
* `rope`, `hc_post`, `hc_collapse`, `hadamard`, `fp8_simulate`, `fp4_simulate`: elementwise or per-row loops, bit
  for bit the reference's;
* `rms_norm`, `head_norm` (fp32) and `hc_mixes`' RMS factor: a mean of squares summed in torch's own order (the
  cascade of its `SumKernel.cpp`, at the vector width a self-test finds when the backend starts), so bit for bit;
* `hc_split_sinkhorn`: the splits and normalisations (bit for bit; the sigmoids and exponentials stay torch's),
  the normalisations vectorised over tokens;
* `index_topk`: the indexer's selection, by counting ranks over a short row or a heap per query over a long one
  (the same picks, in the same order, as torch's stable sort; no arithmetic, so bit for bit);
* `linear` of the fp32 head over a decode's few rows (`PANEL_ROWS`): its weight kept in panels of 32 outputs
  ([N/32, K, 32]), each panel one sequential read that every row uses while it is in cache (BLAS ran this
  memory-bound product at a half to a third of the memory's speed here). Its sums run in their own order: fp32
  rounding from the reference's (1e-5), as the "cpu" backend's transposed copy already was.
* `greedy_head` (a greedy decode's token) over the same few rows: the vocabulary screened in integers, the head's
  int8 codes (a quarter of its bytes) times the rows' own (AVX-512 VNNI's byte dot products where the CPU has
  them), under a rigorous error bound, then the few panels left in the running computed exactly as `linear`
  computes them: the same token as the whole logits' first maximum.
* `routed_experts` of plain fp32 experts over any number of rows (a decode's, a prefill's), and of quantised ones
  over a prefill's (their block scales folded in, act_quant and the roundings in C): the routed rows grouped by
  expert and run eight at a time over the weights kept in panels, then each token's outputs added in increasing
  expert id, one C call where a prefill's MoE was gathers, padded batched GEMMs and scatters costing about three
  times its arithmetic. Sums over k in order, so a token's result is the same bits in any batch (1e-5 from the
  reference's BLAS order in plain fp32).

The kernels' loops over rows (tokens, queries, a head's panels) split between torch's OpenMP threads when a call
has enough work (`SPLIT_WORK` in `kernels.c`, a few tens of thousands of elements: a prefill chunk, a batch's
decode step) and the library shares torch's OpenMP runtime (checked at load, `build.py`). Every row is computed
whole by one thread in the one-thread order, so the bits do not depend on the thread count; the tests compare
one thread with two.

The GEMMs compute the reference's arithmetic: the same power-of-two scales, e4m3 round-half-even, per-block fp32
partial products scaled and summed in block order. A block's dot product is summed sequentially over k (BLAS sums
it in its own order) and the SwiGLU's and attention's exp is libm's, so those results may differ from the
reference in the last bits of fp32; a step that rounds to FP8 or bf16 next can turn such a difference into one
rounding step. Within a GEMM of one row they are deterministic and independent of the batch. The tests hold this
backend to the official-parity tolerance in exact numerics, 1e-5 in plain fp32, and identical greedy tokens.

GEMM-shaped work (the linears, experts and attention) goes to C only while it is small (`NATIVE_MACS`
multiply-adds per call, a decode step's rows): the C GEMMs run row by row (so a row's result does not depend on
its batch), and more rows belong to BLAS. There the quantised GEMMs multiply the operands with their power-of-two
block scales multiplied in (the weights' "folded" form, the activations quantised and dequantised in C): the
reference's products, summed in BLAS's order instead of block by block, at a float GEMM's cost. Attention over a
prefill chunk runs the "cpu" backend's GEMMs.

Training (fp32, gradients wanted) keeps these forwards, bit for bit, and gives the overhead-bound ops backwards of
their own instead of autograd's chains of elementwise ops: in C the RMSNorms (`rms_norm`, `head_norm`), SwiGLU's
activation, `hc_post`, `hc_collapse` and the Sinkhorn normalisations; `rope` and `hadamard` by their transposes
(the opposite rotation, the same transform); `hc_mixes` and attention over a chunk (`_ChunkAttention`, its
bookkeeping in C as in inference) in closed form; the indexer's top-k is picked in C. Every other op with gradients
wanted, other dtypes, or other devices goes to the "cpu" backend.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4.quant import (
    FP4_BLOCK,
    FP8_BLOCK,
    INDEXER_SIM_BLOCK,
    KV_SIM_BLOCK,
    e2m1_decode,
    e8m0_to_float,
    is_packed_fp4_dtype,
    unpack_fp4,
)

from ..cpu import (
    DENSE_QUERY_BLOCK,
    EXP_FLOOR,
    GATHER_BYTES,
    TRAIN_EXP_FLOOR,
    VOCAB_ROWS,
    CpuBackend,
    gather_kv,
    scores_every_row,
    softmax_attention_grads,
)
from ..experts import ExpertWeights
from ..paged import KVRows
from ..reference import ATTN_BLOCK, ReferenceBackend, plus_rounded
from .build import NativeUnavailable, available, load

__all__ = ["NATIVE_MACS", "NativeBackend", "NativeUnavailable", "available"]

# the most multiply-adds a linear, expert or attention call runs in C (about 0.3-0.5 ms of one core, a decode
# step's rows, each row's result independent of its batch); past it the work is a GEMM worth BLAS's threads
NATIVE_MACS = 1 << 22
# queries of a prefill chunk that score the rows they name together in C (kernels.c's CHUNK_QUERIES)
CHUNK_QUERIES = 16
# the longest row `rms_norm` sums in C: torch splits one longer row's sum between threads (another order)
NATIVE_ROW_SUM = 1 << 14
# the most index scores an `index_topk` call may select from in C (a heap per query, O(N log k)); past it (a long
# prefill's query block) torch's O(N) topk, with two threads
NATIVE_TOPK_SCORES = 1 << 20
# a float vocabulary projection (the head) over at most this many rows (a decode's, a verify step's) multiplies
# its weight kept in panels (`dsv4_panel_gemm`); a prefill's many rows stay BLAS's
PANEL_ROWS = 64
PANEL = 32
# the router's score functions as `dsv4_moe_gate` numbers them
_SCORE_FUNCS = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}
# the most streams `dsv4_hc_pre` reads (its coefficient arrays are sized for it)
HC_MAX = 8
# the most panels of the head a row's greedy screen may leave to compute exactly (more: its whole logits)
SCREEN_PANELS = 64
_BF16 = {torch.float32: 0, torch.bfloat16: 1}


def _native_form(weight: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """An FP8 (128x128 tiles) or packed FP4 (1x32) weight [N, K] as the C GEMM reads it: element values
    transposed [K, N], exactly and compactly (e4m3 values as bfloat16; e2m1 values doubled, as int8, with their
    scales halved), and one scale per weight block and output, [blocks, N] fp32."""
    if weight.dtype == torch.float8_e4m3fn:
        values = weight.to(torch.bfloat16)
        scales = e8m0_to_float(scale).repeat_interleave(FP8_BLOCK, dim=0)[: weight.shape[0]]  # [N, ceil(K/128)]
    else:
        values = (e2m1_decode(unpack_fp4(weight)) * 2).to(torch.int8)  # [N, K] in -12..12
        scales = e8m0_to_float(scale) * 0.5  # [N, K/32]
    return values.T.contiguous(), scales.T.contiguous()


def _folded_form(weight: Tensor, scale: Tensor) -> tuple[Tensor]:
    """An FP8 or packed FP4 weight [N, K] with its power-of-two block scales multiplied in (exactly: a product of an
    e4m3 / e2m1 value and a power of two is representable), transposed for x @ w: [K, N] fp32."""
    if weight.dtype == torch.float8_e4m3fn:
        scales = e8m0_to_float(scale).repeat_interleave(FP8_BLOCK, dim=0)[: weight.shape[0]]
        values = weight.float() * scales.repeat_interleave(FP8_BLOCK, dim=1)[:, : weight.shape[1]]
    else:
        values = e2m1_decode(unpack_fp4(weight)) * e8m0_to_float(scale).repeat_interleave(FP4_BLOCK, dim=1)
    return (values.T.contiguous(),)


def _panel_form(weight: Tensor, scale: None) -> tuple[Tensor]:
    """A float weight [N, K] as `dsv4_panel_gemm` reads it: panels [ceil(N / 32), K, 32] fp32 of 32 outputs each,
    zeros past N."""
    n, k = weight.shape
    w = weight.detach().float().contiguous()
    if n % PANEL:
        w = torch.cat((w, w.new_zeros(PANEL - n % PANEL, k)))
    return (w.view(-1, PANEL, k).transpose(1, 2).contiguous(),)


def _folded_panel_form(weight: Tensor, scale: Tensor) -> tuple[Tensor]:
    """A quantised weight's folded form (`_folded_form`: its block scales multiplied in, exactly) in panels
    (`_panel_form`), as `dsv4_panel_experts` reads a quantised expert's weights."""
    (folded,) = _folded_form(weight, scale)  # [K, N]
    return _panel_form(folded.T, None)


def _screen_form(weight: Tensor, scale: None) -> tuple[Tensor, ...]:
    """A float vocabulary weight [N, K] as `dsv4_head_greedy` screens it: int8 codes four k at a time in panels
    [ceil(N / 32), ceil(K / 4), 32, 4] (row j is q_j = round(w_j / s_j), s_j = max |w_j| / 127; zeros past N and
    K), each row's code sum [N'] int32, the scales s [N'] fp32 (0 past N), norms n_j >= |w_j|_2 [N'] fp32, bounds
    c_j >= |w_j - s_j q_j|_2 + gamma_(K+1) |w_j|_2 [N'] fp32 (+inf past N; the kernel's comment derives them),
    and max_j |w_j|_2 [1]; N' = N rounded up to 32. A weight with a non-finite element has no screen: () (its
    greedy tokens come from whole logits)."""
    n, k = weight.shape
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        return ()
    padded, k4 = n + (-n) % PANEL, -(-k // 4)
    codes = torch.zeros(padded, 4 * k4, dtype=torch.int8)
    sums = torch.zeros(padded, dtype=torch.int32)
    scales, norms = torch.zeros(padded), torch.zeros(padded)
    bounds = torch.full((padded,), float("inf"))
    wmax = 0.0
    unit = 2.0 ** -24
    gamma = (k + 1) * unit / (1 - (k + 1) * unit)
    up = (1 + 2.0 ** -10) * (1 + 2.0 ** -20)  # the float64 sums' error, then fp32 rounding: stays above
    for lo in range(0, n, 8192):  # float64 intermediates a slice at a time
        hi = min(lo + 8192, n)
        rows = w[lo:hi].double()
        scale = (rows.abs().amax(dim=1) / 127).float()  # [r] the kernel's fp32 scales
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: codes 0, exact
        q = torch.round(rows / scale.double()[:, None]).clamp_(-127, 127)
        norm = rows.norm(dim=1)
        c = (rows - q * scale.double()[:, None]).norm(dim=1) + gamma * norm  # s_j q_j exact in float64
        codes[lo:hi, :k] = q.to(torch.int8)
        sums[lo:hi] = q.sum(dim=1).to(torch.int32)
        scales[lo:hi], norms[lo:hi], bounds[lo:hi] = scale, (norm * up).float(), (c * up).float()
        wmax = max(wmax, float(norm.max()))
    panels = codes.view(-1, PANEL, k4, 4).transpose(1, 2).contiguous()
    return panels, sums, scales, norms, bounds, torch.tensor([wmax * (1 + 2.0 ** -20)])


def _kind(weight: Tensor) -> int:
    """The C kernels' name for the value storage of `_native_form`: 0 bfloat16, 1 int8."""
    return 0 if weight.dtype == torch.float8_e4m3fn else 1


def _quantised(weight: Tensor) -> bool:
    return weight.dtype == torch.float8_e4m3fn or is_packed_fp4_dtype(weight.dtype)


def _block(weight: Tensor) -> int:
    return FP8_BLOCK if weight.dtype == torch.float8_e4m3fn else FP4_BLOCK


def _inference(*tensors: Tensor) -> bool:
    """CPU tensors of which no gradient is wanted (the C kernels have no backward)."""
    return (all(t.device.type == "cpu" for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _trains_float(x: Tensor, expert: ExpertWeights) -> bool:
    """Whether an expert runs in training in fp32: float weights without scales, gradients wanted, on the CPU."""
    weights = (expert.w1, expert.w3, expert.w2)
    return (x.dtype == torch.float32 and all(w.dtype == torch.float32 for w in weights)
            and all(s is None for s in (expert.s1, expert.s3, expert.s2)) and not _inference(x, *weights)
            and all(w.device.type == "cpu" for w in weights) and x.device.type == "cpu")


def _rope_group(x: Tensor, cos: Tensor) -> int:
    """How many consecutive rows of x [..., D] one row of cos [..., half] serves: 1 when cos has x's leading dims, the
    heads when it is shared across x's second-to-last dim (a query's heads), else 0 (another broadcast)."""
    lead = x.shape[:-1]
    if cos.shape[:-1] == lead:
        return 1
    if lead and cos.shape[:-1] == (*lead[:-1], 1):
        return lead[-1]
    return 0


def _dense_runs(runs: Sequence[KVRows]) -> list[Tensor]:
    """The tensors among attention's runs of rows (the paged ones' pools are the cache's, never trained)."""
    return [r for r in runs if isinstance(r, Tensor)]


def _run_descriptors(runs: Sequence[KVRows], dtype: torch.dtype) -> tuple[list[int], list[Tensor]] | None:
    """The C kernels' descriptors of attention's runs of rows (five int64 each: rows, count, rows per page or 0 for
    a dense run, table, table width) and the tensors they point into (kept alive through the call), or None when
    a run is stored in another form (a codec) or dtype."""
    desc: list[int] = []
    keep: list[Tensor] = []
    for run in runs:
        if isinstance(run, Tensor):
            if run.dtype != dtype:
                return None
            rows = run.contiguous()
            keep.append(rows)
            desc += [rows.data_ptr(), rows.shape[1], 0, 0, 0]
        else:
            if run.codec is not None or run.pool.dtype != dtype:
                return None
            pool, table = run.pool.contiguous(), run.table.to(torch.int64).contiguous()
            keep += [pool, table]
            desc += [pool.data_ptr(), run.count, run.rows_per_page, table.data_ptr(), table.shape[1]]
    return desc, keep


def _check(code: int, op: str) -> None:
    if code != 0:
        raise MemoryError(f"native {op}: the kernel could not allocate its scratch")


class NativeBackend(CpuBackend):
    """The "cpu" backend with the ops above in C; see the module docstring."""

    name = "native"

    def __init__(self, cache_mb: int | None = None) -> None:
        super().__init__(cache_mb)
        self.lib = load()  # NativeUnavailable (with the reason) when it cannot be built here
        self.decoded.builders["native"] = _native_form
        self.decoded.builders["folded"] = _folded_form
        self.decoded.builders["panels"] = _panel_form
        self.decoded.builders["folded_panels"] = _folded_panel_form
        self.decoded.builders["screen"] = _screen_form
        with torch.inference_mode():
            self._lanes = self._sum_lanes()
        self._ones: dict[int, Tensor] = {}  # head_norm's unit weights by width
        self._rounded_checked: dict[tuple[int, int], bool] = {}  # `_rounded_orders` by (heads, width)

    def _form(self, weight: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        return self.decoded.get(weight, scale, "native")

    # ------------------------------------------------------------------------------------------ quantisation

    def fp8_simulate(self, x: Tensor, block_size: int = KV_SIM_BLOCK) -> Tensor:
        if x.dtype not in _BF16 or not _inference(x):
            return super().fp8_simulate(x, block_size)
        return self._simulate(x, block_size, fp4=0)

    def fp4_simulate(self, x: Tensor, block_size: int = INDEXER_SIM_BLOCK) -> Tensor:
        if x.dtype not in _BF16 or not _inference(x):
            return super().fp4_simulate(x, block_size)
        return self._simulate(x, block_size, fp4=1)

    def _simulate(self, x: Tensor, block: int, fp4: int) -> Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        k = x.shape[-1]
        _check(self.lib.dsv4_block_simulate(x.data_ptr(), out.data_ptr(), _BF16[x.dtype], x.numel() // max(k, 1), k,
                                            block, fp4), "block simulation")
        return out

    def hadamard(self, x: Tensor) -> Tensor:
        """One C call (the reference's butterflies); in training the backward is the same transform of the output's
        gradient (the normalised Hadamard matrix is symmetric and orthogonal, `_Hadamard`)."""
        n = x.shape[-1]
        if x.dtype not in _BF16 or x.device.type != "cpu" or n < 1 or n & (n - 1):
            return super().hadamard(x)
        if not _inference(x):
            return _Hadamard.apply(x, self)
        x = x.contiguous()
        out = torch.empty_like(x)
        _check(self.lib.dsv4_hadamard(x.data_ptr(), out.data_ptr(), _BF16[x.dtype], x.numel() // n, n,
                                      1.0 / math.sqrt(n)), "hadamard")
        return out

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False, inplace: bool = False) -> Tensor:
        """One C call for the rotation the reference builds from eight torch ops (bit for bit: the same rounded
        products and sums); cos / sin shaped like x's leading dims, or shared across x's second-to-last (heads);
        `inplace` (a contiguous x) touches only the rotated dims. In training the backward is the opposite
        rotation, one C call too (`_Rope`)."""
        half = cos.shape[-1]
        group = _rope_group(x, cos)
        if (not group or x.dtype not in _BF16 or cos.dtype != torch.float32 or sin.dtype != torch.float32
                or sin.shape != cos.shape or 2 * half > x.shape[-1] or not _inference(cos, sin)
                or x.device.type != "cpu"):
            return super().rope(x, cos, sin, inverse, inplace)
        if not _inference(x):  # training: a rotation's gradient is the opposite rotation of the output's
            if inplace:
                return super().rope(x, cos, sin, inverse, inplace)
            return _Rope.apply(x, cos, sin, inverse, group, self)
        return self._rope(x, cos, sin, inverse, group, inplace and x.is_contiguous())

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool, group: int, inplace: bool = False
              ) -> Tensor:
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        out = x if inplace else torch.empty_like(x)
        _check(self.lib.dsv4_rope(x.data_ptr(), out.data_ptr(), _BF16[x.dtype], x.numel() // x.shape[-1],
                                  x.shape[-1], cos.shape[-1], cos.data_ptr(), sin.data_ptr(), group, int(inverse)),
               "rope")
        return out

    # ------------------------------------------------------------------------------------------ GEMMs

    def linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None,
               quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """A quantised weight's linear: over few rows in one C call (act_quant and the two-level block GEMM, row by
        row), over more as `_folded_linear`; the head over a decode's few rows as `_panel_linear`; other float
        weights as the "cpu" backend (a float weight of x's dtype short of a vocabulary is its plain product,
        straight away: the frames of checks on the way cost a decode's small linears a third of their time).
        `quantized` is not read (`rms_norm_quant` gives none here; the C calls quantise as they go)."""
        if scale is None and weight.dtype == x.dtype and weight.dim() == 2 and weight.shape[0] < VOCAB_ROWS:
            return F.linear(x, weight)
        k = x.shape[-1]
        if scale is None and self._in_panels(x, weight):
            return self._panel_linear(x, weight)
        if scale is None or not _quantised(weight) or x.dtype not in _BF16 or not _inference(x, weight):
            return super().linear(x, weight, scale)
        if x.numel() * weight.shape[0] > NATIVE_MACS:
            return self._folded_linear(x, weight, scale)
        values_t, scales_t = self._form(weight, scale)
        if values_t.shape[0] != k:
            return super().linear(x, weight, scale)  # the reference names the mismatch
        n = values_t.shape[1]
        x = x.contiguous()
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
        _check(self.lib.dsv4_quantised_linear(x.data_ptr(), out.data_ptr(), _BF16[x.dtype], x.numel() // k,
                                              values_t.data_ptr(), scales_t.data_ptr(), n, k, _block(weight),
                                              _kind(weight)),
               "linear")
        return out

    def _in_panels(self, x: Tensor, weight: Tensor) -> bool:
        """Whether x [..., K] @ weight [N, K]^T is a vocabulary projection (the head) over at most `PANEL_ROWS`
        fp32 rows, no gradient wanted, whose panels the decoded-weight cache keeps."""
        return (weight.dtype == torch.float32 and x.dtype == torch.float32 and weight.dim() == 2
                and weight.shape[0] >= VOCAB_ROWS and weight.shape[1] == x.shape[-1]
                and x.numel() <= PANEL_ROWS * x.shape[-1] and _inference(x, weight)
                and self.decoded.keeps(weight, "panels", (weight.shape[0] + PANEL) * weight.shape[1] * 4))

    def _panel_linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """A vocabulary projection over a few rows: one C call over the weight kept in panels, split between
        threads (plain fp32 sums in its own order; within 1e-5 of the reference's logits)."""
        (panels,) = self.decoded.get(weight, None, "panels")
        n, k = weight.shape
        x = x.contiguous()
        out = torch.empty(*x.shape[:-1], n)
        _check(self.lib.dsv4_panel_gemm(x.data_ptr(), x.numel() // k, k, panels.data_ptr(), n, out.data_ptr()),
               "linear")
        return out

    def greedy_head(self, x: Tensor, weight: Tensor) -> Tensor:
        """As the reference. Over a decode's few fp32 rows (the head's panels kept) one C call screens the
        vocabulary with integer products of the weight's int8 codes (a quarter of its bytes; `_screen_form`) and the
        rows' (quantised in the call) and computes exactly, as `_panel_linear` does, only the panels a rigorous
        error bound leaves in the running: the same tokens as the panels' whole logits (the kernel's comment has
        the argument) for a quarter of the memory traffic. A row the screen cannot settle (logits not finite or so
        flat that more than `SCREEN_PANELS` panels stay in the running) gets its whole logits."""
        if not (self._in_panels(x, weight)
                and self.decoded.keeps(weight, "screen", (weight.shape[0] + PANEL) * (weight.shape[1] + 19))):
            return super().greedy_head(x, weight)
        screen = self.decoded.get(weight, None, "screen")
        if not screen:
            return super().greedy_head(x, weight)
        codes, sums, scales, norms, bounds, wmax = screen
        (panels,) = self.decoded.get(weight, None, "panels")
        n, k = weight.shape
        rows = x.reshape(-1, k).contiguous()
        ids = torch.empty(rows.shape[0], dtype=torch.long)
        _check(self.lib.dsv4_head_greedy(rows.data_ptr(), rows.shape[0], k, codes.data_ptr(), sums.data_ptr(),
                                         scales.data_ptr(), norms.data_ptr(), bounds.data_ptr(), float(wmax),
                                         panels.data_ptr(), n, SCREEN_PANELS, ids.data_ptr()),
               "greedy_head")
        unsettled = ids < 0
        if bool(unsettled.any()):
            ids[unsettled] = super().greedy_head(rows[unsettled], weight)
        return ids.view(x.shape[:-1])

    def _dequantised(self, x: Tensor) -> Tensor:
        """Activations [..., K] as act_quant quantises them (e4m3 per 128-block, power-of-two scales) and
        dequantised, in fp32 (exact: an e4m3 value times a power of two): one C call."""
        return self._simulate(x.float(), FP8_BLOCK, fp4=0)

    def _stacked_kind(self, x: Tensor, expert: ExpertWeights) -> str | None:
        """Quantised experts over many rows stack their "folded" forms, so a prefill's experts are three batched
        GEMMs of dequantised operands (see `_folded_linear`) instead of three block-scaled GEMMs per expert."""
        inter, d = expert.w1.shape[0], x.shape[-1]
        if (_quantised(expert.w1) and x.dtype in _BF16 and _inference(x, expert.w1)
                and d % FP8_BLOCK == 0 and inter % FP8_BLOCK == 0):
            return "folded"
        return super()._stacked_kind(x, expert)

    def _gemm_operand(self, rows: Tensor, kind: str, dtype: torch.dtype) -> Tensor:
        return self._dequantised(rows) if kind == "folded" else super()._gemm_operand(rows, kind, dtype)

    def _folded_linear(self, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        """A block-scaled linear over many rows (a prefill's) as one BLAS GEMM of the operands with their
        power-of-two scales multiplied in: the activations quantised and dequantised in one C call
        (`fp8_simulate` over act_quant's 128-blocks, in fp32: exact), the weight kept dequantised (exact), so
        the same products as the reference's per-block GEMMs, added in BLAS's order instead of block by block
        (last-bit differences, like the C kernels' own order) at about a float GEMM's cost."""
        (folded,) = self.decoded.get(weight, scale, "folded")  # [K, N]
        if folded.shape[0] != x.shape[-1] or x.shape[-1] % FP8_BLOCK:
            return super().linear(x, weight, scale)  # the reference names the mismatch
        return (self._dequantised(x) @ folded).to(x.dtype)

    # ------------------------------------------------------------------------------------------ experts

    def _expert_table(self, expert: ExpertWeights, keep: list) -> list[int]:
        """The six pointers (values, scales of w1, w3, w2) of an expert's native forms, the forms going on `keep`;
        a float expert's weights as they are (rows contiguous; a strided view is copied), with no scales."""
        pointers = []
        for w, s in ((expert.w1, expert.s1), (expert.w3, expert.s3), (expert.w2, expert.s2)):
            if s is None:
                w = w.contiguous()
                keep.append(w)
                pointers += [w.data_ptr(), 0]
                continue
            form = self._form(w, s)
            keep.append(form)
            pointers += [form[0].data_ptr(), form[1].data_ptr()]
        return pointers

    def _folded_swiglu(self, x: Tensor, expert: ExpertWeights, limit: float, weights: Tensor | None) -> Tensor:
        """The reference's chain over many rows with BLAS GEMMs of folded operands (see `_folded_linear`): x is
        quantised and dequantised once for w1 and w3, each projection rounded to x's dtype as the reference's
        linear returns it."""
        (w1,), (w3,) = (self.decoded.get(w, s, "folded") for w, s in ((expert.w1, expert.s1), (expert.w3, expert.s3)))
        if w1.shape[0] != x.shape[-1]:
            return super().swiglu(x, expert, limit, weights)  # the reference names the mismatch
        dequantised = self._dequantised(x)
        gate = (dequantised @ w1).to(x.dtype).to(torch.float32).clamp_(max=limit)
        up = (dequantised @ w3).to(x.dtype).to(torch.float32).clamp_(-limit, limit)
        hidden = F.silu(gate).mul_(up)
        if weights is not None:
            hidden = weights * hidden
        return self._folded_linear(hidden.to(x.dtype), expert.w2, expert.s2)

    @staticmethod
    def _runs_native(x: Tensor, expert: ExpertWeights, rows: int) -> bool:
        """Whether an expert's chain over `rows` token rows goes to C: quantised weights with their scales, or
        float weights of x's dtype."""
        inter, d = expert.w1.shape[0], x.shape[-1]
        weights, scales = (expert.w1, expert.w3, expert.w2), (expert.s1, expert.s3, expert.s2)
        quantised = all(_quantised(w) for w in weights) and all(s is not None for s in scales)
        floats = all(w.dtype == x.dtype for w in weights) and all(s is None for s in scales)
        return (x.dtype in _BF16 and rows * 3 * inter * d <= NATIVE_MACS and (quantised or floats)
                and _inference(x, *weights))

    @staticmethod
    def _float_chain(x: Tensor, expert: ExpertWeights, weights: Tensor | None) -> bool:
        """Whether an expert's chain is fp32 GEMMs of x and float weights with no gradient wanted (its activation then
        runs in C, `dsv4_swiglu_act`)."""
        w1, w3, w2 = expert.w1, expert.w3, expert.w2
        return (x.dtype == torch.float32 and all(w.dtype == torch.float32 and w.dim() == 2 for w in (w1, w3, w2))
                and expert.s1 is None and expert.s3 is None and expert.s2 is None and w1.shape == w3.shape
                and w1.shape[1] == x.shape[-1] and w2.shape[1] == w1.shape[0]
                and (weights is None or weights.numel() == x.numel() // x.shape[-1])
                and _inference(x, w1, w3, w2, *(() if weights is None else (weights,))))

    @staticmethod
    def _dims(expert: ExpertWeights, d: int) -> ctypes.Array:
        w1, w3, w2 = expert.w1, expert.w3, expert.w2
        if expert.s1 is None:  # float weights: FLOAT_ROWS_F32 / FLOAT_ROWS_BF16, no blocks
            kind = 2 + _BF16[w1.dtype]
            return (ctypes.c_int64 * 8)(w1.shape[0], d, 0, 0, 0, kind, kind, kind)
        return (ctypes.c_int64 * 8)(w1.shape[0], d, _block(w1), _block(w3), _block(w2), _kind(w1), _kind(w3),
                                    _kind(w2))

    def swiglu(self, x: Tensor, expert: ExpertWeights, limit: float, weights: Tensor | None = None,
               add: Tensor | None = None, quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """An expert's chain over few rows in one C call; a float fp32 one over more as BLAS's GEMMs around a C
        activation (`_float_chain`); a quantised one over more, `_folded_swiglu`; in training
        (fp32 weights), the reference's chain with the activation's backward in C (`_SwigluActivation`: autograd's
        clamps, silu and products are a dozen ops an expert); other float experts as the "cpu" backend."""
        if add is not None:
            return plus_rounded(add, self.swiglu(x, expert, limit, weights))
        rows = x.numel() // x.shape[-1]
        if not self._runs_native(x, expert, rows):
            if self._float_chain(x, expert, weights):  # a prefill's shared expert: BLAS's GEMMs, the activation in C
                gate, up = F.linear(x, expert.w1).contiguous(), F.linear(x, expert.w3).contiguous()
                route = None if weights is None else weights.to(torch.float32).reshape(rows).contiguous()
                _check(self.lib.dsv4_swiglu_act(gate.data_ptr(), up.data_ptr(),
                                                None if route is None else route.data_ptr(), rows, gate.shape[-1],
                                                limit), "swiglu")
                return F.linear(gate, expert.w2)
            if _trains_float(x, expert):  # the reference's chain, its activation's backward in C
                gate = self.linear(x, expert.w1).to(torch.float32)
                up = self.linear(x, expert.w3).to(torch.float32)
                return self.linear(_SwigluActivation.apply(gate, up, weights, limit, self.lib), expert.w2)
            if self._stacked_kind(x, expert) == "folded":
                return self._folded_swiglu(x, expert, limit, weights)
            return super().swiglu(x, expert, limit, weights)
        keep: list = []
        table = (ctypes.c_int64 * 6)(*self._expert_table(expert, keep))
        x = x.contiguous()
        out = torch.empty_like(x)
        route = None
        if weights is not None:
            route = weights.to(torch.float32).contiguous()
        _check(self.lib.dsv4_swiglu(x.data_ptr(), out.data_ptr(), _BF16[x.dtype], rows, table,
                                    self._dims(expert, x.shape[-1]), None if route is None else route.data_ptr(),
                                    limit), "swiglu")
        return out

    def gated_pool(self, kv: Tensor, score: Tensor, candidates: Tensor) -> Tensor:
        """fp32 rows in inference: one C call (`dsv4_gated_pool`), plain fp32 within 1e-5 of the reference. Training:
        the reference."""
        if (kv.dtype != torch.float32 or score.dtype != torch.float32 or kv.dim() != 2 or score.shape != kv.shape
                or candidates.dim() != 2 or not _inference(kv, score, candidates)):
            return super().gated_pool(kv, score, candidates)
        kv, score = kv.contiguous(), score.contiguous()
        candidates = candidates.to(torch.int64).contiguous()
        e, n = candidates.shape
        out = torch.empty(e, kv.shape[1])
        if self.lib.dsv4_gated_pool(kv.data_ptr(), score.data_ptr(), kv.shape[0], kv.shape[1], candidates.data_ptr(),
                                    e, n, out.data_ptr()):
            raise IndexError(f"gated_pool: a candidate past the {kv.shape[0]} rows")
        return out

    def moe_gate(self, x: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor | None, score_func: str,
                 topk: int, route_scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """fp32 tokens in inference: one C call (`dsv4_moe_gate`: the product with the gate weight kept in panels,
        the scores, the top-k or the given ids, the weights), plain fp32 within 1e-5 of the reference (the same
        experts but where two scores tie within that). Other dtypes and training: the reference."""
        e, d = weight.shape
        if (x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != d
                or score_func not in _SCORE_FUNCS or not 1 <= topk <= e
                or (ids is None and (bias is None or bias.dtype != torch.float32 or bias.shape != (e,)))
                or (ids is not None and ids.shape != (x.shape[0], topk))
                or not _inference(x, weight, *(t for t in (bias, ids) if t is not None))
                or not self.decoded.keeps(weight, "panels", (e + PANEL) * d * 4)):
            return super().moe_gate(x, weight, bias, ids, score_func, topk, route_scale)
        (panels,) = self.decoded.get(weight, None, "panels")
        t = x.shape[0]
        x = x.contiguous()
        given = None if ids is None else ids.to(torch.int64).contiguous()
        bias = None if bias is None else bias.contiguous()
        weights, chosen, scores = torch.empty(t, topk), torch.empty(t, topk, dtype=torch.int64), torch.empty(t, e)
        code = self.lib.dsv4_moe_gate(x.data_ptr(), t, d, panels.data_ptr(), e,
                                      None if bias is None else bias.data_ptr(),
                                      None if given is None else given.data_ptr(), _SCORE_FUNCS[score_func], topk,
                                      route_scale, weights.data_ptr(), chosen.data_ptr(), scores.data_ptr())
        if code:
            raise IndexError(f"moe_gate: an expert id out of range [0, {e}) in the given ids")
        return weights, chosen, scores

    def routed_experts(self, x: Tensor, weights: Tensor, ids: Tensor, experts: Sequence[ExpertWeights | None],
                       which: Sequence[int], limit: float, quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Each token's experts, one C call for the batch: a token runs each routed expert held here (`which`) on
        its row and adds the outputs in increasing expert id (`quantized` is not read, as in `linear`)."""
        first = experts[which[0]] if which else None
        if first is not None and self._in_expert_panels(x, first):
            return self._panel_experts(x, weights, ids, experts, set(which), limit, first.w1.shape[0], "panels")
        if first is not None and not self._runs_native(x, first, ids.numel()) and self._in_folded_panels(x, first):
            return self._panel_experts(x, weights, ids, experts, set(which), limit, first.w1.shape[0],
                                       "folded_panels")
        if first is None or not self._runs_native(x, first, ids.numel()):
            return super().routed_experts(x, weights, ids, experts, which, limit)
        held = set(which)
        keep: list = []
        table = (ctypes.c_int64 * (6 * len(experts)))()
        for e in set(ids.reshape(-1).tolist()) & held:
            table[6 * e : 6 * e + 6] = self._expert_table(first if e == which[0] else experts[e], keep)
        x = x.contiguous()
        ids = ids.to(torch.int64).contiguous()
        weights = weights.to(torch.float32).contiguous()
        out = torch.empty(x.shape, dtype=torch.float32)
        _check(self.lib.dsv4_routed_experts(x.data_ptr(), out.data_ptr(), _BF16[x.dtype], ids.shape[0],
                                            ids.shape[1], ids.data_ptr(), weights.data_ptr(), len(experts), table,
                                            self._dims(first, x.shape[-1]), limit), "routed_experts")
        return out

    def _in_expert_panels(self, x: Tensor, expert: ExpertWeights) -> bool:
        """Whether an expert (and the others of its table) runs as `_panel_experts`: plain fp32 rows and float
        weights, no gradient wanted, its panels kept by the decoded-weight cache."""
        w1, w3, w2 = expert.w1, expert.w3, expert.w2
        inter, d = w1.shape[0], x.shape[-1]
        return (x.dtype == torch.float32 and all(w.dtype == torch.float32 and w.dim() == 2 for w in (w1, w3, w2))
                and expert.s1 is None and expert.s3 is None and expert.s2 is None
                and w1.shape == w3.shape == (inter, d) and w2.shape == (d, inter) and _inference(x, w1, w3, w2)
                and self.decoded.keeps(w1, "panels", 3 * (inter + PANEL) * (d + PANEL) * 4))

    def _in_folded_panels(self, x: Tensor, expert: ExpertWeights) -> bool:
        """Whether a quantised expert (and the others of its table) runs as `_panel_experts` over its weights folded
        (block scales multiplied in) and kept in panels: FP8 / FP4 weights with scales, whole activation blocks,
        no gradient wanted, the panels kept by the decoded-weight cache."""
        w1, w3, w2 = expert.w1, expert.w3, expert.w2
        inter, d = w1.shape[0], x.shape[-1]
        return (x.dtype in _BF16 and all(_quantised(w) for w in (w1, w3, w2))
                and all(s is not None for s in (expert.s1, expert.s3, expert.s2))
                and d % FP8_BLOCK == 0 and inter % FP8_BLOCK == 0 and w2.shape[0] == d and _inference(x, w1, w3, w2)
                and self.decoded.keeps(w1, "folded_panels", 3 * (inter + PANEL) * (d + PANEL) * 4))

    def _panel_experts(self, x: Tensor, weights: Tensor, ids: Tensor, experts: Sequence[ExpertWeights | None],
                       held: set[int], limit: float, inter: int, form: str) -> Tensor:
        """Experts over any number of rows in one C call (`dsv4_panel_experts`): the routed rows grouped by expert
        and run eight at a time over the weights kept in panels (each read once per eight rows, where a
        row-by-row product or the reference's gathers, GEMMs and scatters cost a prefill's MoE several times its
        arithmetic), each token's outputs added in increasing expert id. Sums over k in order, so the same bits
        for a token whatever its batch. `form` "panels": float experts, plain fp32 within 1e-5 of the reference;
        "folded_panels": quantised experts over many rows (a prefill's) in exact numerics, act_quant's
        quantisation and the roundings to x's dtype in C, the products of the folded operands (as
        `_folded_swiglu`'s BLAS GEMMs) summed in their own order."""
        d = x.shape[-1]
        table = (ctypes.c_int64 * (3 * len(experts)))()
        keep: list = []
        for e in set(ids.reshape(-1).tolist()) & held:
            expert = experts[e]
            for i, (w, s) in enumerate(((expert.w1, expert.s1), (expert.w3, expert.s3), (expert.w2, expert.s2))):
                (panels,) = self.decoded.get(w, s if form == "folded_panels" else None, form)
                keep.append(panels)
                table[3 * e + i] = panels.data_ptr()
        x = x.reshape(-1, d).contiguous()
        ids = ids.to(torch.int64).contiguous()
        route = weights.to(torch.float32).contiguous()
        out = torch.empty(x.shape, dtype=torch.float32)
        _check(self.lib.dsv4_panel_experts(x.data_ptr(), _BF16[x.dtype], int(form == "folded_panels"),
                                           out.data_ptr(), ids.shape[0], ids.shape[1], ids.data_ptr(),
                                           route.data_ptr(), len(experts), table, d, inter, limit), "routed_experts")
        return out

    # ------------------------------------------------------------------------------------------ attention

    def sparse_attn(self, q: Tensor, kv: Tensor | Sequence[KVRows], idx: Tensor, sink: Tensor,
                    scale: float, cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
        """A decode's few queries over fp32 rows in one C call: the named rows read in place (dense runs, or pages
        through their table), every head of a query sharing each row read, the reference's 64-slot online
        softmax; a prefill chunk's in another (`_chunk_attn`). Over bf16 rows each probability is rounded to bf16
        before the value product, where a last-bit difference in a logit (a dot order other than BLAS's) flips a
        rounding now and then and grows through the FP8 activations downstream (measured: 4e-2 of the largest
        logit on the small preset, ten times the parity tolerance): those take `_rounded_attn`, the reference's
        bits, or the "cpu" backend's blocks. Rows stored in another form (a codec: FP8 entries) and a wanted
        gradient stay on the "cpu" backend."""
        if cos is not None:
            return self.rope_back(self.sparse_attn(q, kv, idx, sink, scale), cos, sin)
        b, s, h, d = q.shape
        runs = [kv] if isinstance(kv, Tensor) else list(kv)
        rows_dtype = runs[0].dtype
        if q.dtype == torch.bfloat16 and rows_dtype == torch.bfloat16:
            out = self._rounded_attn(q, runs, idx, sink, scale)
            if out is not None:
                return out
        chunk = b * s * h * idx.shape[-1] * d * 2 > NATIVE_MACS  # a prefill chunk: `_chunk_attn` or the "cpu" one
        if (q.dtype not in _BF16 or rows_dtype != torch.float32 or not _inference(q, sink, *_dense_runs(runs))
                or (chunk and not (q.dtype == torch.float32 and sink.dtype == torch.float32
                                   and scores_every_row(q, runs, idx.shape[-1])))):
            return super().sparse_attn(q, kv, idx, sink, scale)
        described = _run_descriptors(runs, rows_dtype)
        if described is None:  # a run in another form (a codec, another dtype)
            return super().sparse_attn(q, kv, idx, sink, scale)
        desc, keep = described
        q = q.contiguous()
        idx = idx.to(torch.int64).contiguous()
        if chunk:
            return self._chunk_attn(q, desc, len(runs), idx, sink, scale)
        sink = sink.to(torch.float32).contiguous()
        out = torch.empty_like(q)
        _check(self.lib.dsv4_sparse_attn(q.data_ptr(), out.data_ptr(), _BF16[q.dtype], b, s, h, d,
                                         (ctypes.c_int64 * len(desc))(*desc), len(runs), _BF16[rows_dtype],
                                         idx.data_ptr(), idx.shape[-1], sink.data_ptr(), scale), "sparse_attn")
        return out

    def _rounded_attn(self, q: Tensor, runs: list[KVRows], idx: Tensor, sink: Tensor, scale: float) -> Tensor | None:
        """Attention of bf16 queries over bf16 rows (exact numerics) bit for bit as the reference computes it, in two
        C calls around torch's exponential (`dsv4_rounded_attn_args` / `_out`: the slots' logits, the 64-slot
        blocks' shifts, sums in torch's order, bf16-rounded probabilities, value products and folds), where the
        "cpu" backend's blocks cost about thirty torch ops and an exponential of every masked slot's -inf (MKL's
        slow path). None where it does not apply: a gradient wanted, rows in another form (a codec), a width not a
        multiple of 16, or sums in an order the self-check (`_rounded_orders`) did not find here."""
        b, s, h, d = q.shape
        n = sum(run.shape[1] if isinstance(run, Tensor) else run.count for run in runs)
        if (self._lanes is None or idx.shape[-1] == 0 or n == 0 or not sink.is_floating_point()
                or sink.dtype == torch.float64 or not _inference(q, sink, *_dense_runs(runs))):
            return None
        described = _run_descriptors(runs, torch.bfloat16)
        if described is None or not self._rounded_orders(h, d):
            return None
        desc, keep = described  # keep: the tensors desc points into, alive through the call
        return self._rounded_call(q, runs, desc, idx, sink, scale)

    def _rounded_call(self, q: Tensor, runs: list[KVRows], desc: list[int], idx: Tensor, sink: Tensor,
                      scale: float) -> Tensor:
        """`_rounded_attn`'s calls (q bf16, or fp32 holding bf16 values: the self-check's, whose fp32 output shows
        every bit), a long chunk's queries a slice at a time (its arguments within `GATHER_BYTES`)."""
        b, s, h, d = q.shape
        k = idx.shape[-1]
        blocks, rest = -(-k // ATTN_BLOCK), k % ATTN_BLOCK
        step = max(CHUNK_QUERIES, GATHER_BYTES // (b * h * (k + blocks) * 4) // CHUNK_QUERIES * CHUNK_QUERIES)
        if s > step:
            return torch.cat([self._rounded_call(q[:, lo : lo + step], runs, desc, idx[:, lo : lo + step], sink, scale)
                              for lo in range(0, s, step)], dim=1)
        n = sum(desc[5 * r + 1] for r in range(len(runs)))
        named = int(s > 1 and n <= CHUNK_QUERIES * k)  # the queries share the rows they name (a prefill chunk)
        q, idx = q.contiguous(), idx.to(torch.int64).contiguous()
        sink = sink.to(torch.float32).contiguous()
        tail = None  # the last partial block's logits: the reference's own einsum (BLAS sums a few slots otherwise)
        if rest:
            rows = gather_kv(runs, idx[..., k - rest :], torch.float32)
            tail = torch.einsum("bshd,bskd->bshk", q.to(torch.float32), rows).contiguous()
        run_desc = (ctypes.c_int64 * len(desc))(*desc)
        args = torch.empty(b * s * h * (blocks * ATTN_BLOCK + blocks))
        zero = torch.empty(args.shape, dtype=torch.uint8)  # arguments below -104, written as 0: exp gives 0
        code = self.lib.dsv4_rounded_attn_args(q.data_ptr(), _BF16[q.dtype], b, s, h, d, run_desc, len(runs),
                                               idx.data_ptr(), k, None if tail is None else tail.data_ptr(),
                                               sink.data_ptr(), scale, named, args.data_ptr(), zero.data_ptr())
        if code == -1:
            raise IndexError(f"sparse_attn: a slot names a row past the {n} rows")
        _check(code, "sparse_attn")
        torch.exp(args, out=args)  # torch's exponential: the reference's bits
        out = torch.empty_like(q)
        _check(self.lib.dsv4_rounded_attn_out(args.data_ptr(), zero.data_ptr(), b, s, h, d, run_desc, len(runs),
                                              idx.data_ptr(), k, self._lanes, named, out.data_ptr(), _BF16[q.dtype]),
               "sparse_attn")
        return out

    def _rounded_orders(self, h: int, d: int) -> bool:
        """Whether `_rounded_call` gives the reference's bits for H heads of width D here: its logits and value
        products sum in order, which is BLAS's order only for some shapes (MKL splits a long dot product, and
        scores a few slots another way), so it is checked once per shape against the reference on random bf16
        values, queries held in fp32 (the fp32 outputs show every bit): a chunk's queries sharing their rows and
        a decode's one query, blocks whole and partial, unused slots. The kernels' exponentials are torch's over a
        buffer laid out otherwise than the reference's tensors, so torch's exp must also give an element the same
        bits wherever it sits (MKL's does; a vector loop with a scalar tail need not)."""
        if d % 16:  # the kernels read whole vectors of a row
            return False
        if (h, d) not in self._rounded_checked:
            gen = torch.Generator().manual_seed(h * 4096 + d)
            reference = ReferenceBackend()
            with torch.inference_mode():
                x = torch.rand(1100, generator=gen) * -90
                same = all(torch.equal(torch.exp(x[at : at + 1000]), torch.exp(x)[at : at + 1000]) for at in range(33))
                for s, n in ((20, 100), (1, 200)):
                    q = torch.randn(1, s, h, d, generator=gen).bfloat16().float()
                    rows = (torch.randn(1, n, d, generator=gen) * 2).bfloat16()
                    idx = torch.randint(0, n, (1, s, 2 * ATTN_BLOCK + 5), generator=gen)
                    idx[torch.rand(idx.shape, generator=gen) < 0.2] = -1
                    sink = torch.randn(h, generator=gen)
                    want = reference.sparse_attn(q, rows, idx, sink, d**-0.5)
                    got = self._rounded_call(q, [rows], [rows.data_ptr(), n, 0, 0, 0], idx, sink, d**-0.5)
                    same = same and torch.equal(got, want)
            self._rounded_checked[(h, d)] = same
        return self._rounded_checked[(h, d)]

    def _chunk_attn(self, q: Tensor, desc: list[int], n_runs: int, idx: Tensor, sink: Tensor, scale: float) -> Tensor:
        """A prefill chunk's fp32 attention in one C call (`dsv4_chunk_attn`) over runs of rows read in place (dense,
        or pages through their table: no concatenated copy): 16 queries at a time over the rows they name (a window
        band of W + 15 rows instead of the W + 63 of the "cpu" backend's 64-query blocks, whose BLAS GEMMs lose more
        than that over fewer queries), both products on the panel kernels, the blocks shared between threads as
        they come (a causal chunk's late blocks name more rows). Plain fp32 within 1e-5 of the reference."""
        b, s, h, d = q.shape
        n = sum(desc[5 * r + 1] for r in range(n_runs))
        sink = sink.contiguous()
        out = torch.empty_like(q)
        code = self.lib.dsv4_chunk_attn(q.data_ptr(), (ctypes.c_int64 * len(desc))(*desc), n_runs, idx.data_ptr(),
                                        sink.data_ptr(), b, s, h, d, n, idx.shape[-1], scale, EXP_FLOOR,
                                        out.data_ptr())
        if code == -1:
            raise IndexError(f"sparse_attn: a slot names a row past the {n} rows")
        _check(code, "sparse_attn")
        return out

    def _block_exponents(self, logits: Tensor, idx: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """The "cpu" backend's blocks of the queries' logits (scaled, masked, padded, their running maximum and
        shifts) in one C call instead of about ten torch ops, bit for bit (a scaling, comparisons and a
        subtraction each)."""
        if logits.dtype != torch.float32 or not _inference(logits):
            return super()._block_exponents(logits, idx, scale)
        b, s, h, k = logits.shape
        blocks = -(-k // ATTN_BLOCK)
        logits, idx = logits.contiguous(), idx.to(torch.int64).contiguous()
        exponents = torch.empty(b, s, h, blocks, ATTN_BLOCK)
        run_max, shift = torch.empty(b, s, h, blocks), torch.empty(b, s, h, blocks)
        _check(self.lib.dsv4_attn_block_exponents(logits.data_ptr(), idx.data_ptr(), b * s * h, h, k, blocks, scale,
                                                  exponents.data_ptr(), run_max.data_ptr(), shift.data_ptr()),
               "sparse_attn")
        return exponents, run_max, shift

    def _block_probs(self, p: Tensor, kv_dtype: torch.dtype, n_slots: int
                     ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The "cpu" backend's block sums (torch's summation order, as `rms_norm`) and probabilities rounded to the
        rows' dtype, written where the value products read them, in one C call, bit for bit."""
        if (self._lanes is None or p.dtype != torch.float32 or kv_dtype not in _BF16 or not p.is_contiguous()
                or not _inference(p)):
            return super()._block_probs(p, kv_dtype, n_slots)
        b, s, h, blocks, _ = p.shape
        full, tail = divmod(n_slots, ATTN_BLOCK)
        block_sum = torch.empty(b, s, h, blocks)
        probs = torch.empty(b * s * full, h, ATTN_BLOCK) if full else None
        tail_probs = torch.empty(b, s, h, tail) if tail else None
        _check(self.lib.dsv4_attn_block_probs(p.data_ptr(), b * s * h, h, blocks, n_slots, self._lanes,
                                              _BF16[kv_dtype], block_sum.data_ptr(),
                                              probs.data_ptr() if full else None,
                                              tail_probs.data_ptr() if tail else None), "sparse_attn")
        return block_sum, probs, tail_probs

    def _slot_logits(self, q: Tensor, rows: Tensor, rows_t: Tensor, idx: Tensor) -> Tensor:
        """The "cpu" backend's logits, the GEMM scoring only the rows the block of queries names when they are
        fewer (a prefill chunk's window band and its few compressed entries), which C finds, and each slot's logit
        picked in C (`dsv4_attn_slot_rows`, `dsv4_attn_pick`)."""
        if not _inference(q, rows):
            return super()._slot_logits(q, rows, rows_t, idx)
        b, m, h, d = q.shape
        n, k = rows.shape[1], idx.shape[-1]
        idx = idx.to(torch.int64).contiguous()
        used, cols = torch.empty(n, dtype=torch.int64), torch.empty(b, m, k, dtype=torch.int64)
        kept = self.lib.dsv4_attn_slot_rows(idx.data_ptr(), b, m, k, 0, m, n, used.data_ptr(), cols.data_ptr())
        if kept == -1:
            raise IndexError(f"sparse_attn: a slot names a row past the {n} rows")
        _check(int(kept < 0), "sparse_attn")
        named_t = rows_t if kept == n else rows.index_select(1, used[:kept]).transpose(1, 2)
        scores = torch.bmm(q.reshape(b, m * h, d), named_t)  # [B, m*H, N']
        logits = torch.empty(b, m, h, k)
        _check(self.lib.dsv4_attn_pick(scores.data_ptr(), cols.data_ptr(), b, m, h, k, kept, logits.data_ptr()),
               "sparse_attn")
        return logits

    def _scored_query_bytes(self, b: int, h: int, d: int, n: int, k: int) -> int:
        """Without gathered rows (`_block_values` reads them in place): scores, logits and exponents."""
        return b * h * (n + 2 * k) * 4

    def _block_values(self, rows: Tensor, idx: Tensor, probs: Tensor | None, tail_probs: Tensor | None
                      ) -> list[Tensor]:
        """The "cpu" backend's blocks' value products over bf16-rounded probabilities in one C call, bit for bit,
        reading the rows in place instead of gathering every query's rows (`dsv4_attn_block_values`)."""
        if rows.dtype != torch.float32 or not _inference(rows, *(t for t in (probs, tail_probs) if t is not None)):
            return super()._block_values(rows, idx, probs, tail_probs)
        b, n, d = rows.shape
        s, k = idx.shape[1], idx.shape[2]
        h = (probs if probs is not None else tail_probs).shape[-2]
        rows, idx = rows.contiguous(), idx.to(torch.int64).contiguous()
        probs = probs.contiguous() if probs is not None else None
        tail_probs = tail_probs.contiguous() if tail_probs is not None else None
        out = torch.empty(b, s, -(-k // ATTN_BLOCK), h, d)
        code = self.lib.dsv4_attn_block_values(probs.data_ptr() if probs is not None else None,
                                               tail_probs.data_ptr() if tail_probs is not None else None,
                                               rows.data_ptr(), idx.data_ptr(), b, s, h, d, k, n, out.data_ptr())
        if code == -2:
            raise IndexError(f"sparse_attn: a slot names a row past the {n} rows")
        _check(code, "sparse_attn")
        return list(out.unbind(2))

    def _dense_attn(self, q: Tensor, rows: Tensor, idx: Tensor, sink: Tensor, scale: float) -> Tensor:
        """The "cpu" backend's attention over a chunk's fp32 rows. Inference: `_chunk_attn` over the one run.
        Training: the "cpu" backend's blocks with their bookkeeping between the two GEMMs in three C calls instead
        of about thirty torch ops (`_chunk_attention`), and the gradient in closed form (`_ChunkAttention`)."""
        if (q.dtype != torch.float32 or rows.dtype != torch.float32 or sink.dtype != torch.float32
                or any(t.device.type != "cpu" for t in (q, rows, sink, idx))):
            return super()._dense_attn(q, rows, idx, sink, scale)
        if not _inference(q, rows, sink):
            if torch.is_autocast_enabled("cpu"):
                return super()._dense_attn(q, rows, idx, sink, scale)
            return _ChunkAttention.apply(q, rows, sink, idx, scale, self.lib)
        rows = rows.contiguous()
        return self._chunk_attn(q.contiguous(), [rows.data_ptr(), rows.shape[1], 0, 0, 0], 1,
                                idx.to(torch.int64).contiguous(), sink, scale)

    # ------------------------------------------------------------------------------------------ mHC

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """One C call instead of eight torch ops, bit for bit: the mean sums in torch's order, whose vector width
        the backend finds by a self-test when it starts (`_sum_lanes`; none found: the reference). In training
        (fp32) the same forward with a C backward (`_RmsNorm`)."""
        n = x.shape[-1]
        if (self._lanes is None or x.dtype not in _BF16 or weight.dtype != torch.float32 or weight.shape != (n,)
                or n > NATIVE_ROW_SUM or x.device.type != "cpu" or weight.device.type != "cpu"):
            return super().rms_norm(x, weight, eps)
        if _inference(x, weight):
            return self._rms_norm(x, weight, eps, self._lanes)
        if x.dtype != torch.float32:
            return super().rms_norm(x, weight, eps)
        return _RmsNorm.apply(x, weight, eps, self)

    def rms_norm_quant(self, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """`rms_norm` alone: this backend's linears and experts quantise their rows inside their C calls."""
        return self.rms_norm(x, weight, eps), None

    def head_norm(self, x: Tensor, eps: float, cos: Tensor | None = None, sin: Tensor | None = None,
                  inplace: bool = False) -> Tensor:
        """fp32: the C RMSNorm with a weight of ones (an exact product), bit for bit, with the rotation in the same
        pass when cos / sin are given (`dsv4_rms_norm_rope`, the bits of the two ops; `inplace`: over x, each row
        read whole before it is written); in training the C backward, then `rope`; bf16 computes in bf16: the
        reference."""
        n = x.shape[-1]
        if self._lanes is None or x.dtype != torch.float32 or n > NATIVE_ROW_SUM or x.device.type != "cpu":
            return super().head_norm(x, eps, cos, sin)
        ones = self._ones.get(n)
        if ones is None:  # a normal tensor even when first made in inference mode: training saves it for backward
            with torch.inference_mode(False):
                ones = self._ones[n] = torch.ones(n)
        if not _inference(x):
            y = _RmsNorm.apply(x, ones, eps, self)
            return y if cos is None else self.rope(y, cos, sin)
        if cos is None:
            return self._rms_norm(x, ones, eps, self._lanes)
        group = _rope_group(x, cos)
        if (not group or cos.dtype != torch.float32 or sin.dtype != torch.float32 or sin.shape != cos.shape
                or 2 * cos.shape[-1] > n or not _inference(cos, sin)):
            return self.rope(self._rms_norm(x, ones, eps, self._lanes), cos, sin)
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        out = x if inplace else torch.empty_like(x)  # (a strided x was copied just above: its copy is ours)
        _check(self.lib.dsv4_rms_norm_rope(x.data_ptr(), out.data_ptr(), 0, x.numel() // n, n, ones.data_ptr(), eps,
                                           self._lanes, cos.shape[-1], cos.data_ptr(), sin.data_ptr(), group),
               "head_norm")
        return out

    def _rms_norm(self, x: Tensor, weight: Tensor, eps: float, lanes: int, inv: Tensor | None = None) -> Tensor:
        """The C RMSNorm; each row's factor 1 / rms into `inv` [rows] fp32 when given."""
        x, weight = x.contiguous(), weight.contiguous()
        out = torch.empty_like(x)
        n = x.shape[-1]
        _check(self.lib.dsv4_rms_norm(x.data_ptr(), out.data_ptr(), _BF16[x.dtype], x.numel() // max(n, 1), n,
                                      weight.data_ptr(), eps, lanes, None if inv is None else inv.data_ptr()),
               "rms_norm")
        return out

    def hc_collapse(self, x: Tensor, pre: Tensor) -> Tensor:
        """One C call, bit for bit: over at most 4 streams torch's reduction adds the products in order. In
        training (fp32) with a C backward (`_HcCollapse`)."""
        b, s, h, d = x.shape
        if x.dtype not in _BF16 or pre.dtype != torch.float32 or h > 4 or x.device.type != "cpu":
            return super().hc_collapse(x, pre)
        if not _inference(x, pre):
            if x.dtype != torch.float32 or pre.device.type != "cpu":
                return super().hc_collapse(x, pre)
            return _HcCollapse.apply(x, pre, self)
        x, pre = x.contiguous(), pre.contiguous()
        u = x.new_empty(b, s, d)
        _check(self.lib.dsv4_hc_collapse(x.data_ptr(), pre.data_ptr(), u.data_ptr(), _BF16[x.dtype], b * s, h, d),
               "hc_collapse")
        return u

    def hc_pre(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int, eps: float,
               norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """fp32 streams in inference: one C pass per 16 tokens (`dsv4_hc_pre`: the mixes from fn kept in panels, the
        split, Sinkhorn and the collapse, instead of four calls and the BLAS product, whose 24 columns it ran at a
        third of its speed); plain fp32 in an order of its own, within 1e-5 of the reference. Other dtypes keep the
        three ops, each the reference's bits; training too."""
        b, s, h, d = x.shape
        m = (2 + h) * h
        if (x.dtype != torch.float32 or h != hc_mult or h > HC_MAX or iters < 1 or fn.shape != (m, h * d)
                or any(t.dtype != torch.float32 for t in (fn, scale, base)) or scale.numel() != 3
                or base.numel() != m or not _inference(x, fn, scale, base)
                or not self.decoded.keeps(fn, "panels", (m + PANEL) * h * d * 4)):
            return super().hc_pre(x, fn, scale, base, hc_mult, iters, eps, norm_eps)
        (panels,) = self.decoded.get(fn, None, "panels")
        x, scale, base = x.contiguous(), scale.contiguous(), base.contiguous()
        u, post, comb = x.new_empty(b, s, d), x.new_empty(b, s, h), x.new_empty(b, s, h, h)
        _check(self.lib.dsv4_hc_pre(x.data_ptr(), b * s, h, d, panels.data_ptr(), scale.data_ptr(), base.data_ptr(),
                                    iters, eps, norm_eps, u.data_ptr(), post.data_ptr(), comb.data_ptr()), "hc_pre")
        return u, post, comb

    def hc_mixes(self, x: Tensor, fn: Tensor, norm_eps: float) -> Tensor:
        """The RMS factor in one C call (the reference's bits, as `rms_norm`), the product in torch's GEMM; in
        training (fp32) with a backward of two GEMMs and one scaled add (`_HcMixes`) instead of autograd's chain
        through the mean of squares."""
        n = x.shape[-2] * x.shape[-1]
        if (self._lanes is None or x.dtype not in _BF16 or n > NATIVE_ROW_SUM or x.device.type != "cpu"
                or fn.device.type != "cpu"):
            return super().hc_mixes(x, fn, norm_eps)
        if _inference(x, fn):
            return self._hc_mixes(x, fn.to(torch.float32), norm_eps)[0]
        if x.dtype != torch.float32 or fn.dtype != torch.float32:
            return super().hc_mixes(x, fn, norm_eps)
        return _HcMixes.apply(x, fn, norm_eps, self)

    def _hc_mixes(self, x: Tensor, fn: Tensor, norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """(mixes [B, S, m], the RMS factors [B, S, 1], the product before them [B, S, m]) for fp32 fn [m, h*d]."""
        x = x.contiguous()
        n = x.shape[-2] * x.shape[-1]
        rms = torch.empty(*x.shape[:-2], 1)
        _check(self.lib.dsv4_rms_factor(x.data_ptr(), rms.data_ptr(), _BF16[x.dtype], x.numel() // max(n, 1), n,
                                        norm_eps, self._lanes), "hc_mixes")
        product = x.flatten(2).to(torch.float32) @ fn.t()
        return product * rms, rms, product

    def _sum_lanes(self) -> int | None:
        """The vector width of torch's float sum here (its summation order depends on it): the one whose C RMSNorm
        equals the reference's bit for bit on rows of many lengths, or None."""
        gen = torch.Generator().manual_seed(0)
        cases = [(torch.randn(rows, n, generator=gen) * 3, torch.randn(n, generator=gen))
                 for rows in (1, 37) for n in (3, 8, 24, 64, 100, 128, 512, 1000, 4096)]
        reference = super().rms_norm
        for lanes in (8, 16):
            if all(torch.equal(self._rms_norm(x.to(dtype), w, 1e-6, lanes), reference(x.to(dtype), w, 1e-6))
                   for x, w in cases for dtype in _BF16):
                return lanes
        return None

    def index_topk(self, scores: Tensor, visible: Tensor, k: int, offset: int = 0,
                   prefix: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One C call for the masking, the top-k, its order, the -1s and the gathered scores (about 25 torch ops,
        more when ties are cut) while the scores are few (`NATIVE_TOPK_SCORES`, a decode's or a short chunk's);
        a long prefill keeps torch's O(N) topk. In training the C call picks from a copy, and the picked scores are
        gathered from the scores masked as the reference masks them (autograd records both). A `prefix` is put
        before the ids by a concatenation."""
        if prefix is not None:
            ids, picked = self.index_topk(scores, visible, k, offset)
            return torch.cat((prefix, ids), dim=-1), picked
        n = scores.shape[-1]
        if (scores.dtype not in _BF16 or scores.numel() > NATIVE_TOPK_SCORES or not scores.is_contiguous()
                or scores.device.type != "cpu" or visible.device.type != "cpu"):
            return super().index_topk(scores, visible, k, offset)
        k = min(k, n)
        trains = not _inference(scores)
        visible = visible.to(torch.int64).contiguous()
        top = torch.empty(*scores.shape[:-1], k, dtype=torch.int64)
        top_scores = scores.new_empty(*scores.shape[:-1], k)
        picked_from = scores.detach().clone() if trains else scores
        _check(self.lib.dsv4_index_topk(picked_from.data_ptr(), _BF16[scores.dtype], scores.numel() // max(n, 1), n,
                                        visible.data_ptr(), k, top.data_ptr(), top_scores.data_ptr()), "index_topk")
        ids = torch.where(top >= 0, top + offset, -1) if offset else top
        if not trains:
            return ids, top_scores
        hidden = torch.arange(n, device=scores.device) >= visible.unsqueeze(-1)  # [B,S,N]
        picked = scores.masked_fill_(hidden, float("-inf")).gather(-1, top.clamp(min=0))
        return ids, torch.where(top >= 0, picked, float("-inf"))

    def hc_post(self, out: Tensor, x: Tensor, post: Tensor, comb: Tensor, inplace: bool = False) -> Tensor:
        """The write-back in one C call, bit for bit the reference's (the same rounded products, added over the
        streams in order); in training (fp32) with a C backward (`_HcPost`). `inplace` (no gradient wanted): over
        x's storage, each token's streams stored once all of them are computed; a new buffer's first write costs a
        read of its lines (a prefill's 1 MB of streams: ~100 -> ~60 us a call once x has left the core's cache)."""
        if (x.dtype not in _BF16 or out.dtype != x.dtype or post.dtype != torch.float32
                or comb.dtype != torch.float32 or any(t.device.type != "cpu" for t in (out, x, post, comb))):
            return super().hc_post(out, x, post, comb)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (out, x, post, comb)):
            if x.dtype != torch.float32:
                return super().hc_post(out, x, post, comb)
            return _HcPost.apply(out, x, post, comb, self.lib)
        return _hc_post(self.lib, out, x, post, comb, inplace)

    def hc_split_sinkhorn(self, mixes: Tensor, scale: Tensor, base: Tensor, hc_mult: int, iters: int,
                          eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """Bit for bit the reference. The 2 * iters normalisations, about 120 tiny torch ops (and as many autograd
        nodes in training), run as one C call whose sums and divisions are the reference's. For inference the
        splits run in C too (`_split_sinkhorn`); with gradients they stay torch ops, and the normalisations get a
        C backward."""
        h = hc_mult
        if (mixes.dtype != torch.float32 or mixes.shape[-1] != (2 + h) * h or iters < 1 or h > 16
                or any(t.device.type != "cpu" for t in (mixes, scale, base))):
            return super().hc_split_sinkhorn(mixes, scale, base, hc_mult, iters, eps)
        scale, base = scale.to(torch.float32), base.to(torch.float32)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (mixes, scale, base))):
            return self._split_sinkhorn(mixes.contiguous(), scale.contiguous(), base.contiguous(), h, iters, eps)
        # the reference's m * scale + base of each part as one product and one sum (the same roundings), split
        # once: one backward instead of a zero-filled copy of the mixes per slice
        scales = scale.repeat_interleave(torch.tensor([h, h, h * h], device=scale.device))
        pre, post, logits = (mixes * scales + base).split([h, h, h * h], dim=-1)
        # contiguous, as the reference's: torch's sigmoid rounds a strided view's elements differently
        pre, post = torch.sigmoid(pre.contiguous()) + eps, 2.0 * torch.sigmoid(post.contiguous())
        logits = logits.unflatten(-1, (h, h))
        comb = torch.exp(logits - logits.amax(dim=-1, keepdim=True).detach())  # [..., h, h]
        return pre, post, _SinkhornNormalise.apply(comb, self.lib, iters, eps)

    def _split_sinkhorn(self, mixes: Tensor, scale: Tensor, base: Tensor, h: int, iters: int, eps: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """Inference: the splits in one C call, torch's sigmoids and exp in place (their rounding depends on a
        tensor's length, so the tensors have the reference's shapes), then the rest in another C call: 8 ops where
        the torch split takes about 26."""
        lead, t = mixes.shape[:-1], mixes.numel() // ((2 + h) * h)
        pre, post = mixes.new_empty(*lead, h), mixes.new_empty(*lead, h)
        comb = mixes.new_empty(*lead, h, h)
        _check(self.lib.dsv4_hc_split(mixes.data_ptr(), scale.data_ptr(), base.data_ptr(), t, h,
                                      pre.data_ptr(), post.data_ptr(), comb.data_ptr()), "hc_split_sinkhorn")
        pre.sigmoid_(), post.sigmoid_(), comb.exp_()
        _check(self.lib.dsv4_hc_split_finish(pre.data_ptr(), post.data_ptr(), comb.data_ptr(), t, h, iters, eps),
               "hc_split_sinkhorn")
        return pre, post, comb


class _SinkhornNormalise(torch.autograd.Function):
    """The Sinkhorn normalisations of exp'd mixing matrices [..., h, h] in C, forward and backward (the backward
    replays the forward per token: nothing but the input is kept)."""

    @staticmethod
    def forward(ctx, comb: Tensor, lib: ctypes.CDLL, iters: int, eps: float) -> Tensor:
        comb = comb.contiguous()
        out = comb.clone()
        h = comb.shape[-1]
        _check(lib.dsv4_sinkhorn(out.data_ptr(), out.numel() // (h * h), h, iters, eps), "hc_split_sinkhorn")
        ctx.save_for_backward(comb)
        ctx.lib, ctx.iters, ctx.eps = lib, iters, eps
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (comb,) = ctx.saved_tensors
        grad = grad.to(torch.float32).contiguous()
        out = torch.empty_like(comb)
        h = comb.shape[-1]
        _check(ctx.lib.dsv4_sinkhorn_backward(comb.data_ptr(), grad.data_ptr(), out.data_ptr(),
                                              comb.numel() // (h * h), h, ctx.iters, ctx.eps), "hc_split_sinkhorn")
        return out, None, None, None


def _hc_post(lib: ctypes.CDLL, out: Tensor, x: Tensor, post: Tensor, comb: Tensor, inplace: bool = False) -> Tensor:
    out, x, post, comb = out.contiguous(), x.contiguous(), post.contiguous(), comb.contiguous()
    b, s, h, d = x.shape
    new = x if inplace else torch.empty_like(x)  # (a strided x was copied just above: its copy is ours)
    _check(lib.dsv4_hc_post(out.data_ptr(), x.data_ptr(), new.data_ptr(), _BF16[x.dtype], b * s, h, d,
                            post.data_ptr(), comb.data_ptr()), "hc_post")
    return new


class _HcPost(torch.autograd.Function):
    """mHC's write-back, new_k = post_k * out + sum_j comb[j,k] * x_j, fp32: the C forward and a C backward (every
    gradient of a token in one pass over its streams)."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, post: Tensor, comb: Tensor, lib: ctypes.CDLL) -> Tensor:
        out, x, post, comb = out.contiguous(), x.contiguous(), post.contiguous(), comb.contiguous()
        ctx.save_for_backward(out, x, post, comb)
        ctx.lib = lib
        return _hc_post(lib, out, x, post, comb)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:
        out, x, post, comb = ctx.saved_tensors  # [B,S,d], [B,S,h,d], [B,S,h], [B,S,h,h]
        grad = grad.to(torch.float32).contiguous()  # [B,S,h(k),d]
        b, s, h, d = x.shape
        d_out, d_x, d_post, d_comb = (torch.empty_like(t) for t in (out, x, post, comb))
        _check(ctx.lib.dsv4_hc_post_backward(out.data_ptr(), x.data_ptr(), post.data_ptr(), comb.data_ptr(),
                                             grad.data_ptr(), d_out.data_ptr(), d_x.data_ptr(), d_post.data_ptr(),
                                             d_comb.data_ptr(), b * s, h, d), "hc_post")
        return d_out, d_x, d_post, d_comb, None


class _HcCollapse(torch.autograd.Function):
    """mHC's read of the streams, u = sum_k pre_k * x_k, fp32: the C forward and a C backward."""

    @staticmethod
    def forward(ctx, x: Tensor, pre: Tensor, backend: NativeBackend) -> Tensor:
        x, pre = x.contiguous(), pre.contiguous()
        ctx.save_for_backward(x, pre)
        ctx.lib = backend.lib
        return backend.hc_collapse(x, pre)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, pre = ctx.saved_tensors  # [B,S,h,d], [B,S,h]
        grad = grad.to(torch.float32).contiguous()  # [B,S,d]
        b, s, h, d = x.shape
        d_x, d_pre = torch.empty_like(x), torch.empty_like(pre)
        _check(ctx.lib.dsv4_hc_collapse_backward(x.data_ptr(), pre.data_ptr(), grad.data_ptr(), d_x.data_ptr(),
                                                 d_pre.data_ptr(), b * s, h, d), "hc_collapse")
        return d_x, d_pre, None


class _RmsNorm(torch.autograd.Function):
    """fp32 RMSNorm in training: the C forward (the reference's bits) keeping each row's factor, and a C backward,
    dx = inv (g w) - x inv^3 sum(g w x) / n and dw = sum over rows of g x inv, instead of autograd's passes through
    the square, mean, rsqrt and products."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, backend: NativeBackend) -> Tensor:
        x = x.contiguous()
        inv = torch.empty(x.shape[:-1], dtype=torch.float32)
        out = backend._rms_norm(x, weight, eps, backend._lanes, inv)
        ctx.save_for_backward(x, weight, inv)
        ctx.lib = backend.lib
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, weight, inv = ctx.saved_tensors
        grad, weight = grad.to(torch.float32).contiguous(), weight.contiguous()  # named: alive during the call
        n = x.shape[-1]
        dx = torch.empty_like(x)
        dw = torch.empty(n, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        _check(ctx.lib.dsv4_rms_norm_backward(x.data_ptr(), grad.data_ptr(), weight.data_ptr(),
                                              inv.data_ptr(), dx.data_ptr(), None if dw is None else dw.data_ptr(),
                                              x.numel() // max(n, 1), n), "rms_norm")
        return dx, dw, None, None


class _HcMixes(torch.autograd.Function):
    """mHC's coefficients in training, mixes = (x @ fn^T) * r with r = 1 / rms(x) per token: the inference forward,
    and the backward as d(product) = g r, d fn = d(product)^T x, dx = d(product) fn - x r^3 sum(g product) / n."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Tensor, norm_eps: float, backend: NativeBackend) -> Tensor:
        x = x.contiguous()
        mixes, rms, product = backend._hc_mixes(x, fn, norm_eps)
        ctx.save_for_backward(x, fn, rms, product)
        return mixes

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None, None]:
        x, fn, rms, product = ctx.saved_tensors  # [B,S,h,d], [m, n], [B,S,1], [B,S,m]
        flat = x.flatten(2)  # [B,S,n]
        d_product = grad * rms
        d_fn = d_product.flatten(0, -2).t() @ flat.flatten(0, -2) if ctx.needs_input_grad[1] else None
        d_rms = (grad * product).sum(dim=-1, keepdim=True)  # [B,S,1]
        dx = (d_product @ fn).addcmul_(flat, d_rms * rms.pow(3), value=-1.0 / flat.shape[-1])
        return dx.view_as(x), d_fn, None, None


class _Rope(torch.autograd.Function):
    """RoPE in training: the C rotation forward, and its gradient the opposite rotation of the output's."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool, group: int, backend: NativeBackend
                ) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.inverse, ctx.group, ctx.backend = inverse, group, backend
        return backend._rope(x, cos, sin, inverse, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        cos, sin = ctx.saved_tensors
        return ctx.backend._rope(grad, cos, sin, not ctx.inverse, ctx.group), None, None, None, None, None


class _Hadamard(torch.autograd.Function):
    """The normalised Walsh-Hadamard transform in training: H / sqrt(n) is symmetric and orthogonal, so the gradient
    is the same transform of the output's."""

    @staticmethod
    def forward(ctx, x: Tensor, backend: NativeBackend) -> Tensor:
        ctx.backend = backend
        return backend.hadamard(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.backend.hadamard(grad), None


class _SwigluActivation(torch.autograd.Function):
    """SwiGLU's activation in training, hidden = weights * (silu(min(gate, L)) * clamp(up, -L, L)) for the fp32
    projections gate, up [n, inter] and routing weights [n, 1] (or None): the reference's ops forward; backward
    torch's sigmoid, then the clamps', silu's and products' gradients in one C pass (each row's routing-weight
    gradient summed in 16 lanes)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, weights: Tensor | None, limit: float, lib: ctypes.CDLL) -> Tensor:
        hidden = F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
        if weights is not None:
            hidden = weights * hidden
        ctx.save_for_backward(gate, up, weights)
        ctx.limit, ctx.lib = limit, lib
        return hidden

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None, None, None]:
        gate, up, weights = ctx.saved_tensors
        gate, up, grad = gate.contiguous(), up.contiguous(), grad.to(torch.float32).contiguous()
        n = gate.shape[-1]
        rows = gate.numel() // max(n, 1)
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        d_weights = None
        if weights is not None:
            weights = weights.to(torch.float32).contiguous()
            d_weights = torch.empty_like(weights)
        sig = torch.sigmoid(gate.clamp(max=ctx.limit))  # torch's vectorised exp, not libm's per element
        _check(ctx.lib.dsv4_swiglu_backward(gate.data_ptr(), up.data_ptr(), sig.data_ptr(),
                                            None if weights is None else weights.data_ptr(), grad.data_ptr(),
                                            d_gate.data_ptr(), d_up.data_ptr(),
                                            None if d_weights is None else d_weights.data_ptr(), rows, n, ctx.limit),
               "swiglu")
        return d_gate, d_up, d_weights, None, None


def _chunk_attention(lib: ctypes.CDLL, q: Tensor, rows: Tensor, idx: Tensor, sink: Tensor, scale: float, floor: float,
                     keep: bool = False) -> tuple[Tensor, list]:
    """Attention of a chunk's queries q [B, S, H, D] over fp32 rows [B, N, D] as `NativeBackend._dense_attn` computes
    it, exp's arguments floored at `floor`: the output [B, S, H, D] and (`keep`, for a backward) each block's
    (first and last query, the ids of the rows it names or None for all, its weighted probabilities [B, m*H, N'],
    shifts and denominators [B, m, H])."""
    b, s, h, d = q.shape
    n = rows.shape[1]
    idx = idx.to(torch.int64).contiguous()
    sink = sink.to(torch.float32).contiguous()
    out = torch.empty(b, s, h, d)
    used = torch.empty(n, dtype=torch.int64)
    counts = torch.empty(b * min(s, DENSE_QUERY_BLOCK) * n)
    blocks = []
    for lo in range(0, s, DENSE_QUERY_BLOCK):
        hi = min(s, lo + DENSE_QUERY_BLOCK)
        m = hi - lo
        kept = lib.dsv4_attn_rows(idx.data_ptr(), b, s, idx.shape[-1], lo, hi, n, used.data_ptr(), counts.data_ptr())
        if kept < 0:
            raise IndexError(f"sparse_attn: a slot names a row past the {n} rows")
        named_ids = None if kept == n else used[:kept].clone()
        named = rows if named_ids is None else rows.index_select(1, named_ids)  # [B, N', D]
        p = torch.bmm(q[:, lo:hi].reshape(b, m * h, d), named.transpose(1, 2))  # [B, m*H, N'] the scores, then p
        shift, denom = torch.empty(b * m * h), torch.empty(b * m * h)
        _check(lib.dsv4_attn_logits(p.data_ptr(), counts.data_ptr(), b * m * h, h, kept, sink.data_ptr(), scale, floor,
                                    shift.data_ptr()), "sparse_attn")
        p.exp_()
        _check(lib.dsv4_attn_weights(p.data_ptr(), counts.data_ptr(), b * m * h, h, kept, sink.data_ptr(),
                                     shift.data_ptr(), denom.data_ptr()), "sparse_attn")
        torch.div(torch.bmm(p, named).view(b, m, h, d), denom.view(b, m, h, 1), out=out[:, lo:hi])
        if keep:
            blocks.append((lo, hi, named_ids, p, shift.view(b, m, h), denom.view(b, m, h)))
    return out, blocks


class _ChunkAttention(torch.autograd.Function):
    """Attention over a chunk's fp32 rows in training: `NativeBackend._dense_attn`'s forward (a block of queries at a
    time, the bookkeeping in C, exp's arguments floored at `TRAIN_EXP_FLOOR` as the "cpu" backend's training forward
    does), keeping each block's named rows' ids, weighted probabilities and shifts; the gradient in closed form
    (`softmax_attention_grads`, as the "cpu" backend's `_DenseSoftmax`) per block, with the blocks' slices of q and
    the named rows' gradients written into place (no autograd nodes for the slicing, gathering and concatenation)."""

    @staticmethod
    def forward(ctx, q: Tensor, rows: Tensor, sink: Tensor, idx: Tensor, scale: float, lib: ctypes.CDLL) -> Tensor:
        q, rows, sink = q.contiguous(), rows.contiguous(), sink.contiguous()
        out, ctx.blocks = _chunk_attention(lib, q, rows, idx, sink, scale, TRAIN_EXP_FLOOR, keep=True)
        ctx.save_for_backward(q, rows, sink, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None, None]:
        q, rows, sink, out = ctx.saved_tensors
        grad = grad.to(torch.float32)
        d_q, d_rows, d_sink = torch.empty_like(q), torch.zeros_like(rows), torch.zeros_like(sink)
        for lo, hi, named_ids, p, shift, denom in ctx.blocks:
            named = rows if named_ids is None else rows.index_select(1, named_ids)
            d_q[:, lo:hi], d_named, d_block_sink = softmax_attention_grads(
                grad[:, lo:hi], q[:, lo:hi], named, out[:, lo:hi], p, torch.exp(sink - shift), denom, ctx.scale)
            if named_ids is None:
                d_rows += d_named
            else:
                d_rows.index_add_(1, named_ids, d_named)
            d_sink += d_block_sink
        return d_q, d_rows, d_sink, None, None, None
