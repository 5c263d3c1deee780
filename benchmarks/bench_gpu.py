"""The Triton backend on one GPU: equality with the reference, and the GPU issue's tables, in one bounded run.

Run on the GPU machine from the checkout's root (under 8 minutes on one H200):

    python benchmarks/bench_gpu.py [SECTION ...]

Sections (all by default, in this order; each prints its result and writes $OUT/bench_gpu.json as it ends, so a
time-out still returns what ran):

* `env`: versions, the GPU, the backend "auto" resolves to on CUDA;
* `ops`: each Triton op against the reference op on CUDA tensors (max abs error, relative to the reference), a
  prefill's FP8 GEMMs through torch's blockwise kernel against the Triton kernel (ms, error; whether its probe
  passed), and a batch-1 decode's attention split across programs against one program (ms each, difference);
* `demo`: the demo model's greedy answer (exact numerics) with the triton and the reference backends, on CUDA;
* `small_logits`: small preset in exact bf16 with the official FP8/FP4 weights: logits of the triton backend
  against the reference backend, the largest difference in bf16 steps of each position's logits;
* `small_engine`: small preset fp32, the engine (auto backend) against transformers' `generate`, batch 1 and 32:
  prefill and decode tokens/s and their ratios;
* `decode_profile`: one engine decode step of the small preset (exact numerics, batch 8): its reads of the device
  on the host (`tests/host_reads.py`), the kernels it launches and the ten taking the most device time;
* `decode_graphs`: the small preset's engine decode (triton backend; exact bf16 and plain fp32) eager and through
  CUDA graphs, batch 1 and 32: decode tokens/s, the speed-up, identical greedy tokens, the capture cost;
* `flash_layer`: one V4-Flash CSA layer (dim 4096, 256 experts, top 6) with its official FP8 / FP4 weights and
  exact numerics, streams only (no head): decode ms per step at batch 1 and 64, prefill of 4,096 tokens, each
  against the memory-bound time (the weights a step reads at the card's bandwidth: 4.8 TB/s on an H200, 3.35 on
  an H100) and the compute-bound time (989 bf16 TFLOP/s on either), as ratios, and the decode step captured in a
  CUDA graph; the same layer on the reference backend for the before side; and a layer's share of the graphed
  step (what a second layer adds: ms at batch 1 and 64, kernels), the one-layer step's fixed part left out;
* `train_mfu`: a dim-2048 config trained with bf16 autocast (the loss as `dsv4 train` computes it): tokens/s and
  MFU against the card's bf16 peak (989 TFLOP/s; the model FLOPs `dsv4 train` counts), on the triton and the
  reference backends.

DEV=cpu runs every section on the CPU with tiny sizes and Triton's interpreter (set TRITON_INTERPRET=1), which is
how this script is tested before a GPU is lent.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

DEV = os.environ.get("DEV", "cuda")
SMALL = DEV != "cuda"  # the CPU smoke run: tiny shapes
OUT = Path(os.environ.get("OUT", "."))
# each GPU's memory bandwidth and dense bf16 tensor-core peak (the vendor's figures), by a piece of its name: the
# device machine lends an H100 or an H200, whose bandwidths differ (the limits are taken for the card that ran)
PEAKS = (("H200", 4.8e12, 989e12), ("H100 NVL", 3.9e12, 835e12), ("H100 PCIe", 2.0e12, 756e12),
         ("H100", 3.35e12, 989e12))
results: dict = {}
SECTIONS = []


def section(fn):
    SECTIONS.append(fn)
    return fn


def peaks() -> tuple[float, float, str]:
    """(bytes/s, bf16 FLOP/s, the card they are for): the GPU's (an H200's where it is none of PEAKS, or on the
    CPU smoke run)."""
    name = torch.cuda.get_device_name(0) if DEV == "cuda" else ""
    for part, bandwidth, flops in PEAKS:
        if part in name:
            return bandwidth, flops, part
    return 4.8e12, 989e12, "H200 (assumed)"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat: int) -> float:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def configs(small: bool = SMALL) -> dict:
    """The sections' model configs, validated as they are built: the GPU's sizes, or the CPU smoke run's (`small`).
    `tests/test_bench_gpu.py` builds the GPU's on the CPU, so a config the GPU run would refuse fails there first."""
    from dsv4.config import preset

    base = preset("tiny" if small else "small")
    one_csa_layer = dict(n_layers=1, n_hash_layers=0, n_mtp_layers=0, compress_ratios=(4,))
    # training: the first 4 layers of the small preset at dim 2048 (their ratios, then the MTP block's)
    train = base if small else base.replace(dim=2048, n_layers=4, max_seq_len=2048,
                                            compress_ratios=(*base.compress_ratios[:4],
                                                             *base.compress_ratios[base.n_layers:]))
    return {"small": base.replace(max_seq_len=1024), "small_long": base.replace(max_seq_len=4096),
            "flash_layer": preset("tiny" if small else "flash").replace(
                **one_csa_layer, max_seq_len=512 if small else 8192, max_batch_size=4 if small else 64),
            "train": train}


