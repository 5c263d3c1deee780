"""Long-context prefill and decode on the `nano` preset (random weights), up to 1,048,576 tokens.

For each context length L: a fresh cache, an L-token random prompt prefilled in chunks of --chunk
tokens (`model(chunk, cache)`, the cache follows the position), then --decode greedy single-token
steps at context L. Prints wall time, tokens/s, peak RSS, the cache's tensor bytes and the decode
time per token. Only the public API is used (`new_cache`, `model(tokens, cache)`), so the script
does not depend on the cache's layout. With --engine the same prompt goes through `dsv4.engine.Engine`
(the paged hybrid cache, chunked prefill by the scheduler, greedy sampling), and the cache column is the
engine's whole KV allocation (slot state + pages).

Memory should stay flat in L apart from the cache itself (no O(L^2) tensor anywhere); prefill time
grows near-linearly apart from the CSA indexer, which scores every visible entry (L^2/8 scores).

    python benchmarks/bench_long_context.py --lengths 65536,262144,1048576 --chunk 2048
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from dsv4.config import preset
from dsv4.engine import Engine, SamplingParams
from dsv4.model import Transformer, init_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux `clear_refs` 5), so each length gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(per_length: bool) -> int:
    """VmHWM since the last reset, else the process-lifetime peak from getrusage."""
    if per_length:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def tensor_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor storage reachable from obj (walks attributes, lists, dicts), so
    it counts whatever layout the cache has."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
        children += [getattr(obj, name) for name in getattr(type(obj), "__slots__", ()) if hasattr(obj, name)]
    return sum(tensor_bytes(child, seen) for child in children)


@torch.inference_mode()
def run_length(model: Transformer, length: int, chunk: int, n_decode: int, seed: int) -> dict[str, float]:
    per_length = reset_peak_rss()
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.args.vocab_size, (1, length), generator=gen)
    cache = model.new_cache(1, length + n_decode)
    t0 = time.perf_counter()
    next_report = 0.1
    for lo in range(0, length, chunk):
        logits = model(prompt[:, lo:lo + chunk], cache)
        done = min(lo + chunk, length) / length
        if done >= next_report:
            print(f"  L={length}: {done:4.0%} after {time.perf_counter() - t0:7.1f} s", file=sys.stderr, flush=True)
            next_report += 0.1
    prefill = time.perf_counter() - t0
    token = logits[:, -1:].argmax(-1)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        token = model(token, cache)[:, -1:].argmax(-1)
    decode = (time.perf_counter() - t1) / max(n_decode, 1)
    return {"prefill_s": prefill, "tok_s": length / prefill, "rss": peak_rss_bytes(per_length),
            "cache": tensor_bytes(cache), "decode_ms": decode * 1e3}


@torch.inference_mode()
def run_engine_length(model: Transformer, length: int, chunk: int, n_decode: int, seed: int) -> dict[str, float]:
    per_length = reset_peak_rss()
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.args.vocab_size, (length,), generator=gen).tolist()
    engine = Engine(model, max_batch=1, max_seq_len=length + n_decode + 1, prefill_chunk=chunk)
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=n_decode + 1, ignore_eos=True))
    t0 = time.perf_counter()
    first = None
    while engine.has_unfinished():
        if engine.step() and first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"prefill_s": first - t0, "tok_s": length / (first - t0), "rss": peak_rss_bytes(per_length),
            "cache": engine.kv.total_bytes, "decode_ms": (end - first) / max(n_decode, 1) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="65536,262144,1048576", help="comma-separated prompt lengths")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens per model call)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="activations and weights (float32 is the faster one on CPUs without bf16 units)")
    parser.add_argument("--decode", type=int, default=8, help="greedy decode steps timed after each prefill")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 avoids OpenMP spin-waits on a busy machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", action="store_true", help="run through the engine and its paged cache")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    lengths = [int(x) for x in opts.lengths.split(",")]
    args = preset("nano")
    model = init_weights(Transformer(args, dtype=DTYPES[opts.dtype]), seed=opts.seed)
    print(f"nano preset ({model.parameter_counts()['total']:,} params, {opts.dtype}), chunk {opts.chunk}, "
          f"{'engine, paged cache' if opts.engine else 'model + dense cache'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'L':>9} {'prefill s':>10} {'tok/s':>8} {'peak RSS':>10} {'cache':>10} {'decode ms/tok':>14}")
    for length in lengths:
        r = (run_engine_length if opts.engine else run_length)(model, length, opts.chunk, opts.decode, opts.seed)
        print(f"{length:>9} {r['prefill_s']:>10.1f} {r['tok_s']:>8.0f} {r['rss'] / 2**30:>8.2f} GiB "
              f"{r['cache'] / 2**20:>6.1f} MiB {r['decode_ms']:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
