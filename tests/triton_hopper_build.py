"""Build every Triton kernel launch of a few backend calls for a Hopper GPU (sm_90), on a machine without one.

The interpreter tests check what the kernels compute; they cannot see code that only the GPU compiler rejects
(an unsupported dot shape or dtype, a constexpr misuse, a pointer cast). This script runs with TRITON_INTERPRET=0:
each kernel launch is recorded instead of run (the host code around it runs on CPU tensors, so the outputs are
left uninitialised), then each recorded launch's signature, with the specialisations the launch would give it, is
compiled to a cubin with Triton's bundled ptxas.
Prints one line per distinct build and exits non-zero if any fails, or needs more shared memory than a Hopper block
has (which only a launch would find). With `--resources` each line also carries ptxas's registers and spill bytes
and the PTX's count of one-element 8- or 16-bit global loads. `--from FILE` builds the launches a run recorded
(`tests/launch_record.py`) instead of this script's own calls.
Used by `tests/test_triton_compile.py`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(HOPPER)
launches: dict[tuple, tuple] = {}
recorded = 0  # launches seen, repeats included


def record(self: JITFunction, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: the launch's signature, constexprs and the attributes Triton specialises on
    (a pointer's 16-byte alignment, an integer's divisibility by 16: what lets loads be vectorised), found as a
    launch finds them, keyed so each build happens once."""
    global recorded
    recorded += 1
    if not hasattr(self, "_hopper_binder"):
        self._hopper_binder = create_function_from_signature(self.signature, self.params, BACKEND)
    bound, specialization, options = self._hopper_binder(*args, **kwargs)
    key = (self.fn.__qualname__, str(specialization), str(options))
    if key not in launches:
        launches[key] = (self, *self._pack_args(BACKEND, kwargs, bound, specialization, options))


