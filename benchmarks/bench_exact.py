"""Exact bf16 numerics against plain fp32 on the same preset: the ratio of their engine times, measured side by side.

Run:  python benchmarks/bench_exact.py [--preset small] [--batches 1 8] [--repeat 5] [--backend native]

The `small` preset with random weights runs twice: plain fp32, and exact numerics (bf16 activations, the official
FP8 / FP4 weight formats). Per batch size, random prompts of 256 tokens are prefilled in one step, then 32 greedy
decode steps follow; the plain and exact runs alternate in one process (this machine is shared, and its speed
drifts within minutes) and each keeps its best of `--repeat`. Prints prefill ms, decode ms a step and the exact
over plain time ratios (issue 18's target: at most 1.5x).
"""

from __future__ import annotations

import argparse
import time

import torch

from dsv4 import kernels
from dsv4.config import preset
from dsv4.engine import Engine, SamplingParams
from dsv4.formats import to_official_formats
from dsv4.model import Transformer, init_weights


def run(model, prompts: list[list[int]], decode_steps: int) -> tuple[float, float]:
    """(prefill seconds, seconds a decode step) of one engine run."""
    engine = Engine(model, max_batch=len(prompts), max_seq_len=len(prompts[0]) + decode_steps + 8,
                    prefill_chunk=len(prompts) * 512)
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=decode_steps + 2, ignore_eos=True))
    start = time.perf_counter()
    engine.step()
    prefill = time.perf_counter() - start
    engine.step()
    start = time.perf_counter()
    for _ in range(decode_steps):
        engine.step()
    return prefill, (time.perf_counter() - start) / decode_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--backend", default="native")
    opts = parser.parse_args()
    torch.set_grad_enabled(False)
    args = preset(opts.preset).replace(max_seq_len=4096)
    models = {"plain": init_weights(Transformer(args, dtype=torch.float32), seed=0).eval(),
              "exact": to_official_formats(init_weights(Transformer(args, torch.bfloat16, "exact"), seed=0)).eval()}
    print(f"{torch.get_num_threads()} threads, `{opts.preset}` preset, {opts.backend} backend, best of {opts.repeat}")
    print(f"{'batch':>5} {'prefill plain/exact ms':>24} {'ratio':>6} {'decode plain/exact ms':>23} {'ratio':>6}")
    with kernels.use_backend(opts.backend):
        for batch in opts.batches:
            gen = torch.Generator().manual_seed(batch)
            prompts = torch.randint(0, args.vocab_size, (batch, 256), generator=gen).tolist()
            best = {name: [float("inf"), float("inf")] for name in models}
            for model in models.values():  # warm-up: kernels built, weights decoded
                run(model, prompts, 4)
            for _ in range(opts.repeat):
                for name, model in models.items():
                    prefill, decode = run(model, prompts, 32)
                    best[name] = [min(best[name][0], prefill), min(best[name][1], decode)]
            (pp, pd), (ep, ed) = best["plain"], best["exact"]
            print(f"{batch:>5} {pp * 1e3:>11.1f} / {ep * 1e3:<10.1f} {ep / pp:>5.2f}x"
                  f" {pd * 1e3:>10.2f} / {ed * 1e3:<10.2f} {ed / pd:>5.2f}x")


if __name__ == "__main__":
    main()
