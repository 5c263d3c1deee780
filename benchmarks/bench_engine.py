"""The engine against transformers' DeepSeek-V4 `generate` on the same weights, and MTP speculation against none.

Run:  python benchmarks/bench_engine.py [--preset small] [--prompt-len 256] [--new 32] [--batches 1 8]
      [--repeat 2]

Both sides run fp32 on the CPU with greedy decoding and the same random weights (dsv4 in plain numerics, which is
what transformers computes). Per batch size it prints prefill tokens/s (the prompts' forward up to the first
token), decode tokens/s (the remaining tokens) and the dsv4/transformers ratios, each side's best of `--repeat`
runs, and checks the greedy tokens agree. Then, at batch 1, decode tokens/s with `num_speculative` = 0, 1, 2 and
the draft acceptance rate. With random weights the MTP block almost never guesses the main model's token, so this
shows the cost side of speculation; a trained model (issue 8's demo) shows the gain.
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
from dsv4.engine import Engine, SamplingParams  # noqa: E402
from dsv4.model import Transformer, init_weights  # noqa: E402


def run_engine(model, prompts, new, max_seq_len, k=0):
    """(tokens per request, seconds to every request's first token, seconds for the rest, stats)."""
    engine = Engine(model, max_batch=len(prompts), max_seq_len=max_seq_len, prefill_chunk=len(prompts) * 512,
                    num_speculative=k)
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
    end = time.perf_counter()
    return [out[i] for i in ids], first - t0, end - first, engine.stats()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--draft", type=int, nargs="+", default=[1, 2], help="num_speculative values to compare")
    parser.add_argument("--repeat", type=int, default=2, help="runs per side and batch size; the best one counts")
    opts = parser.parse_args()

    max_seq_len = opts.prompt_len + opts.new + 8
    args = preset(opts.preset).replace(max_seq_len=max(4096, max_seq_len))
    model = init_weights(Transformer(args, dtype=torch.float32), seed=0).eval()
    hf = hf_twin(model)
    gen = torch.Generator().manual_seed(0)
    print(f"preset {opts.preset}: {model.parameter_counts()['total'] / 1e6:.1f}M params, prompt {opts.prompt_len}, "
          f"{opts.new} new tokens, fp32, {torch.get_num_threads()} threads")
    print(f"{'batch':>5} {'':>13}{'prefill tok/s':>15}{'decode tok/s':>15}")
    # warm-up, both sides, on a random prompt of the measured length: the first forward that routes tokens to
    # every expert pays one-time costs (dsv4 stacks the expert weights for its batched GEMMs), which an 8-token
    # warm-up of one repeated token left in the batch-1 prefill
    warm = torch.randint(0, args.vocab_size, (1, opts.prompt_len), generator=torch.Generator().manual_seed(1))
    run_engine(model, warm.tolist(), 2, max_seq_len)
    with torch.inference_mode():
        hf.generate(warm, max_new_tokens=2, do_sample=False)
    for batch in opts.batches:
        prompt = torch.randint(0, args.vocab_size, (batch, opts.prompt_len), generator=gen)
        # each side's best of `--repeat` runs, alternating: a first run at a new batch size pays page faults for
        # its new buffers, and transformers' decode time is the difference of two runs, so one slow prefill run
        # made its decode look fast
        ttft = rest = hf_first = hf_all = float("inf")
        for _ in range(opts.repeat):
            ours, first, after, _ = run_engine(model, prompt.tolist(), opts.new, max_seq_len)
            ttft, rest = min(ttft, first), min(rest, after)
            with torch.inference_mode():
                t0 = time.perf_counter()
                hf.generate(prompt, max_new_tokens=1, do_sample=False)
                hf_first = min(hf_first, time.perf_counter() - t0)
                t0 = time.perf_counter()
                seq = hf.generate(prompt, max_new_tokens=opts.new, do_sample=False, min_new_tokens=opts.new)
                hf_all = min(hf_all, time.perf_counter() - t0)
        hf_rest = max(hf_all - hf_first, 1e-9)
        n_prefill, n_decode = batch * opts.prompt_len, batch * (opts.new - 1)
        rows = {"dsv4": (n_prefill / ttft, n_decode / rest), "transformers": (n_prefill / hf_first,
                                                                              n_decode / hf_rest)}
        for name, (p, d) in rows.items():
            print(f"{batch:>5} {name:>13}{p:15.1f}{d:15.1f}")
        print(f"{batch:>5} {'ratio':>13}{rows['dsv4'][0] / rows['transformers'][0]:14.2f}x"
              f"{rows['dsv4'][1] / rows['transformers'][1]:14.2f}x")
        same = sum(a == b for x, y in zip(ours, seq[:, opts.prompt_len:].tolist(), strict=True)
                   for a, b in zip(x, y, strict=False))
        print(f"{'':>5} greedy tokens identical: {same}/{batch * opts.new}")

    prompt = torch.randint(0, args.vocab_size, (1, opts.prompt_len), generator=gen).tolist()
    base, _, base_rest, _ = run_engine(model, prompt, opts.new, max_seq_len)
    print(f"\nMTP speculation, batch 1: decode tok/s (acceptance rate)\n{'k=0':>6}{(opts.new - 1) / base_rest:10.1f}")
    for k in opts.draft:
        toks, _, rest, stats = run_engine(model, prompt, opts.new, max_seq_len, k=k)
        assert toks == base, "speculative greedy output differs from plain greedy"
        print(f"{f'k={k}':>6}{(opts.new - 1) / rest:10.1f}  ({stats.acceptance_rate:.0%} of {stats.drafted} drafts; "
              f"{base_rest / rest:.2f}x plain)")


if __name__ == "__main__":
    main()
