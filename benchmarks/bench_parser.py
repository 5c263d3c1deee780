"""Throughput of the completion parsers, in characters per second.

Builds a long completion (reasoning, content with newlines, CJK and some `<`, then a tool-calls
block with string, typed and long arguments), checks that every chunking aggregates to the
full-text parse, and times:

    stream/N      StreamParser.feed over N-character chunks, then finish
    stream/tok    chunks of 1..6 characters (about a detokenized token each)
    stream/1      one chunk: the whole text
    full          parse_completion (well-formed: its direct path)
    full/fallback parse_completion of the same text with one tag broken (the streaming machine)

plus the same for a markup-heavy completion (HTML in the content: a `<` every few characters).

    python benchmarks/bench_parser.py [--chars 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from dsv4.chat.events import aggregate_events
from dsv4.chat.format import (
    EOS,
    INVOKE_END,
    INVOKE_START,
    PARAMETER_END,
    PARAMETER_START,
    THINK_END,
    TOOL_CALLS_END,
    TOOL_CALLS_SEPARATOR,
    TOOL_CALLS_START,
)
from dsv4.chat.parser import parse_completion
from dsv4.chat.streaming import StreamParser

WORDS = ("the weather in Beijing is sunny with a high of 22°C and a low of 12°C so a light jacket is enough "
         "北京 今天 晴 气温 适宜 let me check the forecast for tomorrow as well a < b and c > d x_1 = y**2").split()
HTML = ["<div>", "</div>", "<p>", "</p>", "<b>", "</b>", "<br/>", "<a href='x'>", "</a>", "text", " ", "\n", "<", "th"]


def prose(rng: random.Random, n: int) -> str:
    out, size = [], 0
    while size < n:
        w = rng.choice(WORDS) + (rng.choice(["\n", "\n\n"]) if rng.random() < 0.03 else " ")
        out.append(w)
        size += len(w)
    return "".join(out)


def markup(rng: random.Random, n: int) -> str:
    out, size = [], 0
    while size < n:
        w = rng.choice(HTML)
        out.append(w)
        size += len(w)
    return "".join(out)


def completion(chars: int, html: bool, seed: int = 0) -> str:
    rng = random.Random(seed)
    body = markup if html else prose
    calls = []
    for i in range(8):
        params = [
            f'{PARAMETER_START}query" string="true">{prose(rng, chars // 40)}{PARAMETER_END}',
            f'{PARAMETER_START}n" string="false">{i}{PARAMETER_END}',
            f'{PARAMETER_START}opts" string="false">'
            f'{json.dumps({"k": [prose(rng, 50) for _ in range(chars // 4000)]}, ensure_ascii=False)}{PARAMETER_END}',
        ]
        calls.append(f'{INVOKE_START}search">\n' + "\n".join(params) + f"\n{INVOKE_END}")
    dsml = TOOL_CALLS_SEPARATOR + TOOL_CALLS_START + "\n" + "\n".join(calls) + "\n" + TOOL_CALLS_END
    rest = chars - len(dsml) - len(THINK_END) - len(EOS)
    return prose(rng, rest * 2 // 5) + THINK_END + body(rng, rest * 3 // 5) + dsml + EOS


def chunkings(text: str, rng: random.Random) -> dict[str, list[str]]:
    out = {f"stream/{n}": [text[i:i + n] for i in range(0, len(text), n)] for n in (3, 4, 16)}
    tok, i = [], 0
    while i < len(text):
        k = rng.randint(1, 6)
        tok.append(text[i:i + k])
        i += k
    out["stream/tok"] = tok
    out["stream/1"] = [text]
    return out


def run_stream(chunks: list[str]) -> list:
    sp = StreamParser(thinking=True)
    feed = sp.feed
    events = []
    for c in chunks:
        events += feed(c)
    events += sp.finish()
    return events


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(name: str, text: str, repeat: int) -> None:
    rng = random.Random(1)
    ref = parse_completion(text, id_factory=str)
    assert len(ref.tool_calls) == 8 and all(json.loads(c.arguments) for c in ref.tool_calls)
    broken = text.replace(INVOKE_END, INVOKE_END + " ", 1).replace(PARAMETER_END + "\n", PARAMETER_END + "\n ", 1)
    cases = chunkings(text, rng)
    print(f"{name}: {len(text):,} chars (reasoning {len(ref.reasoning_content):,}, content {len(ref.content):,}, "
          f"arguments {sum(len(c.arguments) for c in ref.tool_calls):,})")
    for label, chunks in cases.items():
        events = run_stream(chunks)
        got = aggregate_events(events)
        assert (got.reasoning_content, got.content, [c.arguments for c in got.tool_calls]) == (
            ref.reasoning_content, ref.content, [c.arguments for c in ref.tool_calls]), label
        s = best_of(repeat, lambda chunks=chunks: run_stream(chunks))
        print(f"  {label:<14} {len(chunks):>8,} feeds  {len(events):>8,} events  {len(text) / s / 1e6:8.2f} M chars/s")
    for label, t in (("full", text), ("full/fallback", broken)):
        s = best_of(repeat, lambda t=t: parse_completion(t))
        print(f"  {label:<14} {'':>8}        {'':>8}         {len(t) / s / 1e6:8.2f} M chars/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=200_000, help="length of each completion")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (the best is reported)")
    args = parser.parse_args()
    bench("prose", completion(args.chars, html=False), args.repeat)
    bench("markup-heavy content", completion(args.chars, html=True), args.repeat)


if __name__ == "__main__":
    main()
