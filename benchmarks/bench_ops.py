"""Where an engine step's time goes, by kernel-seam op: each op's time inside real engine steps.

Run:  python benchmarks/bench_ops.py [--preset small] [--numerics plain] [--batch 1] [--mode prefill]
      [--steps 12] [--backend native] [--ops routed_experts sparse_attn ...]

Random weights of the preset (exact numerics: bf16 activations and the official FP8 / FP4 formats); random prompts of
256 tokens, prefilled in one step by a fresh engine (`--mode prefill`), or 32 greedy decode steps after it (`decode`,
times per step). Every op of the backend's seam is wrapped with a timer (nested calls of one op count once), and
each figure is the least and the median over `--steps` measured runs: a profile of the op's own cost in place, with
the caches as the rest of the step leaves them (an op timed alone in a loop runs warm, and a prefill's weights are
not). A decode step follows each run, untimed: a prefill right after another over the same chunk would read its
RoPE rows, window indices and pooling plans (`Transformer._shared_memo`), which a real prefill builds. Prints the
step time and, per op, calls per step and milliseconds per step, largest first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from dsv4 import kernels
from dsv4.config import preset
from dsv4.engine import Engine, SamplingParams
from dsv4.formats import to_official_formats
from dsv4.model import Transformer, init_weights

DECODE_STEPS = 32


def timed_backend(backend, names: list[str]) -> tuple[dict[str, float], dict[str, int]]:
    """Wrap the ops `names` of `backend` (an instance: the wrappers are its attributes) with timers; returns the
    running totals (seconds) and call counts, which the caller clears between runs."""
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    active: set[str] = set()
    for name in names:
        op = getattr(backend, name)

        def timed(*args, _op=op, _name=name, **kwargs):
            if _name in active:  # an op that calls itself (a fallback through the parent class) counts once
                return _op(*args, **kwargs)
            active.add(_name)
            start = time.perf_counter()
            try:
                return _op(*args, **kwargs)
            finally:
                seconds[_name] += time.perf_counter() - start
                calls[_name] += 1
                active.discard(_name)

        setattr(backend, name, timed)
    return seconds, calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--numerics", choices=("plain", "exact"), default="plain")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mode", choices=("prefill", "decode"), default="prefill")
    parser.add_argument("--steps", type=int, default=12, help="measured runs (after two warm-up runs)")
    parser.add_argument("--backend", default="native")
    parser.add_argument("--ops", nargs="+", default=None, help="the seam ops to time (default: every one)")
    opts = parser.parse_args()

    args = preset(opts.preset)
    if opts.numerics == "plain":
        model = init_weights(Transformer(args, dtype=torch.float32), seed=0).eval()
    else:
        model = to_official_formats(init_weights(Transformer(args, torch.bfloat16, "exact"), seed=0)).eval()
    prompts = torch.randint(0, args.vocab_size, (opts.batch, 256), generator=torch.Generator().manual_seed(0)).tolist()
    backend = kernels.get_backend(opts.backend)
    names = opts.ops or sorted(kernels.OPS)
    unknown = [n for n in names if n not in kernels.OPS]
    if unknown:
        parser.error(f"not seam ops: {unknown}; choose from {sorted(kernels.OPS)}")
    seconds, calls = timed_backend(backend, names)

    def run() -> tuple[float, dict[str, float], dict[str, int]]:
        engine = Engine(model, max_batch=opts.batch, max_seq_len=256 + DECODE_STEPS + 8, prefill_chunk=opts.batch * 512,
                        kernel_backend=opts.backend)
        for p in prompts:
            engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=DECODE_STEPS + 2, ignore_eos=True))
        steps = 1
        if opts.mode == "decode":
            engine.step()
            engine.step()
            steps = DECODE_STEPS
        seconds.clear()
        calls.clear()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = time.perf_counter() - start
        timed = {k: v / steps for k, v in seconds.items()}, {k: v / steps for k, v in calls.items()}
        engine.step()  # (untimed) so that the next run's prefill does not follow a forward over the same chunk
        return elapsed / steps, *timed

    for _ in range(2):
        run()
    runs = [run() for _ in range(opts.steps)]
    step_ms = [r[0] * 1e3 for r in runs]
    print(f"{opts.preset}, {opts.numerics}, batch {opts.batch}, {opts.mode}, {opts.backend} backend, "
          f"{torch.get_num_threads()} threads, {opts.steps} runs")
    print(f"step: min {min(step_ms):.2f} ms, median {statistics.median(step_ms):.2f} ms")
    print(f"{'op':>20} {'calls':>7} {'min ms':>8} {'median ms':>10}")
    ops = {name for r in runs for name in r[1]}
    rows = []
    for name in ops:
        ms = [r[1].get(name, 0.0) * 1e3 for r in runs]
        rows.append((statistics.median(ms), min(ms), name, runs[0][2].get(name, 0.0)))
    for median, least, name, n in sorted(rows, reverse=True):
        print(f"{name:>20} {n:7.1f} {least:8.2f} {median:10.2f}")


if __name__ == "__main__":
    main()
