"""Prefill and decode tokens/s of dsv4 vs transformers' DeepSeek-V4 on the same config and weights.

Run:  python benchmarks/bench_vs_transformers.py [--preset small] [--prompt-len 256] [--new 32]
Both models run fp32 on the CPU with greedy decoding and their own caches; dsv4 in plain numerics
(transformers has no FP8/FP4 simulation). Prints tokens/s for each and the dsv4/transformers ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hf_reference import hf_twin  # noqa: E402

from dsv4.config import preset  # noqa: E402
from dsv4.generate import generate  # noqa: E402
from dsv4.model import Transformer, init_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    opts = parser.parse_args()

    args = preset(opts.preset).replace(max_seq_len=max(4096, opts.prompt_len + opts.new))
    model = init_weights(Transformer(args, dtype=torch.float32), seed=0).eval()
    hf = hf_twin(model)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (opts.batch, opts.prompt_len), generator=gen)

    generate(model, prompt[:, :8].tolist(), 2)  # warm-up
    ours = generate(model, prompt.tolist(), opts.new)

    with torch.inference_mode():
        hf.generate(prompt[:, :8], max_new_tokens=2, do_sample=False)
        t0 = time.perf_counter()
        out = hf(prompt, use_cache=True)
        t1 = time.perf_counter()
        hf_prefill = t1 - t0
        t0 = time.perf_counter()
        seq = hf.generate(prompt, max_new_tokens=opts.new, do_sample=False, min_new_tokens=opts.new)
        hf_total = time.perf_counter() - t0
        del out
    hf_decode = max(hf_total - hf_prefill, 1e-9)
    hf_new = seq[:, opts.prompt_len:].tolist()
    same = sum(a == b for x, y in zip(ours.tokens, hf_new, strict=True) for a, b in zip(x, y, strict=False))

    n_prefill, n_decode = opts.batch * opts.prompt_len, opts.batch * (opts.new - 1)
    print(f"preset {opts.preset}: {model.parameter_counts()['total'] / 1e6:.1f}M params, batch {opts.batch}, "
          f"prompt {opts.prompt_len}, {opts.new} new tokens, {torch.get_num_threads()} threads")
    print(f"{'':14}{'prefill tok/s':>15}{'decode tok/s':>15}")
    print(f"{'dsv4':14}{ours.prefill_tps:15.1f}{ours.decode_tps:15.1f}")
    print(f"{'transformers':14}{n_prefill / hf_prefill:15.1f}{n_decode / hf_decode:15.1f}")
    print(f"{'ratio':14}{ours.prefill_tps / (n_prefill / hf_prefill):15.2f}x"
          f"{ours.decode_tps / (n_decode / hf_decode):14.2f}x")
    print(f"greedy tokens identical: {same}/{opts.batch * opts.new}")


if __name__ == "__main__":
    main()