@section
def env():
    from dsv4 import kernels
    bandwidth, flops, card = peaks()
    out = dict(torch=torch.__version__, device=torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu",
               auto_backend=kernels.resolve_backend_name("auto", DEV), limits_for=card,
               hbm_TB_s=bandwidth / 1e12, bf16_TFLOP_s=flops / 1e12)
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


@section
def ops():
    """Each kernel against the reference op on the same device tensors: the largest error relative to the
    largest reference value (0.0 is bit-equal)."""
    from dsv4.kernels.reference import ReferenceBackend
    from dsv4.kernels.triton import TritonBackend
    from dsv4.quant import quantize_fp4_weight, quantize_fp8_weight

    ref, tri = ReferenceBackend(), TritonBackend()
    g = torch.Generator(device=DEV).manual_seed(0)
    m, n, k = (64, 512, 1024) if not SMALL else (8, 128, 256)

    def rel(a, b):
        a, b = (t.float() if not isinstance(t, tuple) else t[0].float() for t in (a, b))
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    x = torch.randn(m, k, device=DEV, generator=g, dtype=torch.bfloat16)
    out = {"act_quant": rel(tri.act_quant(x), ref.act_quant(x)),
           "fp8_simulate": rel(tri.fp8_simulate(x), ref.fp8_simulate(x)),
           "fp4_simulate": rel(tri.fp4_simulate(x), ref.fp4_simulate(x))}
    w = torch.randn(n, k, device=DEV, generator=g) * 0.02
    xq, xs = ref.act_quant(x)
    wq, ws = quantize_fp8_weight(w)
    out["fp8_gemm"] = rel(tri.fp8_gemm(xq, xs, wq, ws), ref.fp8_gemm(xq, xs, wq, ws))
    wq4, ws4 = quantize_fp4_weight(w)
    out["fp4_gemm"] = rel(tri.fp4_gemm(xq, xs, wq4, ws4), ref.fp4_gemm(xq, xs, wq4, ws4))
    mixes = torch.randn(m, 24, device=DEV, generator=g)
    scale, base = torch.rand(3, device=DEV, generator=g), torch.randn(24, device=DEV, generator=g)
    out["hc_split_sinkhorn"] = max(rel(a, b) for a, b in zip(tri.hc_split_sinkhorn(mixes, scale, base, 4, 20, 1e-6),
                                                             ref.hc_split_sinkhorn(mixes, scale, base, 4, 20, 1e-6),
                                                             strict=True))
    streams = torch.randn(1, m, 4, k, device=DEV, generator=g, dtype=torch.bfloat16)  # [B, S, h, d]
    fn = torch.randn(24, 4 * k, device=DEV, generator=g) * 0.02
    out["hc_pre"] = max(rel(a, b) for a, b in zip(tri.hc_pre(streams, fn, scale, base, 4, 20, 1e-6, 1e-6),
                                                  ref.hc_pre(streams, fn, scale, base, 4, 20, 1e-6, 1e-6), strict=True))
    norm_w = torch.rand(k, device=DEV, generator=g) + 0.5
    normed, (codes, scales) = tri.rms_norm_quant(x, norm_w, 1e-6)
    out["rms_norm_quant"] = rel(normed, ref.rms_norm(x, norm_w, 1e-6))
    want_codes, want_scales = ref.act_quant(normed)  # the codes: bit for bit act_quant of the rows it stored
    quant_equal = torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8)) and torch.equal(scales,
                                                                                                     want_scales)
    h, d, rows, slots = (64, 512, 640, 640) if not SMALL else (4, 64, 96, 80)
    q = torch.randn(2, 3, h, d, device=DEV, generator=g, dtype=torch.bfloat16)
    kv = torch.randn(2, rows, d, device=DEV, generator=g, dtype=torch.bfloat16)
    idx = torch.randint(-1, rows, (2, 3, slots), device=DEV, generator=g)
    sink = torch.randn(h, device=DEV, generator=g)
    out["sparse_attn"] = rel(tri.sparse_attn(q, kv, idx, sink, d**-0.5), ref.sparse_attn(q, kv, idx, sink, d**-0.5))
    split_attn = _split_attention(q[:1, :1], kv[:1], idx[:1, :1], sink, d**-0.5)
    hi, di, n_entries = (64, 128, 1024) if not SMALL else (4, 32, 80)
    qi = torch.randn(2, 3, hi, di, device=DEV, generator=g, dtype=torch.bfloat16)
    keys = torch.randn(2, n_entries, di, device=DEV, generator=g, dtype=torch.bfloat16)
    wi = torch.randn(2, 3, hi, device=DEV, generator=g)
    scores = tri.index_scores(qi, keys, wi)
    out["index_scores"] = rel(scores, ref.index_scores(qi, keys, wi))
    result = {name: f"{err:.2e}" for name, err in out.items()}
    result["rms_norm_quant_codes_equal"] = quant_equal
    result["fp8_gemm_prefill"] = _scaled_mm_against_triton()
    result["sparse_attn_decode_b1"] = split_attn
    # the top-k's picks and order (the reference's stable-sort rule; V4's 512 of the entries), equal or not
    visible = torch.full(scores.shape[:2], n_entries, device=DEV)
    picks = tri.index_topk(scores.clone(), visible, 512 if not SMALL else 16)[0]
    result["index_topk_equal"] = bool(torch.equal(picks, ref.index_topk(scores.clone(), visible,
                                                                        512 if not SMALL else 16)[0]))
    return result


