"""MTP speculative decoding on a trained model: acceptance rate and decode speed against plain greedy decoding.

Run:  python benchmarks/bench_mtp.py [--model DIR] [--prompts 8] [--new 128] [--batch 1] [--draft 1 2] [--repeat 3]

The model (default: the shipped demo model, `dsv4.demo.MODEL_DIR`) runs fp32 in exact numerics on the CPU. The
prompts are held-out demo questions (`dsv4.demo.evaluate.held_out`: arithmetic, weather and calculator, in turn)
rendered by the chat encoder in thinking mode (`--chat` for non-think), where the model writes its predictable
column-by-column traces. Each prompt is decoded greedily for up to `--new` tokens (stopping at EOS) with the plain
engine and with `num_speculative` = each `--draft` value, `--batch` prompts at a time. Per setting it prints decode
tokens/s (every token after each request's first, over the time after the batch's first tokens), the draft
acceptance rate, emitted tokens per main-model step and the speed-up over plain decoding, and asserts that the
greedy outputs are identical. A k the model's caches cannot verify (k + 1 beyond the smallest ring) is skipped.
The settings run `--repeat` rounds, alternating within each round (this machine is shared, and its speed drifts by
more than the speed-ups between two runs minutes apart); each setting keeps its best decode time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dsv4.chat.encoding import encode_messages
from dsv4.chat.tokenizer import Tokenizer
from dsv4.demo import MODEL_DIR
from dsv4.demo.evaluate import SKILLS, held_out
from dsv4.engine import SamplingParams
from dsv4.runtime import EngineConfig, LoadedModel, ModelSource, build_engine, load


def prompts_for(tokenizer: Tokenizer, count: int, seed: int, thinking: bool) -> list[list[int]]:
    """`count` held-out questions (the skills in turn), each its first user turn with the conversation's tools."""
    questions = held_out(seed, -(-count // len(SKILLS)))
    convs = [questions[s][i] for i in range(len(questions[SKILLS[0]])) for s in SKILLS][:count]
    return [tokenizer.encode(encode_messages(c.messages[:1], tools=c.tools,
                                             thinking_mode="thinking" if thinking else "chat")) for c in convs]


def run_engine(loaded: LoadedModel, prompts, new, batch, k=0):
    """(tokens per prompt, decode tokens, decode seconds, drafted, accepted, main steps): prompts `batch` at a
    time; decode time runs from each group's last first token to its end."""
    max_seq_len = max(len(p) for p in prompts) + new + 8
    engine = build_engine(loaded, EngineConfig(max_batch=batch, max_seq_len=max_seq_len,
                                               prefill_chunk=batch * max_seq_len, prefix_cache_bytes=0,
                                               num_speculative=k))
    params = SamplingParams(temperature=0.0, max_tokens=new)
    outputs, decode_tokens, decode_s, steps = [], 0, 0.0, 0
    for start in range(0, len(prompts), batch):
        ids = [engine.add_request(p, params) for p in prompts[start:start + batch]]
        out = {i: [] for i in ids}
        first = None
        while engine.has_unfinished():
            for u in engine.step():
                out[u.request_id] += u.new_token_ids
            if first is None and all(out.values()):
                first = time.perf_counter()
            elif first is not None:
                steps += 1
        decode_s += time.perf_counter() - first
        decode_tokens += sum(len(v) - 1 for v in out.values())
        outputs += [out[i] for i in ids]
    stats = engine.stats()
    return outputs, decode_tokens, decode_s, stats.drafted, stats.accepted, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(MODEL_DIR), help="model directory (default: the demo model)")
    parser.add_argument("--prompts", type=int, default=8, help="held-out questions to decode")
    parser.add_argument("--new", type=int, default=128, help="tokens per prompt at most (greedy, stops at EOS)")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded at once")
    parser.add_argument("--draft", type=int, nargs="+", default=[1, 2], help="num_speculative values to compare")
    parser.add_argument("--chat", action="store_true", help="non-think prompts (default: thinking mode)")
    parser.add_argument("--seed", type=int, default=0, help="which held-out questions")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every setting; each keeps its best time")
    opts = parser.parse_args()

    path = Path(opts.model)
    if not (path / "config.json").is_file():
        raise SystemExit(f"bench_mtp: no model directory at {path} (pass --model DIR)")
    loaded = load(ModelSource(model=str(path), numerics="exact", dtype="float32"))
    model, tokenizer = loaded.model, loaded.tokenizer
    if not model.args.n_mtp_layers:
        raise SystemExit(f"bench_mtp: {path} has no MTP block to draft with")
    prompts = prompts_for(tokenizer, opts.prompts, opts.seed, thinking=not opts.chat)
    print(f"{path}: {model.parameter_counts()['total'] / 1e6:.2f}M params, {len(prompts)} held-out prompts "
          f"({'non-think' if opts.chat else 'thinking'}, {min(map(len, prompts))}-{max(map(len, prompts))} tokens), "
          f"up to {opts.new} new tokens, batch {opts.batch}, fp32 exact, {torch.get_num_threads()} threads")
    run_engine(loaded, prompts[:1], 4, 1)  # warm-up

    best: dict[int, tuple] = {}  # k -> the run with the least decode time
    skipped: dict[int, str] = {}
    for _ in range(max(1, opts.repeat)):
        for k in [0, *opts.draft]:
            if k in skipped:
                continue
            try:
                run = run_engine(loaded, prompts, opts.new, opts.batch, k=k)
            except ValueError as err:
                skipped[k] = str(err)
                continue
            if k in best:
                assert run[0] == best[k][0], f"num_speculative={k}: greedy output differs between rounds"
            if k not in best or run[2] < best[k][2]:
                best[k] = run
    base, n, base_s, _, _, base_steps = best[0]
    print(f"{'k':>3}{'decode tok/s':>14}{'accepted':>18}{'tok/step':>10}{'speed-up':>10}")
    print(f"{0:>3}{n / base_s:14.1f}{'-':>18}{n / max(base_steps, 1):10.2f}{1:9.2f}x")
    for k in opts.draft:
        if k in skipped:
            print(f"{k:>3}  skipped: {skipped[k]}")
            continue
        toks, n_k, secs, drafted, accepted, steps = best[k]
        assert toks == base, f"num_speculative={k}: greedy output differs from plain greedy"
        rate = f"{accepted / drafted:.1%} of {drafted}" if drafted else "no drafts"
        print(f"{k:>3}{n_k / secs:14.1f}{rate:>18}{n_k / max(steps, 1):10.2f}{base_s / secs:9.2f}x")
    print(f"greedy outputs identical across settings: {len(base)} prompts, {sum(map(len, base))} tokens "
          f"(best of {max(1, opts.repeat)} rounds each)")


if __name__ == "__main__":
    main()
