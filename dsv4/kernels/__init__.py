"""The kernel seam: every numerical op that the model, the QAT simulation and the KV codecs use, dispatched to a
backend chosen by name.

Callers use the functions of this module (`kernels.linear(x, w, s)`, `kernels.sparse_attn(...)`); each runs the
op on the *active* backend:

* by default the backend named by the environment variable `DSV4_KERNEL_BACKEND`, else "auto": the fastest
  backend for the device of each op's first tensor ("native" on the CPU, its C kernels built at first use, or
  "cpu" when no C compiler can build them; "triton" on CUDA when the `triton` package is installed; the
  "reference" elsewhere);
* inside `with kernels.use_backend(name):` that one. The choice is a context variable, so it holds per thread
  and per asyncio task, and two engines in one process may run different backends.

A backend is an object with one method per op in `OPS`, with the signatures of `ReferenceBackend`
(`reference.py`, the pure-torch oracle that is always present and that every faster backend is tested
against). Adding one takes one module, a class deriving from `ReferenceBackend` that overrides the ops it
accelerates (the rest fall back to the oracle, and an op the oracle builds from others, e.g. `linear` from
`act_quant` and `fp8_gemm`, picks the override up), plus one line in `_BUILTIN`, e.g.
`"triton": "dsv4.kernels.triton:TritonBackend"`. The module is imported only when its backend is chosen, so its
optional dependencies cost nothing to anyone else (`_REQUIRES` names them, so "auto" skips a backend whose
package is missing). `register_backend` adds one at run time (tests, plugins).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..quant import FP8_BLOCK, INDEXER_SIM_BLOCK, KV_SIM_BLOCK
from .cross_entropy import IGNORE_INDEX, summed_cross_entropy
from .experts import ExpertWeights
from .paged import KVRows, PagedRows, RowCodec

ENV_VAR = "DSV4_KERNEL_BACKEND"
DEFAULT_BACKEND = "auto"
# the backend "auto" runs an op on, by the device type of the op's first tensor (other devices: "reference"), and
# the one it falls back to when that backend cannot run here (a package missing, C kernels that cannot be built)
BY_DEVICE = {"cpu": "native", "cuda": "triton"}
FALLBACK = {"native": "cpu", "triton": "reference"}

OPS = (
    "act_quant",
    "fp8_simulate",
    "fp4_quant",
    "fp4_simulate",
    "fp8_weight_simulate",
    "fp4_weight_simulate",
    "fp8_gemm",
    "fp4_gemm",
    "linear",
    "linears",
    "greedy_head",
    "head_cross_entropy",
    "hadamard",
    "rms_norm",
    "rms_norm_quant",
    "head_norm",
    "rope",
    "norm_rope_qat",
    "norm_rope_store",
    "sparse_attn",
    "index_scores",
    "index_topk",
    "hc_mixes",
    "hc_pre",
    "hc_pre_norm",
    "hc_collapse",
    "hc_head",
    "hc_split_sinkhorn",
    "hc_post",
    "gated_pool",
    "ring_pool",
    "project_ring_pool",
    "store_rows",
    "load_rows",
    "attends_in_place",
    "moe_gate",
    "routes_on_device",
    "routed_experts",
    "swiglu",
)

# name -> "module:attribute" of a backend class (imported when first chosen) or a zero-argument factory
_BUILTIN: dict[str, str] = {
    "reference": "dsv4.kernels.reference:ReferenceBackend",
    "cpu": "dsv4.kernels.cpu:CpuBackend",
    "auto": "dsv4.kernels:AutoBackend",
    "triton": "dsv4.kernels.triton:TritonBackend",
    "native": "dsv4.kernels.native:NativeBackend",
}
# the optional package a built-in backend imports ("auto" passes over the backend when it is not installed)
_REQUIRES = {"triton": "triton"}
# a built-in backend's test of whether it can run here ("module:function" returning a bool; "auto" passes over it
# when false)
_PROBES = {"native": "dsv4.kernels.native.build:available"}
_factories: dict[str, str | Callable[[], Any]] = dict(_BUILTIN)
_instances: dict[str, Any] = {}
_active: contextvars.ContextVar[Any] = contextvars.ContextVar("dsv4_kernel_backend", default=None)


class UnknownBackendError(ValueError):
    """A kernel backend name that is not registered."""


def backend_names() -> list[str]:
    """The registered backend names (built in and added with `register_backend`)."""
    return sorted(_factories)


def register_backend(name: str, factory: str | Callable[[], Any]) -> None:
    """Make `name` selectable: `factory` is a backend class (or any zero-argument callable returning a backend)
    or a "module:attribute" path to one. Re-registering a name replaces it."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a kernel backend needs a non-empty name, got {name!r}")
    _factories[name] = factory
    _instances.pop(name, None)


