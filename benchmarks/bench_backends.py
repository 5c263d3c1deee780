"""Kernel backends side by side, in one run: the engine's prefill and decode tokens/s, and a training step.

Run:  python benchmarks/bench_backends.py [--backends reference cpu] [--batches 1 8] [--new 48] [--cases ...]

Cases:
  demo, demo-mtp   the shipped demo model (exact numerics, fp32, as `dsv4 serve` runs it) on held-out chat
                   questions in think-high mode; demo-mtp at batch 1 without and with MTP speculation (k=1)
  small            the `small` preset, random weights, plain fp32, random prompts of 256 tokens
  small-exact      the same in exact bf16 numerics with FP8 / FP4 weights
  train            the demo recipe's model and batch (8 x 512 tokens, fp32): forward with the MTP and indexer
                   losses, then backward (the optimizer step is left out)
Decoding is greedy, `--new` tokens per request. Each case runs every backend on the same model and inputs,
checks that the greedy tokens agree, and prints tokens/s and the ratio to the first backend. Prefill and decode are
each the best of `--repeat` runs (the machine is shared; the best run is the least disturbed one).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dsv4 import kernels
from dsv4.config import preset
from dsv4.demo.recipe import demo_model_args
from dsv4.engine import Engine, SamplingParams
from dsv4.formats import to_official_formats
from dsv4.model import Transformer, init_weights
from dsv4.model.cache import ForwardTrace
from dsv4.runtime import ModelSource, load


def run(model, prompts, new, backend, k=0):
    """(tokens per request, prefill seconds, decode seconds, engine stats)."""
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
    return [out[i] for i in ids], first - t0, time.perf_counter() - first, engine.stats()


def demo_prompts(tokenizer, n):
    """The first n held-out arithmetic questions, encoded as `dsv4 serve` encodes a think-high chat request."""
    from dsv4.chat.encoding import encode_messages
    from dsv4.demo.evaluate import held_out

    return [tokenizer.encode(encode_messages(conv.messages[:1], thinking_mode="thinking"))
            for conv in held_out(0, n)["arithmetic"]]


def case(name, model, prompts_for, batches, new, backends, repeat, k=0):
    for batch in batches:
        prompts = prompts_for(batch)
        rows = {}
        for backend in backends:
            run(model, [p[:16] for p in prompts[:1]], 2, backend, k)  # warm-up (weights decoded, allocator)
            results = [run(model, prompts, new, backend, k) for _ in range(repeat)]
            # the fastest prefill and the fastest decode of the repeats, each on its own (the first full-length
            # prefill still pays one-time costs the short warm-up does not reach)
            toks, _, _, stats = min(results, key=lambda result: result[2])
            rows[backend] = (toks, min(r[1] for r in results), min(r[2] for r in results), stats)
        base = rows[backends[0]]
        n_prompt = sum(map(len, prompts))
        for backend, (toks, prefill, decode, stats) in rows.items():
            same = "same tokens" if toks == base[0] else "TOKENS DIFFER"
            if k:
                same += f", {stats.acceptance_rate:.0%} of drafts accepted"
            p_rate, d_rate = n_prompt / prefill, batch * (new - 1) / decode
            p_base, d_base = n_prompt / base[1], batch * (new - 1) / base[2]
            print(f"{name:<28}{batch:>6}{backend:>11}{p_rate:12.1f}{d_rate:12.1f}{p_rate / p_base:9.2f}x"
                  f"{d_rate / d_base:9.2f}x  {same}")


def train_case(backends, repeat, batch=8, seq_len=512):
    """Forward (main, MTP and indexer losses) and backward of the demo recipe's model on one batch."""
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in demo_model_args().items()}
    args = preset("tiny").replace(**overrides, vocab_size=2048)
    model = init_weights(Transformer(args, dtype=torch.float32), seed=0).train()
    tokens = torch.randint(0, args.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def step():
        trace = ForwardTrace()
        streams = model.forward_streams(tokens[:, :-1], trace=trace)
        loss = F.cross_entropy(model.logits(streams).flatten(0, 1), tokens[:, 1:].flatten())
        mtp = model.mtp_logits(streams[:, :-1], tokens[:, 1:-1], trace=trace)
        loss = loss + 0.3 * F.cross_entropy(mtp.flatten(0, 1), tokens[:, 2:].flatten()) + sum(trace.indexer_losses)
        loss.backward()
        model.zero_grad(set_to_none=True)

    base = None
    with torch.enable_grad():
        for backend in backends:
            with kernels.use_backend(backend):
                step()
                best = float("inf")
                for _ in range(max(repeat, 2)):
                    t0 = time.perf_counter()
                    step()
                    best = min(best, time.perf_counter() - t0)
            rate = batch * seq_len / best
            base = base or rate
            print(f"{'train step (demo model)':<28}{batch:>6}{backend:>11}{'':>12}{rate:12.1f}{'':>10}"
                  f"{rate / base:9.2f}x  {best * 1000:.0f} ms/step (tokens/s under decode/s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", default=["reference", "cpu"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=["demo", "demo-mtp", "small", "small-exact", "train"])
    opts = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"{torch.get_num_threads()} threads; {opts.new} new tokens, greedy; ratios to {opts.backends[0]}")
    print(f"{'case':<28}{'batch':>6}{'backend':>11}{'prefill/s':>12}{'decode/s':>12}{'prefill':>10}{'decode':>10}")
    if {"demo", "demo-mtp"} & set(opts.cases):
        loaded = load(ModelSource(model="demo"))
        questions = demo_prompts(loaded.tokenizer, max(opts.batches))
        if "demo" in opts.cases:
            case("demo (exact fp32)", loaded.model, lambda b: questions[:b], opts.batches, opts.new, opts.backends,
                 opts.repeat)
        if "demo-mtp" in opts.cases:
            for k in (0, 1):
                case(f"demo, MTP k={k}", loaded.model, lambda b: questions[:b], [1], opts.new, opts.backends,
                     opts.repeat, k=k)
    args = preset("small").replace(max_seq_len=4096)
    gen = torch.Generator().manual_seed(0)

    def random_prompts(batch):
        return torch.randint(0, args.vocab_size, (batch, 256), generator=gen).tolist()

    if "small" in opts.cases:
        small = init_weights(Transformer(args, dtype=torch.float32), seed=0).eval()
        case("small (plain fp32)", small, random_prompts, opts.batches, opts.new, opts.backends, opts.repeat)
    if "small-exact" in opts.cases:
        exact = to_official_formats(init_weights(Transformer(args, torch.bfloat16, "exact"), seed=0)).eval()
        case("small (exact bf16)", exact, random_prompts, opts.batches, opts.new, opts.backends, opts.repeat)
    if "train" in opts.cases:
        train_case(opts.backends, opts.repeat)


if __name__ == "__main__":
    main()