def _split_attention(q, kv, idx, sink, scale) -> dict:
    """A batch-1 decode's attention (V4-Flash: 64 heads of 512, 640 slots) with its slots split across programs
    (`attention.split_slots`) and in one program: the splits, ms each way, and the largest difference."""
    from dsv4.kernels.triton import attention

    block_h, block_d = attention._launch_config(q.shape[2], q.shape[3], q.dtype == torch.float32)[:2]
    programs = q.shape[0] * q.shape[1] * -(-q.shape[2] // block_h)
    splits = attention.split_slots(programs, idx.shape[-1], block_h * block_d, q.device)[1]
    split = attention.sparse_attn(q, kv, idx, sink, scale)
    split_ms = timed(lambda: attention.sparse_attn(q, kv, idx, sink, scale), 20) * 1e3
    least = attention.MIN_SPLIT_WORK
    try:
        attention.MIN_SPLIT_WORK = float("inf")
        whole = attention.sparse_attn(q, kv, idx, sink, scale)
        whole_ms = timed(lambda: attention.sparse_attn(q, kv, idx, sink, scale), 20) * 1e3
    finally:
        attention.MIN_SPLIT_WORK = least
    diff = float((split.float() - whole.float()).abs().max() / whole.float().abs().max().clamp_min(1e-30))
    return {"splits": splits, "split_ms": round(split_ms, 4), "one_program_ms": round(whole_ms, 4),
            "max_rel_diff": f"{diff:.2e}"}


def _scaled_mm_against_triton() -> dict:
    """A prefill's FP8 linear (4,096 rows, V4-Flash's 4,096 -> 4,096 and the experts' 4,096 -> 2,048 shapes):
    torch's blockwise kernel (`dsv4/kernels/triton/scaled_mm.py`, taken when its probe passes) against the Triton
    kernel, ms each and the largest difference relative to the largest output."""
    from dsv4.kernels.triton import gemm, quant, scaled_mm
    from dsv4.quant import quantize_fp8_weight

    rows = 4096 if not SMALL else 128
    out = {"scaled_mm_taken": None}
    for n, k in ((4096, 4096), (2048, 4096)) if not SMALL else ((128, 256),):
        g = torch.Generator().manual_seed(n)
        xq, xs = quant.act_quant(torch.randn(rows, k, generator=g).to(DEV, torch.bfloat16))
        w, ws = (t.to(DEV) for t in quantize_fp8_weight(torch.randn(n, k, generator=g) * 0.02))
        operands = (xq, xs, w, ws)
        triton_ms = timed(lambda ops=operands: gemm.fp8_gemm(*ops), 20) * 1e3
        entry = {"triton_ms": round(triton_ms, 4)}
        taken = scaled_mm.takes(*operands, torch.bfloat16)
        out["scaled_mm_taken"] = taken
        if taken:
            want = gemm.fp8_gemm(*operands, torch.float32)
            got = scaled_mm.fp8_gemm(*operands, torch.float32)
            entry["scaled_mm_ms"] = round(timed(lambda ops=operands: scaled_mm.fp8_gemm(*ops), 20) * 1e3, 4)
            entry["speedup"] = round(triton_ms / entry["scaled_mm_ms"], 2)
            entry["rel_err"] = f"{float((got - want).abs().max() / want.abs().max()):.2e}"
        out[f"{rows}x{k}->{n}"] = entry
    return out


def _demo_answer(backend: str) -> tuple[list[int], str, float]:
    from dsv4 import load_model
    from dsv4.chat.encoding import encode_messages
    from dsv4.chat.tokenizer import Tokenizer
    from dsv4.demo import MODEL_DIR
    from dsv4.engine import Engine, SamplingParams

    tok = Tokenizer.load(MODEL_DIR)
    text = encode_messages([{"role": "user", "content": "Calculate 336 + 92"}], thinking_mode="thinking",
                           reasoning_effort="high")
    model = load_model(MODEL_DIR, numerics="exact", device=DEV)
    engine = Engine(model, max_batch=4, max_seq_len=512, prefill_chunk=512, kernel_backend=backend)
    engine.add_request(tok.encode(text), SamplingParams(temperature=0.0, max_tokens=96 if not SMALL else 12))
    out = []
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for update in engine.step():
            out += update.new_token_ids
    return out, tok.decode(out), len(out) / (time.perf_counter() - t0)


@section
def demo():
    fast, text, fast_tps = _demo_answer("triton")
    slow, _, slow_tps = _demo_answer("reference")
    same = sum(a == b for a, b in zip(fast, slow, strict=False))
    return dict(identical=f"{same}/{max(len(fast), len(slow))}", triton_tok_s=round(fast_tps, 1),
                reference_tok_s=round(slow_tps, 1), answer_tail=text[-60:])


def _small_exact():
    from dsv4.formats import to_official_formats
    from dsv4.model import Transformer, init_weights

    args = configs()["small"]
    model = init_weights(Transformer(args, dtype=torch.bfloat16, numerics="exact"), seed=0).eval()
    to_official_formats(model)
    return model.to(DEV)


@section
def small_logits():
    from dsv4 import kernels

    model = _small_exact()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.args.vocab_size, (2, 256 if not SMALL else 24), generator=g).to(DEV)
    with torch.inference_mode():
        with kernels.use_backend("triton"):
            fast = model(tokens)
        with kernels.use_backend("reference"):
            slow = model(tokens)
    # one bf16 step of each position's logits: the spacing of bf16 numbers at that position's largest logit
    step = torch.exp2(torch.floor(torch.log2(slow.abs().amax(-1, keepdim=True))) - 7)
    worst = float(((fast - slow).abs() / step).max())
    return dict(max_diff_bf16_steps=round(worst, 2), argmax_equal=bool(torch.equal(fast.argmax(-1),
                                                                                     slow.argmax(-1))))