def get_backend(name: str) -> Any:
    """The backend registered as `name` (built once, then shared); UnknownBackendError names the choices."""
    if name not in _instances:
        factory = _factories.get(name)
        if factory is None:
            raise UnknownBackendError(f"unknown kernel backend {name!r}; available: {', '.join(backend_names())}")
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        backend = factory()
        missing = [op for op in OPS if not callable(getattr(backend, op, None))]
        if missing:
            raise TypeError(f"kernel backend {name!r} lacks the ops {', '.join(missing)}")
        _instances[name] = backend
    return _instances[name]


def default_backend_name() -> str:
    """The backend used outside `use_backend`: $DSV4_KERNEL_BACKEND, else "auto"."""
    return os.environ.get(ENV_VAR) or DEFAULT_BACKEND


def resolve_backend_name(name: str, device: torch.device | str) -> str:
    """The backend `name` stands for on `device`: "auto" becomes the device's own choice (`BY_DEVICE`, or its
    `FALLBACK` while that one cannot run here), any other name stays as it is."""
    if name != "auto":
        return name
    chosen = BY_DEVICE.get(torch.device(device).type, "reference")
    while chosen in FALLBACK and not backend_available(chosen):
        chosen = FALLBACK[chosen]
    return chosen


def backend_available(name: str) -> bool:
    """Whether the built-in backend `name` can run here: its optional package is installed and its probe (the
    native kernels' build) succeeds. Other backends are taken to be available."""
    package = _REQUIRES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        return False
    probe = _PROBES.get(name)
    if probe is None:
        return True
    module, _, attr = probe.partition(":")
    return bool(getattr(importlib.import_module(module), attr)())


class AutoBackend:
    """The backend registered as "auto": each op runs on the backend `BY_DEVICE` names for the device of the
    op's first tensor, so one process may compute on the CPU and an accelerator without choosing by hand."""

    name = "auto"

    def __init__(self) -> None:
        self._by_type: dict[str, Any] = {}

    def backend_for(self, device: torch.device) -> Any:
        backend = self._by_type.get(device.type)
        if backend is None:
            backend = self._by_type[device.type] = get_backend(resolve_backend_name("auto", device))
        return backend


def _auto_op(op: str) -> Callable[..., Any]:
    def run(self: AutoBackend, first: Any, *args: Any) -> Any:
        tensor = first if isinstance(first, torch.Tensor) else first.pool if isinstance(first, PagedRows) else args[0]
        return getattr(self.backend_for(tensor.device), op)(first, *args)

    run.__name__ = op
    return run


for _op in OPS:
    setattr(AutoBackend, _op, _auto_op(_op))


def active_backend() -> Any:
    """The backend the op functions of this module run on now."""
    backend = _active.get()
    return backend if backend is not None else get_backend(default_backend_name())


@contextlib.contextmanager
def use_backend(backend: str | Any | None) -> Iterator[Any]:
    """Run the ops inside the block on `backend` (a registered name or a backend object; None: leave the
    choice as it is). Yields the backend."""
    if backend is None:
        yield active_backend()
        return
    chosen = get_backend(backend) if isinstance(backend, str) else backend
    token = _active.set(chosen)
    try:
        yield chosen
    finally:
        _active.reset(token)


# ---------------------------------------------------------------------------------------------- the ops
# One function per op; the signatures and documentation are `ReferenceBackend`'s.