def run_calls() -> None:
    from dsv4.kernels import ExpertWeights
    from dsv4.kernels.paged import PagedRows
    from dsv4.kernels.reference import ReferenceBackend
    from dsv4.kernels.triton import TritonBackend, attention
    from dsv4.kernels.triton import topk as triton_topk
    from dsv4.kv_formats import get_format
    from dsv4.quant import quantize_fp4_weight, quantize_fp8_weight

    ref, tri = ReferenceBackend(), _Launching(TritonBackend())
    # the backend only launches on CUDA tensors or under the interpreter: let it launch on these CPU tensors
    import dsv4.kernels.triton as package

    package._runs_here = lambda tensor: True
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 256).to(dtype)
        tri.act_quant(x)
        tri.fp8_simulate(x)
        tri.fp4_quant(x)
        tri.fp4_simulate(x)
        xq, xs = ref.act_quant(x)
        w8, s8 = quantize_fp8_weight(torch.randn(192, 256))
        w4, s4 = quantize_fp4_weight(torch.randn(192, 256))
        tri.fp8_gemm(xq, xs, w8, s8, dtype)
        tri.fp4_gemm(xq, xs, w4, s4, dtype)
        tri.linears(x, [(w8, s8), quantize_fp8_weight(torch.randn(64, 256))], (xq, xs))  # two weights, one launch
        # a prefill's many rows: 64-row tiles (a decode's are 16)
        prefill = torch.randn(200, 256).to(dtype)
        tri.fp8_gemm(*ref.act_quant(prefill), w8, s8, dtype)
        tri.fp4_gemm(*ref.act_quant(prefill), w4, s4, dtype)
        prefill_ids = torch.stack([torch.randperm(4)[:2] for _ in range(200)])
        # the head's cross-entropy: a V4-sized vocabulary's logits in this dtype, with and without gradients
        head = torch.randn(129280, 256).to(dtype)
        tri.head_cross_entropy(x, head, torch.randint(0, 129280, (5,)))
        tri.head_cross_entropy(x.clone().requires_grad_(), head, torch.randint(0, 129280, (5,)))
        for quantize in (quantize_fp8_weight, quantize_fp4_weight):
            table = []
            for _ in range(4):
                w1, s1 = quantize(torch.randn(128, 256))
                w3, s3 = quantize(torch.randn(128, 256))
                w2, s2 = quantize(torch.randn(256, 128))
                table.append(ExpertWeights(w1, s1, w3, s3, w2, s2))
            ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
            tri.routed_experts(x[:3], torch.rand(3, 2), ids, table, [0, 1, 2, 3], 7.0)
            tri.swiglu(x[:3], table[0], 7.0, None, torch.randn(3, 256))  # the shared expert plus the routed sum
            # the rows' quantisation handed over (made with the norm)
            tri.routed_experts(x[:3], torch.rand(3, 2), ids, table, [0, 1, 2, 3], 7.0, ref.act_quant(x[:3]))
            tri.routed_experts(prefill, torch.rand(200, 2), prefill_ids, table, [0, 1, 2, 3], 7.0)
            tri.swiglu(prefill, table[0], 7.0, None, torch.randn(200, 256))
        # the schedule on the device: V4's 256 experts (and Pro's 384) at a decode's few routed rows
        from dsv4.kernels.triton import experts as triton_experts
        for n_experts in (8, 256, 384):
            triton_experts._kernel_schedule(torch.randint(0, n_experts, (8, 6)), n_experts, 16, 48 + min(48, n_experts))
        # float experts in the activations' dtype (a plain model's)
        floats = [ExpertWeights(torch.randn(128, 256).to(dtype), None, torch.randn(128, 256).to(dtype), None,
                                torch.randn(256, 128).to(dtype), None) for _ in range(4)]
        tri.routed_experts(x[:3], torch.rand(3, 2), ids, floats, [0, 1, 2, 3], 7.0)
        tri.routed_experts(prefill, torch.rand(200, 2), prefill_ids, floats, [0, 1, 2, 3], 7.0)
        tri.hc_split_sinkhorn(torch.randn(7, 24), torch.rand(3), torch.randn(24), 4, 20, 1e-6)
        # a training step's: the backward kernel (h = 4, and a padded h = 3)
        for h in (4, 3):
            mixes = torch.randn(7, (2 + h) * h).to(dtype).requires_grad_()
            outs = tri.hc_split_sinkhorn(mixes, torch.rand(3).requires_grad_(), torch.randn((2 + h) * h), h, 20, 1e-6)
            torch.autograd.grad(sum(t.sum() for t in outs), mixes)
        # mHC around a sublayer: V4-Flash's 4 streams of 4,096 (16 partial products), and a padded h
        for h, d in ((4, 4096), (3, 100)):
            x = torch.randn(2, 3, h, d).to(dtype)
            tri.hc_pre(x, torch.randn((2 + h) * h, h * d), torch.rand(3), torch.randn((2 + h) * h), h, 20, 1e-6, 1e-6)
            for quantize in (True, False):  # the sublayer's norm (and quantisation) in the collapse's programs
                tri.hc_pre_norm(x, torch.randn((2 + h) * h, h * d), torch.rand(3), torch.randn((2 + h) * h), h, 20,
                                1e-6, 1e-6, torch.rand(d), 1e-6, quantize)
            tri.hc_collapse(x, torch.rand(2, 3, h))
            tri.hc_head(x, torch.randn(h, h * d), torch.rand(1), torch.randn(h), 1e-6, 1e-6)
            tri.hc_post(torch.randn(2, 3, d).to(dtype), x, torch.rand(2, 3, h), torch.rand(2, 3, h, h))
            # a training step's: the write-back's and the collapse's backward kernels
            wants = x.clone().requires_grad_()
            written = tri.hc_post(torch.randn(2, 3, d).to(dtype), wants, torch.rand(2, 3, h), torch.rand(2, 3, h, h))
            collapsed = tri.hc_collapse(wants, torch.rand(2, 3, h))
            mixes = tri.hc_mixes(wants, torch.randn((2 + h) * h, h * d), 1e-6)
            torch.autograd.grad(written.float().sum() + collapsed.float().sum() + mixes.sum(), wants)
            # hc_pre in a training step: the collapse's gradient of the streams added by the mixes' backward
            u, post, comb = tri.hc_pre(wants, torch.randn((2 + h) * h, h * d), torch.rand(3), torch.randn((2 + h) * h),
                                       h, 20, 1e-6, 1e-6)
            torch.autograd.grad(u.float().sum() + post.sum() + comb.sum(), wants)
        # row ops: the norms, the queries' head norm with its rotation (in place or not), the keys' rotation
        tri.rms_norm(torch.randn(3, 4096).to(dtype), torch.rand(4096), 1e-6)
        for d in (4096, 512):  # a training step's: the backward kernel
            wants = torch.randn(70, d).to(dtype).requires_grad_()
            torch.autograd.grad(tri.rms_norm(wants, torch.rand(d), 1e-6).float().sum(), wants)
        for d in (4096, 1536, 64):  # the norms before quantised linears: V4's dim and query latent, a tiny one
            tri.rms_norm_quant(torch.randn(3, d).to(dtype), torch.rand(d), 1e-6)
        q = torch.randn(2, 3, 64, 512).to(dtype)
        cos, sin = torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32)
        for inplace in (False, True):
            tri.head_norm(q, 1e-6, cos, sin, inplace=inplace)
            tri.rope(q, cos, sin, inverse=inplace, inplace=inplace)
        tri.head_norm(q, 1e-6)
        tri.hadamard(torch.randn(2, 3, 64, 128).to(dtype))  # the indexer's queries (and keys: 128 dims)
        tri.hadamard(torch.randn(5, 2).to(dtype))
        # the keys' / entries' / indexer queries' fused norm, rotation and QAT: V4's 512-wide KV rows (FP8 nope),
        # the indexer's 128-wide keys (Hadamard + FP4) and its queries (no norm, a rotation broadcast over heads)
        for qat in ("none", "fp8_nope", "hadamard", "hadamard_fp4"):
            tri.norm_rope_qat(torch.randn(2, 3, 512).to(dtype), torch.rand(512), 1e-6, cos[:, :, 0], sin[:, :, 0], qat)
            tri.norm_rope_qat(torch.randn(2, 3, 64, 128).to(dtype), None, 1e-6, cos, sin, qat)
        # the router's tail: V4's 256 experts top-6 (and a hash layer's given ids), Pro's 384
        for n_experts in (256, 384):
            tri.moe_gate(torch.randn(3, 64), torch.randn(n_experts, 64), torch.rand(n_experts), None, "sqrtsoftplus", 6,
                         2.5)
            tri.moe_gate(torch.randn(3, 64), torch.randn(n_experts, 64), None, torch.randint(0, n_experts, (3, 6)),
                         "sqrtsoftplus", 6, 2.5)
            tri.moe_gate(torch.randn(3, 64), torch.randn(n_experts, 64), torch.rand(n_experts), None, "sigmoid", 6,
                         2.5)  # (torch's scores; V4's sqrt(softplus) ones are made in the kernel)
        # the compressors' pooling: CSA's 2 x 4 candidates of 512 (128 for the indexer's keys), HCA's 128
        for n, c in ((8, 512), (8, 128), (128, 512)):
            tri.gated_pool(torch.randn(300, c), torch.randn(300, c), torch.randint(-1, 300, (3, n)))
        # a decode step's compressors: the tokens into their ring slots, then the pooling from the rings in place
        for ratio, coff, c in ((4, 2, 512), (4, 2, 128), (128, 1, 512)):
            ring = torch.randn(5, coff * ratio, coff * c)
            for pools in (True, False):
                tri.ring_pool(torch.randn(3, coff * c), torch.randn(3, coff * c), torch.randn(ratio, coff * c),
                              torch.randint(0, 1000, (3,)), ring, ring.clone(), torch.tensor([0, 2, 4]) * ring.shape[1],
                              pools, dtype)
                # with the projections (V4-Flash's dim 4096; one row and a batch of 64 rows)
                for b in (1, 64):
                    tri.project_ring_pool(torch.randn(b, 4096).to(dtype), torch.randn(coff * c, 4096),
                                          torch.randn(coff * c, 4096), torch.randn(ratio, coff * c),
                                          torch.randint(0, 1000, (b,)), torch.randn(b, coff * ratio, coff * c),
                                          torch.randn(b, coff * ratio, coff * c), torch.arange(b) * ring.shape[1],
                                          pools, dtype)
        # indexer scores: V4's 64 heads of 128 dims, a decode step (one query) and a prefill block
        for s in (1, 100):
            tri.index_scores(torch.randn(2, s, 64, 128).to(dtype), torch.randn(2, 300, 128).to(dtype),
                             torch.randn(2, s, 64).to(dtype))
            tri.index_scores(torch.randn(2, s, 64, 128).to(dtype), torch.randn(2, 300, 128).to(dtype),
                             torch.randn(2, s, 64).to(dtype), torch.full((2, s), 150))  # tiles past visible skipped
            tri.index_scores(torch.randn(2, s, 64, 128).to(dtype), torch.randn(2, 300, 128).to(dtype),
                             torch.randn(2, s, 64).to(dtype), torch.full((2, s), 150), 0.01)  # the weights scaled
        # over the engine's paged keys (a decode step and a prefill block): bf16 rows, or the fp8 format's FP4 keys
        # decoded in the kernel
        if dtype == torch.bfloat16:
            from dsv4.kv_formats.fp8 import PackedCodec

            for codec in (None, PackedCodec("index", 128, 0, dtype)):
                key_rows = torch.randn(40, 128).to(dtype)
                stored = (key_rows if codec is None else codec.encode(key_rows)).reshape(10, 4, -1)
                paged_keys = PagedRows(stored, torch.tensor([[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]), 20, codec, dtype)
                for s in (1, 100):
                    tri.index_scores(torch.randn(2, s, 64, 128).to(dtype), paged_keys, torch.randn(2, s, 64).to(dtype),
                                     torch.full((2, s), 15))
        # the indexer's top-k: V4's 512 of a long row, and a decode's few
        # (the kernel itself: launches are recorded here, not run, so no gather may follow)
        for n, k in ((3000, 512), (40, 3)):
            triton_topk.earliest_k(torch.randn(2, 1, n).to(dtype), k)
            scores, visible = torch.randn(2, 1, n).to(dtype), torch.full((2, 1), n // 2)
            triton_topk.hide_unseen(scores, visible)  # (the indexer's mask, then its final picks at their rows)
            triton_topk.index_picks(scores, visible, k, 128)
            triton_topk.index_picks(scores, visible, k, 128, torch.randint(-1, 128, (2, 1, 128)))  # after the window
        # attention: a dense or one-page-a-row run, then a dense or a paged second run (model rows, or the
        # production FP8 layout)
        q = torch.randn(2, 3, 8, 64).to(dtype)
        window = torch.randn(2, 10, 64).to(dtype)
        idx = torch.randint(-1, 30, (2, 3, 70))
        sink = torch.randn(8)
        tri.sparse_attn(q, [window, torch.randn(2, 20, 64).to(dtype)], idx, sink, 0.125)
        # fp32 queries over 16-bit rows (fp32 logits, a 16-bit value product: an fp32 model's bf16 cache)
        tri.sparse_attn(q.float(), [window, torch.randn(2, 20, 64)], idx, sink, 0.125)
        # the output rotated back as it is written (what the model asks for), and V4's 512-wide rows at 64 heads
        rot = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
        tri.sparse_attn(q, [window, torch.randn(2, 20, 64).to(dtype)], idx, sink, 0.125, *rot)
        wide = torch.randn(2, 3, 64, 512).to(dtype), torch.randn(2, 30, 512).to(dtype)
        tri.sparse_attn(wide[0], [wide[1]], idx.clamp(max=29), torch.randn(64), 0.04,
                        torch.randn(2, 3, 32), torch.randn(2, 3, 32))
        # a training step's attention: the forward keeping its log-sum-exp, then the backward (128, 256 and V4's
        # 512: the slot-block widths and the register budgets they were chosen for)
        from dsv4.kernels.triton import attention_grad

        for width in (128, 256, 512):
            qg = torch.randn(2, 3, 8, width).to(dtype).requires_grad_()
            kvg = [torch.randn(2, 10, width).to(dtype).requires_grad_(), torch.randn(2, 5, width).to(dtype)]
            for trig in ((None, None), (torch.randn(2, 3, 16), torch.randn(2, 3, 16))):
                out = attention_grad.sparse_attn(qg, kvg, idx.clamp(max=14), sink.clone().requires_grad_(), 0.1,
                                                 *trig)
                out.backward(torch.ones_like(out))
        # a decode step's paged runs: model rows or the production FP8 layout, at head dim 64 (16 rope dims) and at
        # V4's 512 (64 rope dims) with its 64 heads
        for args, heads in ((_Args(64, 16), 8), (_Args(512, 64), 64)):
            d = args.head_dim
            qp, ring = torch.randn(2, 1, heads, d).to(dtype), torch.randn(4, 10, d).to(dtype)
            idx_p, sink_p = torch.randint(-1, 30, (2, 1, 300)), torch.randn(heads)  # (V4: five blocks, split)
            rot_p = torch.randn(2, 1, args.rope_head_dim // 2), torch.randn(2, 1, args.rope_head_dim // 2)
            for fmt in ("model", "fp8"):
                codec = get_format(fmt).codec(args, "kv", dtype)
                rows = torch.randn(20, d).to(dtype)
                stored = rows if codec is None else codec.encode(rows)
                paged = PagedRows(stored.reshape(5, 4, -1), torch.tensor([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]]), 20, codec,
                                  dtype)
                window_p = torch.randn(2, 10, d).to(dtype)
                assert attention.covers(qp, [window_p, paged], idx_p, sink_p), (fmt, d, dtype)  # else nothing builds
                tri.sparse_attn(qp, [window_p, paged], idx_p, sink_p, 0.125)
                # the window rings of some cache slots, one page a batch row (an engine decode step's first run)
                rings = PagedRows(ring, torch.tensor([[2], [0]]), 10, None, dtype)
                tri.sparse_attn(qp, [rings, paged], idx_p, sink_p, 0.125)
                tri.sparse_attn(qp, [rings, paged], idx_p, sink_p, 0.125, *rot_p)
                # a prefill chunk's queries (several a batch row) over its window and the paged entries
                q_chunk, idx_chunk = torch.randn(2, 3, heads, d).to(dtype), torch.randint(-1, 30, (2, 3, 300))
                trig_chunk = torch.randn(2, 3, args.rope_head_dim // 2), torch.randn(2, 3, args.rope_head_dim // 2)
                tri.sparse_attn(q_chunk, [window_p, paged], idx_chunk, sink_p, 0.125, *trig_chunk)
                # the cache's rows (the fp8 layouts hold the exact numerics' bf16 rows): a decode step's tokens into
                # their ring slots and entries into their pages, then rows read back decoded
                if codec is None or dtype == torch.bfloat16:
                    stored_rings = PagedRows(ring if codec is None else codec.encode(ring), torch.tensor([[2], [0]]),
                                             10, codec, dtype)
                    tri.store_rows(torch.randn(2, 1, d).to(dtype), stored_rings, None, torch.tensor([[3], [7]]))
                    tri.store_rows(torch.randn(2, d).to(dtype), paged, torch.tensor([0, 1]), torch.tensor([5, 19]))
                    tri.load_rows(stored_rings)
                    tri.load_rows(paged)
                    keys = get_format(fmt).codec(args, "index", dtype)
                    key_rows = torch.randn(20, args.index_head_dim).to(dtype)
                    key_pages = PagedRows((key_rows if keys is None else keys.encode(key_rows)).reshape(5, 4, -1),
                                          paged.table, 20, keys, dtype)
                    tri.store_rows(torch.randn(2, args.index_head_dim).to(dtype), key_pages, torch.tensor([0, 1]),
                                   torch.tensor([5, 19]))
                    tri.load_rows(key_pages)
                    # a decode step's fused forms: its rows normed straight into their ring slots and pages, and
                    # fp8 rings read by the attention as they are stored (alone, and beside fp8 entries)
                    half = args.rope_head_dim // 2
                    cos, sin = torch.rand(2, half), torch.rand(2, half)
                    tri.norm_rope_store(torch.randn(2, 1, d).to(dtype), torch.rand(d), 1e-6, cos[:, None], sin[:, None],
                                        "fp8_nope" if codec else "none", stored_rings, None, torch.tensor([[3], [7]]))
                    tri.norm_rope_store(torch.randn(2, d).to(dtype), torch.rand(d), 1e-6, cos, sin,
                                        "fp8_nope" if codec else "none", paged, torch.tensor([0, 1]),
                                        torch.tensor([5, 19]))
                    tri.norm_rope_store(torch.randn(2, args.index_head_dim).to(dtype), torch.rand(args.index_head_dim),
                                        1e-6, cos[:, :8], sin[:, :8], "hadamard_fp4" if keys else "hadamard",
                                        key_pages, torch.tensor([0, 1]), torch.tensor([5, 19]))
                    if codec is not None:
                        assert attention.covers(qp, [stored_rings, paged], idx_p, sink_p)
                        tri.sparse_attn(qp, [stored_rings, paged], idx_p, sink_p, 0.125, *rot_p)
                        tri.sparse_attn(qp, [stored_rings], idx_p.clamp(max=9), sink_p, 0.125, *rot_p)


class _Launching:
    """The backend, each of whose calls must launch a kernel: one that falls back to the reference (a `covers` that
    refuses what the call passes) would build nothing for it, and silently."""

    def __init__(self, backend) -> None:
        self._backend = backend

    def __getattr__(self, name: str):
        method = getattr(self._backend, name)

        def call(*args, **kwargs):
            before = recorded
            out = method(*args, **kwargs)
            assert recorded > before, f"{name} launched no kernel: the backend took the reference's path"
            return out

        return call


class _Args:
    """The model arguments a KV codec reads."""

    def __init__(self, head_dim: int, rope_head_dim: int) -> None:
        self.head_dim, self.rope_head_dim, self.index_head_dim = head_dim, rope_head_dim, 64


# Hopper's per-block limits that a build does not check but a launch does (Triton raises OutOfResources when it
# loads the cubin): 227 KiB of shared memory a block, opted in (H100 and H200 alike).
HOPPER_SHARED_BYTES = 227 * 1024
# a global load of one 8- or 16-bit element (not a vector): what a tile of bytes or halves compiles to where the
# compiler cannot prove its addresses contiguous and aligned (counted in the PTX: instructions, not executions)
NARROW_LOAD = re.compile(r"\bld\.global(?:\.[a-z]+)*\.[bsu](?:8|16)\b")
PTXAS_USAGE = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_usage(ptx: str, fp_fusion: bool) -> tuple[int, int, int]:
    """Registers a thread and bytes of spill stores and loads, as ptxas reports them for this PTX on sm_90a.

    Triton runs ptxas with `-v` but keeps its log only on failure, and a launch reads the counts from the driver
    (a GPU); so the PTX is assembled again here. The assembler is the CUDA 12 ptxas bundled with Triton, the one
    Triton before 3.9 (the GPU machine's 3.6 included) runs for Hopper; `DSV4_PTXAS` names another."""
    from triton import knobs
    from triton.backends.nvidia.compiler import ptx_get_version

    ptxas = knobs.nvidia.ptxas if "DSV4_PTXAS" not in os.environ else knobs.NvidiaTool.from_path(
        os.environ["DSV4_PTXAS"])
    isa = ptx_get_version(ptxas.version)  # the newest PTX this ptxas reads: the PTX says so, as Triton's does
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "kernel.ptx")
        source.write_text(re.sub(r"\.version \d+\.\d+", f".version {isa // 10}.{isa % 10}", ptx, count=1))
        command = [ptxas.path, "-v", "--gpu-name=sm_90a", str(source), "-o", str(Path(tmp, "kernel.cubin"))]
        if not fp_fusion:
            command.insert(1, "--fmad=false")
        log = subprocess.run(command, check=True, capture_output=True, text=True).stderr
    registers, spills = PTXAS_USAGE.search(log), PTXAS_SPILLS.search(log)
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


# constexprs the interpreter's launches set otherwise (`numerics.interpreting`, `libdevice_exp`)
ON_THE_GPU = {"WIDEN_DOTS": False, "F32": False, "LIBDEVICE": True}


def main() -> int:
    from dsv4.kernels.triton import gemm

    resources = "--resources" in sys.argv[1:]
    print(f"triton {triton.__version__} ({Path(triton.__file__).parent})", flush=True)
    if "--from" in sys.argv[1:]:  # the launches a run recorded (`launch_record.py`), not this script's calls
        import importlib
        import pickle

        recorded_launches = pickle.loads(Path(sys.argv[sys.argv.index("--from") + 1]).read_bytes())
        for (module, qualname, *rest), (options, signature, constexprs, attrs) in recorded_launches.items():
            fn = getattr(importlib.import_module(module), qualname)
            # the flags the interpreter is launched with, as a GPU launch sets them (tile sizes the host picks
            # otherwise under the interpreter stay as recorded)
            gpu = {path: ON_THE_GPU.get(fn.params[path[0]].name, value) for path, value in constexprs.items()}
            launches[(qualname, module, *rest)] = (fn, options, signature, gpu, attrs)
    else:
        JITFunction.run = record
        for processors in (1, 132):  # the tile widths of a lone program and of filling an H200's 132 SMs
            gemm.processors = lambda device, n=processors: n
            run_calls()
    failures = 0
    for (name, *_), (fn, options, signature, constexprs, attrs) in launches.items():
        named = {fn.params[path[0]].name: value for path, value in constexprs.items()}
        try:
            kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                    target=HOPPER, options=options.__dict__)
            shared = kernel.metadata.shared
            if shared > HOPPER_SHARED_BYTES:
                raise RuntimeError(f"{shared} bytes of shared memory a block; Hopper allows {HOPPER_SHARED_BYTES}")
            usage = ""
            if resources:
                registers, stores, loads = ptxas_usage(kernel.asm["ptx"], kernel.metadata.enable_fp_fusion)
                usage = (f" [{kernel.metadata.num_warps} warps, {registers} registers, {shared} B shared, "
                         f"spills {stores}/{loads} B, {len(NARROW_LOAD.findall(kernel.asm['ptx']))} narrow loads]")
            print(f"ok   {name} {named}{usage}", flush=True)
        except Exception:  # noqa: BLE001 - report every failing build, not only the first
            failures += 1
            print(f"FAIL {name} {named}", flush=True)
            traceback.print_exc()
    print(f"{len(launches)} builds, {failures} failed")
    return 1 if failures or not launches else 0


if __name__ == "__main__":
    sys.exit(main())