@section
def small_engine():
    from bench_engine import run_engine
    from hf_reference import hf_twin

    from dsv4.model import Transformer, init_weights

    args = configs()["small_long"]
    model = init_weights(Transformer(args, dtype=torch.float32), seed=0).eval()
    hf = hf_twin(model).to(DEV).eval()
    model = model.to(DEV)
    plen, new = (512, 64) if not SMALL else (32, 6)
    run_engine(model, [[1] * 8], 2, plen + new + 8)
    with torch.inference_mode():
        hf.generate(torch.ones(1, 8, dtype=torch.long, device=DEV), max_new_tokens=2, do_sample=False)
    out = {}
    g = torch.Generator().manual_seed(0)
    for batch in (1, 32 if not SMALL else 2):
        prompt = torch.randint(0, args.vocab_size, (batch, plen), generator=g)
        ours, ttft, rest, _ = run_engine(model, prompt.tolist(), new, plen + new + 8)
        p = prompt.to(DEV)
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            hf.generate(p, max_new_tokens=1, do_sample=False)
            sync()
            hf_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            seq = hf.generate(p, max_new_tokens=new, do_sample=False, min_new_tokens=new)
            sync()
            hf_rest = time.perf_counter() - t0 - hf_first
        same = sum(a == b for x, y in zip(ours, seq[:, plen:].tolist(), strict=True)
                   for a, b in zip(x, y, strict=False))
        out[f"b{batch}"] = dict(prefill_tok_s=round(batch * plen / ttft),
                                hf_prefill_tok_s=round(batch * plen / hf_first),
                                decode_tok_s=round(batch * (new - 1) / rest, 1),
                                hf_decode_tok_s=round(batch * (new - 1) / hf_rest, 1),
                                prefill_ratio=round(hf_first / ttft, 2), decode_ratio=round(hf_rest / rest, 2),
                                greedy_identical=f"{same}/{batch * new}")
    return out