def act_quant(x: torch.Tensor, block_size: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 codes and fp32 power-of-two scales of x per block of `block_size` along the last dim."""
    return active_backend().act_quant(x, block_size)


def fp8_simulate(x: torch.Tensor, block_size: int = KV_SIM_BLOCK) -> torch.Tensor:
    """x rounded through FP8 blocks and back (the cached KV nope dims; QAT activations with 128)."""
    return active_backend().fp8_simulate(x, block_size)


def fp4_quant(x: torch.Tensor, block_size: int = INDEXER_SIM_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """e2m1 codes and fp32 power-of-two scales of x per block of `block_size` (indexer queries and keys)."""
    return active_backend().fp4_quant(x, block_size)


def fp4_simulate(x: torch.Tensor, block_size: int = INDEXER_SIM_BLOCK) -> torch.Tensor:
    """x rounded through FP4 blocks and back."""
    return active_backend().fp4_simulate(x, block_size)


def fp8_weight_simulate(w: torch.Tensor) -> torch.Tensor:
    """A weight rounded through the checkpoint's FP8 128x128-tile format and back (QAT)."""
    return active_backend().fp8_weight_simulate(w)


def fp4_weight_simulate(w: torch.Tensor, fp8_step: bool = True) -> torch.Tensor:
    """An expert weight rounded through MXFP4 (and the FP4 -> FP8 re-encoding) and back (QAT)."""
    return active_backend().fp4_weight_simulate(w, fp8_step)


def fp8_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x @ W^T for FP8 activations and an FP8 weight with 128x128 tile scales."""
    return active_backend().fp8_gemm(xq, xs, w, ws, out_dtype)


def fp4_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x @ W^T for FP8 activations and a packed FP4 weight with 1x32 scales."""
    return active_backend().fp4_gemm(xq, xs, w, ws, out_dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x @ weight^T, dispatched on the weight's storage format (FP8, packed FP4, or float); `quantized`: act_quant(x)
    where the caller has it (`rms_norm_quant`), read by a quantised weight's GEMM instead of quantising x again."""
    if quantized is None:
        return active_backend().linear(x, weight, scale)
    return active_backend().linear(x, weight, scale, quantized)


def linears(x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
            quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """`linear(x, weight, scale, quantized)` for each (weight, scale) of one input x, in order: one op, so that a
    backend can run the GEMMs of several quantised weights over the same activations as one launch (a decode
    step's wq_a and wkv)."""
    return active_backend().linears(x, weights, quantized)


def greedy_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The greedy token (first maximum) of each row of x @ weight^T, a float vocabulary projection: int64 [...]."""
    return active_backend().greedy_head(x, weight)


def head_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of the cross-entropy of x @ weight^T (a float vocabulary projection) against targets, ignored targets
    left out: a 0-dim fp32 tensor, differentiable, computed without all the logits where the backend can."""
    return active_backend().head_cross_entropy(x, weight, targets, ignore_index)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform over the last dim."""
    return active_backend().hadamard(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32 with an fp32 weight, returned in x.dtype."""
    return active_backend().rms_norm(x, weight, eps)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """`rms_norm`, and act_quant of its output for the quantised linears that read it (None from a backend whose
    linears quantise their input themselves); for inference."""
    return active_backend().rms_norm_quant(x, weight, eps)


def head_norm(x: torch.Tensor, eps: float, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
              inplace: bool = False) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim in x's dtype (the per-head query normalisation), then rotated as
    `rope(., cos, sin)` when cos / sin are given. `inplace`: the caller has no further use for x, so a backend may
    write the result over it (the returned tensor holds it either way)."""
    return active_backend().head_norm(x, eps, cos, sin, inplace)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False,
         inplace: bool = False) -> torch.Tensor:
    """x with its last 2*cos.shape[-1] dims rotated by interleaved pairs (by the negative angle if `inverse`;
    written into x if `inplace`)."""
    return active_backend().rope(x, cos, sin, inverse, inplace)


def norm_rope_qat(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  qat: str = "none") -> torch.Tensor:
    """RMSNorm (weight None: none), the rotation of the last dims, then the QAT rounding `qat` ("none", "fp8_nope",
    "hadamard", "hadamard_fp4") of the rows a cache or the indexer stores: one op, a new tensor in x's dtype."""
    return active_backend().norm_rope_qat(x, weight, eps, cos, sin, qat)


def norm_rope_store(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                    qat: str, dest: PagedRows, rows: torch.Tensor | None, index: torch.Tensor) -> None:
    """`norm_rope_qat` of rows that go straight into a cache: the result stored as `store_rows(., dest, rows, index)`
    stores it (x [M, D] with rows [M], or x [B, S, D] with rows None), and not returned. One op, so that a backend
    can normalise, round, encode and store a decode step's window row or compressed entry in one pass."""
    active_backend().norm_rope_store(x, weight, eps, cos, sin, qat, dest, rows, index)


def sparse_attn(q: torch.Tensor, kv: torch.Tensor | Sequence[KVRows], idx: torch.Tensor, sink: torch.Tensor,
                scale: float, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """Each query's attention over its own KV rows (dense or paged in place), with the per-head sink; with cos /
    sin [B, S, rope/2], the output's last dims rotated back (the inverse `rope`)."""
    if cos is None:
        return active_backend().sparse_attn(q, kv, idx, sink, scale)
    return active_backend().sparse_attn(q, kv, idx, sink, scale, cos, sin)


def index_scores(q: torch.Tensor, keys: KVRows, weights: torch.Tensor,
                 visible: torch.Tensor | None = None, weight_scale: float = 1.0) -> torch.Tensor:
    """The lightning indexer's scores [B, S, N]: sum_h weights[b, s, h] * ReLU(q[b, s, h] . keys[b, n]), the weights
    first times `weight_scale` in their dtype; keys dense [B, N, D] or paged in a cache's pool (`PagedRows`), taken
    in q's dtype. With `visible` [B, S] (the entries each query sees) the scores of
    later entries are left unspecified: a backend may skip them (their top-k masks them)."""
    if weight_scale == 1.0:
        return active_backend().index_scores(q, keys, weights, visible)
    return active_backend().index_scores(q, keys, weights, visible, weight_scale)


def index_topk(scores: torch.Tensor, visible: torch.Tensor, k: int, offset: int = 0,
               prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer's picks [B, S, k] (ids by descending score, ties to the earlier entry, plus `offset`; -1 past a
    query's `visible` entries; after `prefix` [B, S, W] where given) and their scores (-inf at the -1s). It may mask
    `scores` in place past `visible` (the reference does); nothing may rely on it either way."""
    if prefix is None:
        return active_backend().index_topk(scores, visible, k, offset)
    return active_backend().index_topk(scores, visible, k, offset, prefix)


def gated_pool(kv: torch.Tensor, score: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The compressor's pooling [E, c]: per entry and channel, its candidate rows of kv [N, c] weighted by the
    softmax of their scores (candidates [E, n], -1 for one that does not exist)."""
    return active_backend().gated_pool(kv, score, candidates)


def ring_pool(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor,
              ring_kv: torch.Tensor, ring_score: torch.Tensor, ring_base: torch.Tensor, pool: bool,
              dtype: torch.dtype) -> torch.Tensor | None:
    """A decode step's compressor: each row's token (at positions [B]) into its ring slot (kv, score + its `ape`
    row), then, with `pool`, the entry it belongs to pooled from the rings in place ([B, c] in dtype; else None).
    The slots and candidates follow from the positions and each row's ring start `ring_base` [B]."""
    return active_backend().ring_pool(kv, score, ape, positions, ring_kv, ring_score, ring_base, pool, dtype)


def project_ring_pool(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor,
                      positions: torch.Tensor, ring_kv: torch.Tensor, ring_score: torch.Tensor, ring_base: torch.Tensor,
                      pool: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """`ring_pool` of the projections of the tokens x [B, K]: kv = linear(x in fp32, wkv), score = linear(x in
    fp32, wgate) (float weights [C, K]), which a backend may compute without holding them."""
    return active_backend().project_ring_pool(x, wkv, wgate, ape, positions, ring_kv, ring_score, ring_base, pool,
                                              dtype)


def store_rows(values: torch.Tensor, dest: PagedRows, rows: torch.Tensor | None, index: torch.Tensor) -> None:
    """Write compute rows into a cache's stored rows in place, encoded by `dest.codec` (None: as the pool's dtype):
    values [M, D] as row index[i] of batch row rows[i] of `dest`, or with rows None, values [B, S, D] as row
    index[b, s] of batch row b (index [B, S]). `dest.count` is not checked: any row its table addresses."""
    active_backend().store_rows(values, dest, rows, index)


def load_rows(src: PagedRows) -> torch.Tensor:
    """Every addressable row of `src`, gathered from its pages and decoded: [B, count, D] in `src.dtype` (what
    `PagedRows.dense` computes)."""
    return active_backend().load_rows(src)


def attends_in_place(rows: PagedRows) -> bool:
    """Whether `sparse_attn` takes these stored rows (a cache's window rings) as its first run as they are, decoding
    them as it reads them, rather than decoded by `load_rows` first: what a decode step hands it."""
    return active_backend().attends_in_place(rows)


def moe_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor | None,
             score_func: str, topk: int, route_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MoE router: (weights [T, k], expert ids [T, k], scores [T, E]) for tokens x [T, d] (ids given by a hash
    layer's table, else the top-k of scores + bias)."""
    return active_backend().moe_gate(x, weight, bias, ids, score_func, topk, route_scale)


def routes_on_device(x: torch.Tensor, experts: Sequence[ExpertWeights | None]) -> bool:
    """Whether `routed_experts` can run over x and every expert of `experts` (all held here) with `which` None, the
    routed rows grouped and scheduled on the device: an MoE layer that reads no device value."""
    return active_backend().routes_on_device(x, experts)


def routed_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                   experts: Sequence[ExpertWeights | None], which: Sequence[int] | None,
                   limit: float, quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The routed experts' weighted sum [T, d] fp32 for tokens x [T, d] routed to `ids` [T, k] with `weights`: the
    experts `which` (increasing ids), or with None every expert the ids name (see `routes_on_device`); `quantized`:
    act_quant(x) where the caller has it."""
    if quantized is None:
        return active_backend().routed_experts(x, weights, ids, experts, which, limit)
    return active_backend().routed_experts(x, weights, ids, experts, which, limit, quantized)


def swiglu(x: torch.Tensor, expert: ExpertWeights, limit: float, weights: torch.Tensor | None = None,
           add: torch.Tensor | None = None,
           quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One clamped-SwiGLU expert on rows x [n, d] (the shared expert, or a routed one with its `weights` [n, 1]);
    with `add` [n, d] fp32, add + its output, rounded to x.dtype; `quantized`: act_quant(x) where the caller has it."""
    if quantized is None:
        return active_backend().swiglu(x, expert, limit, weights, add)
    return active_backend().swiglu(x, expert, limit, weights, add, quantized)


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """mHC's coefficients [B, S, m] fp32 of the streams x [B, S, h, d]: (x @ fn^T) / rms(x)."""
    return active_backend().hc_mixes(x, fn, norm_eps)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_mult: int, iters: int,
           eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC's read of the streams x [B, S, h, d]: the sublayer input u [B, S, d], post [B, S, h] and comb [B, S, h, h]
    (`hc_mixes`, `hc_split_sinkhorn` and `hc_collapse` in turn)."""
    return active_backend().hc_pre(x, fn, scale, base, hc_mult, iters, eps, norm_eps)


def hc_pre_norm(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_mult: int,
                iters: int, eps: float, norm_eps: float, weight: torch.Tensor, rms_eps: float, quantize: bool
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor, torch.Tensor]:
    """`hc_pre`, then the sublayer's RMSNorm of its input u (`rms_norm` with weight and rms_eps; with `quantize`,
    `rms_norm_quant`): (normed [B, S, d], its FP8 quantisation or None, post, comb). One op, so that a backend can
    norm the rows its collapse makes before it stores them."""
    return active_backend().hc_pre_norm(x, fn, scale, base, hc_mult, iters, eps, norm_eps, weight, rms_eps, quantize)


def hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """mHC's sublayer input [B, S, d] (x.dtype) from the streams x [B, S, h, d]: sum_k pre_k * x_k."""
    return active_backend().hc_collapse(x, pre)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float,
            norm_eps: float) -> torch.Tensor:
    """mHC's last read of the streams x [B, S, h, d], before the output norm: [B, S, d] (x.dtype), the streams
    weighted by sigmoid(mixes * scale + base) + eps."""
    return active_backend().hc_head(x, fn, scale, base, eps, norm_eps)


def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_mult: int, iters: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC pre / post weights and the Sinkhorn-projected residual mixing matrix."""
    return active_backend().hc_split_sinkhorn(mixes, scale, base, hc_mult, iters, eps)


def hc_post(out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
            inplace: bool = False) -> torch.Tensor:
    """mHC's new streams [B,S,h,d] = post * out + comb-mixed old streams x, in fp32, returned in x.dtype.
    `inplace`: the caller has no further use for x, so a backend may write the new streams over it (the returned
    tensor holds them either way)."""
    return active_backend().hc_post(out, x, post, comb, inplace)


__all__ = [
    "BY_DEVICE",
    "DEFAULT_BACKEND",
    "FALLBACK",
    "ENV_VAR",
    "AutoBackend",
    "ExpertWeights",
    "IGNORE_INDEX",
    "OPS",
    "KVRows",
    "PagedRows",
    "RowCodec",
    "UnknownBackendError",
    "active_backend",
    "backend_available",
    "backend_names",
    "default_backend_name",
    "get_backend",
    "register_backend",
    "resolve_backend_name",
    "summed_cross_entropy",
    "use_backend",
    *OPS,
]
