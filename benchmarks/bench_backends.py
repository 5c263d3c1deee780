"""Kernel backends side by side: the engine's prefill and decode tokens/s on each, in one run.

Run:  python benchmarks/bench_backends.py [--backends reference cpu] [--batches 1 8] [--new 48]

Cases: the shipped demo model (exact numerics, fp32, as `dsv4 serve` runs it, with and without MTP speculation)
and the `small` preset with random weights (plain fp32, and exact bf16 with FP8/FP4 weights), prompt 256,
greedy. Each case runs every backend on the same model and prompts, checks that the greedy tokens agree, and
prints tokens/s and the ratio to the first backend. Timings are the best of `--repeat` runs (the machine is
shared; the best run is the least disturbed one).
"""

from __future__ import annotations

import argparse
import time

import torch

from dsv4.config import preset
from dsv4.engine import Engine, SamplingParams
from dsv4.formats import to_official_formats
from dsv4.model import Transformer, init_weights
from dsv4.runtime import ModelSource, load


def run(model, prompts, new, backend, k=0):
    """(tokens per request, prefill seconds, decode seconds)."""
    engine = Engine(model, max_batch=len(prompts), max_seq_len=max(map(len, prompts)) + new + 8,
                    prefill_chunk=len(prompts) * 512, kernel_backend=backend, num_speculative=k)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    out = {i: [] for i in ids}
    t0 = time.perf_counter()
    first = None
    while engine.has_unfinished():
        for u in engine.step():
            out[u.request_id] += u.new_token_ids
        if first is None and all(out.values()):
            first = time.perf_counter()
    return [out[i] for i in ids], first - t0, time.perf_counter() - first


def case(name, model, vocab, batches, new, backends, repeat, k=0, prompt_len=256):
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        prompts = torch.randint(3, vocab, (batch, prompt_len), generator=gen).tolist()
        rows = {}
        for backend in backends:
            run(model, [p[:16] for p in prompts[:1]], 2, backend, k)  # warm-up (weights decoded, allocator)
            best = None
            for _ in range(repeat):
                toks, prefill, decode = run(model, prompts, new, backend, k)
                if best is None or decode < best[2]:
                    best = (toks, prefill, decode)
            rows[backend] = best
        base = rows[backends[0]]
        for backend, (toks, prefill, decode) in rows.items():
            same = "same tokens" if toks == base[0] else "TOKENS DIFFER"
            p_rate, d_rate = batch * prompt_len / prefill, batch * (new - 1) / decode
            p_base, d_base = batch * prompt_len / base[1], batch * (new - 1) / base[2]
            print(f"{name:<28}{batch:>6}{backend:>11}{p_rate:12.1f}{d_rate:12.1f}{p_rate / p_base:9.2f}x"
                  f"{d_rate / d_base:9.2f}x  {same}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", default=["reference", "cpu"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=["demo", "demo-mtp", "small", "small-exact"])
    opts = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"{torch.get_num_threads()} threads; prompt 256 (demo 200), {opts.new} new tokens, greedy; "
          f"ratios to {opts.backends[0]}")
    print(f"{'case':<28}{'batch':>6}{'backend':>11}{'prefill/s':>12}{'decode/s':>12}{'prefill':>10}{'decode':>10}")
    if {"demo", "demo-mtp"} & set(opts.cases):
        demo = load(ModelSource(model="demo")).model
        if "demo" in opts.cases:
            case("demo (exact fp32)", demo, 2000, opts.batches, opts.new, opts.backends, opts.repeat, prompt_len=200)
        if "demo-mtp" in opts.cases:
            case("demo, MTP k=1", demo, 2000, [1], opts.new, opts.backends, opts.repeat, k=1, prompt_len=200)
    args = preset("small").replace(max_seq_len=4096)
    if "small" in opts.cases:
        small = init_weights(Transformer(args, dtype=torch.float32), seed=0).eval()
        case("small (plain fp32)", small, args.vocab_size, opts.batches, opts.new, opts.backends, opts.repeat)
    if "small-exact" in opts.cases:
        exact = to_official_formats(init_weights(Transformer(args, torch.bfloat16, "exact"), seed=0)).eval()
        case("small (exact bf16)", exact, args.vocab_size, opts.batches, opts.new, opts.backends, opts.repeat)


if __name__ == "__main__":
    main()