@section
def decode_profile():
    """One engine decode step of the small preset in exact numerics (batch 8, triton backend): where the host reads
    the device (each a wait for everything queued), how many kernels the step launches, and the ten taking the most
    device time: what fusing (the issue's item 4) and CUDA graphs (item 5) should follow."""
    from host_reads import count_host_reads
    from torch.profiler import ProfilerActivity, profile

    from dsv4.engine import Engine, SamplingParams

    model = _small_exact()
    engine = Engine(model, max_batch=8, max_seq_len=512, prefill_chunk=4096, kernel_backend="triton")
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        prompt = torch.randint(0, model.args.vocab_size, (256 if not SMALL else 16,), generator=g).tolist()
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    for _ in range(4):  # the prompts, then decode steps (kernels built)
        engine.step()
    with count_host_reads() as reads:
        engine.step()
    sync()
    t0 = time.perf_counter()
    engine.step()
    sync()
    step_ms = (time.perf_counter() - t0) * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.step()
        sync()
    events = prof.key_averages()
    if DEV == "cuda":  # the kernels themselves: events that ran on the device
        kernels_run = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        self_us = lambda e: getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
    else:  # the CPU smoke run: the aten ops
        kernels_run = [e for e in events if e.key.startswith("aten::")]
        self_us = lambda e: e.self_cpu_time_total  # noqa: E731
    top = sorted(kernels_run, key=self_us, reverse=True)[:10]
    total = sum(self_us(e) for e in kernels_run)
    return dict(step_ms=round(step_ms, 2), host_reads=dict(reads), launches=sum(e.count for e in kernels_run),
                device_ms=round(total / 1e3, 3),
                top=[f"{self_us(e) / 1e3:.3f} ms x{e.count} {e.key[:90]}" for e in top])


