"""Masking cost of constrained decoding: decode tokens/s with a JSON-schema grammar vs none, side by side in one run.

    python benchmarks/bench_structured.py                 # the demo model (2,048-token vocabulary)
    python benchmarks/bench_structured.py --model small   # a preset with V4's 129,280-token vocabulary

Each setting decodes `--new` tokens for `--batch` requests from the same prompts, greedy, through the engine;
the constrained requests carry the grammar the server builds for `response_format` (an object with a string
array, which a model can keep writing, so both sides decode the same number of tokens; the closer is left out so
the budget is all decoding). Runs alternate (free, constrained, free, ...) and the best of `--repeat` is kept.
"""

from __future__ import annotations

import argparse
import time

import torch

from dsv4.chat.grammars import completion_grammar
from dsv4.engine import Engine, SamplingParams
from dsv4.engine.constraint import Grammar, GrammarTokenizer
from dsv4.runtime import ModelSource, load

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "lines": {"type": "array",
                                                                                   "items": {"type": "string"}}},
          "required": ["title", "lines"]}


def decode_rate(loaded, prompts, params) -> float:
    engine = Engine(loaded.model, max_batch=len(prompts), max_seq_len=loaded.model.args.max_seq_len,
                    prefill_chunk=4096, eos_id=loaded.tokenizer.eos_id)
    ids = {engine.add_request(p, params) for p in prompts}
    started: set[int] = set()
    while started != ids:  # prefill and each request's first token, untimed
        started |= {u.request_id for u in engine.step()}
    start, produced = time.perf_counter(), 0
    while engine.has_unfinished():
        produced += sum(len(u.new_token_ids) for u in engine.step())
    return produced / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load(ModelSource(model=args.model))
    tok = loaded.tokenizer
    gtok = GrammarTokenizer(tok.hf.to_str(), loaded.model.args.vocab_size, [tok.eos_id])
    grammar = Grammar(gtok, completion_grammar(thinking=False, think_end_id=tok.think_end_id, response_format=SCHEMA))
    print(f"model {args.model} ({loaded.model.args.vocab_size:,} vocabulary), {args.new} new tokens, greedy")
    print("| batch | free tok/s | JSON-schema tok/s | ratio |\n|---|---|---|---|")
    for batch in args.batch:
        prompts = [tok.encode(f"Write a list number {i}.") for i in range(batch)]
        free = SamplingParams(temperature=0.0, max_tokens=args.new, ignore_eos=True)
        bound = SamplingParams(temperature=0.0, max_tokens=args.new, grammar=grammar)
        best = {"free": 0.0, "bound": 0.0}
        for _ in range(args.repeat):
            best["free"] = max(best["free"], decode_rate(loaded, prompts, free))
            best["bound"] = max(best["bound"], decode_rate(loaded, prompts, bound))
        print(f"| {batch} | {best['free']:.1f} | {best['bound']:.1f} | {best['bound'] / best['free']:.2f}x |")


if __name__ == "__main__":
    main()