@section
def decode_graphs():
    """The small preset's engine decode on the triton backend, eager and through CUDA graphs
    (`Engine(decode_graphs=True)`), in exact numerics (official FP8/FP4 weights) and plain fp32 (the `small_engine`
    model): decode tokens/s at batch 1 and 32 on one engine per side, measured on its second round of requests (the
    first captures the graphs, and its decode time is the capture cost shown), and whether both sides' greedy
    tokens are identical."""
    from dsv4.model import Transformer, init_weights

    plain = init_weights(Transformer(configs()["small"], dtype=torch.float32), seed=0).eval().to(DEV)
    return {"exact_bf16": _graphs_against_eager(_small_exact()), "plain_fp32": _graphs_against_eager(plain)}


def _graphs_against_eager(model) -> dict:
    from dsv4.engine import Engine, SamplingParams

    plen, new = (512, 64) if not SMALL else (16, 6)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    out = {}
    for batch in (1, 32 if not SMALL else 2):
        prompts = torch.randint(0, model.args.vocab_size, (batch, plen), generator=g).tolist()
        side = {}
        for graphs in (False, True):
            engine = Engine(model, max_batch=batch, max_seq_len=model.args.max_seq_len, prefill_chunk=batch * plen,
                            kernel_backend="triton", decode_graphs=graphs)
            rounds = []
            for _ in range(2):
                ids = [engine.add_request(p, params) for p in prompts]
                tokens = {i: [] for i in ids}
                first = None
                while engine.has_unfinished():
                    for u in engine.step():
                        tokens[u.request_id] += u.new_token_ids
                    if first is None and all(tokens.values()):
                        sync()
                        first = time.perf_counter()
                sync()
                rounds.append((time.perf_counter() - first, [tokens[i] for i in ids]))
            side[graphs] = dict(decode_tok_s=round(batch * (new - 1) / rounds[1][0], 1),
                                first_round_decode_s=round(rounds[0][0], 2), tokens=rounds[1][1],
                                graphs=sorted(engine.graphs.graphs) if graphs else None)
        out[f"b{batch}"] = dict(eager_tok_s=side[False]["decode_tok_s"], graph_tok_s=side[True]["decode_tok_s"],
                                speedup=round(side[True]["decode_tok_s"] / side[False]["decode_tok_s"], 2),
                                identical=side[True]["tokens"] == side[False]["tokens"],
                                capture_round_s=side[True]["first_round_decode_s"],
                                eager_first_round_s=side[False]["first_round_decode_s"],
                                buckets=side[True]["graphs"])
    return out


def _flash_layer(layers: int = 1):
    """`layers` V4-Flash CSA layers (the `flash_layer` config; one by default) with random official-format weights."""
    from dsv4.formats import to_official_formats
    from dsv4.model import Transformer

    a = configs()["flash_layer"]
    if layers != a.n_layers:
        a = a.replace(n_layers=layers, compress_ratios=a.compress_ratios[:1] * layers)
    with torch.device(DEV):
        model = Transformer(a, dtype=torch.bfloat16, numerics="exact").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype.is_floating_point:
                p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    to_official_formats(model)
    return model


def _weight_bytes(model) -> tuple[float, float]:
    """(bytes a batch-1 decode step reads: the layer's weights with the routed experts at their active share;
    every routed expert's bytes) for the stored formats."""
    a = model.args
    layer = experts = 0
    for name, t in model.state_dict().items():
        if not name.startswith("layers."):
            continue
        nbytes = t.numel() * t.element_size()
        if ".experts." in name:
            experts += nbytes
        else:
            layer += nbytes
    return layer + experts * a.n_activated_experts / a.n_routed_experts, experts


def _step_kernels(model, tokens, cache, capacity: int) -> int:
    """The kernels one static decode step launches (`benchmarks/decode_launches.py`'s count: each dispatcher op
    that writes memory, each Triton launch); the step runs once, eagerly."""
    from decode_launches import Launches, triton_launches

    counter = Launches([])
    with counter, triton_launches(counter):
        model.static_decode_streams(tokens, cache, capacity)
    return sum(counter.counts.values())


def _graph_step_ms(model, tokens, cache, capacity: int, repeat: int = 10) -> float:
    """ms per replay of one static decode step (`Transformer.static_decode_streams`) captured in a CUDA graph, after
    the warm-up torch asks for (DEV=cpu: the step run eagerly)."""
    def step():
        return model.static_decode_streams(tokens, cache, capacity)

    if DEV != "cuda":
        return timed(step, repeat) * 1e3
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return timed(graph.replay, repeat) * 1e3


@section
def flash_layer():
    model = _flash_layer()
    a = model.args
    active_bytes, expert_bytes = _weight_bytes(model)
    active_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.")
                        and ".experts." not in n) + 3 * a.dim * a.moe_inter_dim * a.n_activated_experts
    big_b, plen = (64, 4096) if not SMALL else (4, 64)
    out = {"active_weight_MB": round(active_bytes / 1e6, 1)}
    g = torch.Generator().manual_seed(0)
    for backend in ("triton", "reference"):
        from dsv4 import kernels
        row = {}
        with torch.inference_mode(), kernels.use_backend(backend):
            toks = torch.randint(0, a.vocab_size, (1, plen), generator=g).to(DEV)

            def prefill(toks=toks):
                model.forward_streams(toks, model.new_cache(batch_size=1, max_seq_len=plen + 64))

            row["prefill_ms"] = timed(prefill, 2) * 1e3
            for batch in (1, big_b):
                prompt, nxt = toks[:, :256].expand(batch, -1).contiguous(), toks[:, -1:].expand(batch, 1).contiguous()
                cache = model.new_cache(batch_size=batch, max_seq_len=plen + 400)
                model.forward_streams(prompt, cache)
                row[f"decode_b{batch}_ms"] = timed(lambda n=nxt, c=cache: model.forward_streams(n, c), 10) * 1e3
                if backend == "triton":  # the same step captured in a CUDA graph (no launch overhead)
                    cache = model.new_cache(batch_size=batch, max_seq_len=plen + 400)
                    model.forward_streams(prompt, cache)
                    row[f"decode_b{batch}_graph_ms"] = _graph_step_ms(model, nxt, cache, 512 if not SMALL else 128)
        bandwidth, flops, _ = peaks()
        memory_ms = active_bytes / bandwidth * 1e3
        compute_ms = 2 * active_params * plen / flops * 1e3
        row["decode_b1_vs_memory_bound"] = round(row["decode_b1_ms"] / memory_ms, 1)
        if "decode_b1_graph_ms" in row:
            row["decode_b1_graph_vs_memory_bound"] = round(row["decode_b1_graph_ms"] / memory_ms, 1)
        row["prefill_vs_compute_bound"] = round(row["prefill_ms"] / compute_ms, 1)
        out[backend] = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        out["memory_bound_b1_ms"] = round(memory_ms, 4)
        out["compute_bound_prefill_ms"] = round(compute_ms, 3)
        if SMALL:
            break
    out["per_layer"] = _layer_share(model, big_b, plen, memory_ms)
    return out


def _layer_share(one, big_b: int, plen: int, memory_ms: float) -> dict:
    """A layer's share of a graphed decode step: what a second CSA layer adds (its ms and kernels), against one
    layer's memory-bound time. The one-layer step also pays the step's fixed part once (the embedding, the plans
    every layer of a kind shares: RoPE rows, window and compressor indices), which a 43-layer V4-Flash pays once
    for all of its layers."""
    from dsv4 import kernels

    capacity = 512 if not SMALL else 128
    counts, steps = {}, {}
    for layers in (1, 2):
        model = one if layers == 1 else _flash_layer(2)
        g = torch.Generator().manual_seed(0)
        toks = torch.randint(0, model.args.vocab_size, (1, 257), generator=g).to(DEV)
        with torch.inference_mode(), kernels.use_backend("triton"):
            for batch in (1, big_b):
                prompt, nxt = toks[:, :256].expand(batch, -1).contiguous(), toks[:, -1:].expand(batch, 1).contiguous()
                cache = model.new_cache(batch_size=batch, max_seq_len=plen + 400)
                model.forward_streams(prompt, cache)
                if batch == 1:
                    counts[layers] = _step_kernels(model, nxt, cache, capacity)
                steps[(layers, batch)] = _graph_step_ms(model, nxt, cache, capacity)
        del model
    out = {"kernels_a_step_1_layer": counts[1], "kernels_a_step_2_layers": counts[2],
           "kernels_a_layer": counts[2] - counts[1]}
    for batch in (1, big_b):
        out[f"decode_b{batch}_graph_ms_1_layer"] = round(steps[(1, batch)], 4)
        out[f"decode_b{batch}_graph_ms_2_layers"] = round(steps[(2, batch)], 4)
        out[f"decode_b{batch}_graph_ms_a_layer"] = round(steps[(2, batch)] - steps[(1, batch)], 4)
    out["decode_b1_a_layer_vs_memory_bound"] = round(out["decode_b1_graph_ms_a_layer"] / memory_ms, 1)
    return out


@section
def train_mfu():
    """Training steps of the dim-2048 config under bf16 autocast, the loss as `dsv4 train` computes it
    (`Transformer.head_loss`), AdamW: tokens/s and MFU on the triton backend (its chunked head cross-entropy,
    grouped experts, Sinkhorn, mHC and norm backward) and on the reference backend, side by side."""
    from dsv4 import kernels
    from dsv4.model import Transformer, init_weights
    from dsv4.train.trainer import train_flops_per_token

    args = configs()["train"]
    model = init_weights(Transformer(args, dtype=torch.float32), seed=0).to(DEV).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, seq = (8, 1024) if not SMALL else (2, 32)
    x = torch.randint(0, args.vocab_size, (batch, seq + 1), device=DEV)

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = model.head_loss(model.forward_streams(x[:, :-1]), x[:, 1:])
        (loss / x[:, 1:].numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = train_flops_per_token(args, seq, mtp=False)  # what `dsv4 train` reports as model TFLOP/s and mfu
    out = dict(dim=args.dim, params_M=round(model.parameter_counts()["active"] / 1e6, 1))
    for backend in ("triton", "reference"):
        with kernels.use_backend(backend):
            tok_s = batch * seq / timed(step, 3)
        out[f"{backend}_tok_s"] = round(tok_s)
        out[f"{backend}_mfu_pct"] = round(flops * tok_s / peaks()[1] * 100, 2)
    out["speedup"] = round(out["triton_tok_s"] / out["reference_tok_s"], 2)
    return out


def main() -> None:
    only = set(sys.argv[1:])
    unknown = only - {fn.__name__ for fn in SECTIONS}
    if unknown:
        sys.exit(f"unknown sections {sorted(unknown)}; choose from {[fn.__name__ for fn in SECTIONS]}")
    OUT.mkdir(parents=True, exist_ok=True)
    for fn in SECTIONS:
        if only and fn.__name__ not in only:
            continue
        t0 = time.time()
        try:
            results[fn.__name__] = fn()
            print(f"[{fn.__name__}] {time.time() - t0:.1f}s {json.dumps(results[fn.__name__], default=str)}",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others' figures
            results[fn.__name__] = f"ERROR {type(e).__name__}: {e}"
            print(f"[{fn.__name__}] ERROR after {time.time() - t0:.1f}s", flush=True)
            traceback.print_exc()
        (OUT / "bench_gpu.json").write_text(json.dumps(results, indent=1, default=str))
        if DEV == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
