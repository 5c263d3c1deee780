"""Serving benchmark: N concurrent streaming clients for T seconds against the OpenAI endpoint on loopback.

Starts `dsv4 serve`'s app in-process (a preset with random weights, or `--model demo`; thinking off; random
weights may write EOS early, so answers can be shorter than max_tokens) or targets `--url`. Each client loops: one
streaming chat request with `stream_options.include_usage`, read to `data: [DONE]`. Prints requests/s, completion
tokens/s (from usage), p50/p99 time to first token and inter-token latency (between chunks that carry text), and
whether every stream ended complete (a finish_reason, a usage chunk and [DONE], no error event), per client.

`--big-request-mb MB` (the hostile mode: 64 clients for 30 s unless told otherwise) sends one chat request with a
prompt of that many megabytes half-way through the run (the body is built before the run, so the client's JSON
encoding does not share the server's time), and prints its answer and time, the p99 and largest inter-token gaps of
the other streams while it was in flight against those outside it, and the process's memory before, at the end,
and at its peak (in-process server only).

    .venv/bin/python benchmarks/bench_serve.py --clients 4 --seconds 10 --max-tokens 16
    .venv/bin/python benchmarks/bench_serve.py --model demo --big-request-mb 10 --clients 16 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import threading
import time
from dataclasses import dataclass, field

import httpx


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def rss_mb() -> float:
    """This process's resident memory now (MiB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def start_server(args: argparse.Namespace) -> tuple[str, object]:
    import uvicorn

    from dsv4.runtime import EngineConfig, ModelSource, build_serve_context
    from dsv4.serve.app import create_app

    ctx = build_serve_context(ModelSource(model=args.model, served_names=("bench",)),
                              EngineConfig(max_batch=args.clients, prefill_chunk=256))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}", server


@dataclass
class Stats:
    requests: int = 0
    tokens: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (arrival, gap before it)
    complete: dict[int, list[int]] = field(default_factory=dict)  # client -> [complete, requests]


async def client(http: httpx.AsyncClient, url: str, model: str, deadline: float, args, stats: Stats,
                 number: int) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
            "max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "thinking": {"type": "disabled"}, "temperature": 1.0, "seed": 0}
    mine = stats.complete.setdefault(number, [0, 0])
    while time.monotonic() < deadline:
        start = time.monotonic()
        last = None
        finish = usage = done = error = False
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                stats.errors += 1
                await r.aread()
                continue
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = True
                    continue
                if chunk.get("usage"):
                    usage = True
                    stats.tokens += chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    d = c.get("delta", {})
                    if d.get("content") or d.get("reasoning_content"):
                        now = time.monotonic()
                        if last is None:
                            stats.ttft.append(now - start)
                        else:
                            stats.gaps.append((now, now - last))
                        last = now
                    finish = finish or c.get("finish_reason") is not None
        stats.requests += 1
        mine[0] += finish and usage and done and not error
        mine[1] += 1


async def big_request(http: httpx.AsyncClient, url: str, body: bytes, delay: float, out: dict) -> None:
    """The hostile request: `body` posted after `delay` seconds; its window, status, answer and memory in `out`."""
    await asyncio.sleep(delay)
    out["rss_before"] = rss_mb()
    out["start"] = time.monotonic()
    r = await http.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    out["end"] = time.monotonic()
    out["status"], out["answer"] = r.status_code, r.text[:160]


async def main_async(args: argparse.Namespace) -> None:
    url, server = (args.url, None) if args.url else start_server(args)
    model = args.served_model if args.url else "bench"
    stats, big = Stats(), {}
    big_body = b""
    if args.big_request_mb:
        text = "9 " * int(args.big_request_mb * 2**20 / 2)
        big_body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}],
                               "thinking": {"type": "disabled"}, "max_tokens": 16}).encode()
    rss_start = rss_mb()
    limits = httpx.Limits(max_connections=args.clients + 2)
    async with httpx.AsyncClient(timeout=300, limits=limits,
                                 headers={"authorization": f"Bearer {args.api_key}"}) as http:
        start = time.monotonic()
        deadline = start + args.seconds
        jobs = [client(http, url, model, deadline, args, stats, i) for i in range(args.clients)]
        if big_body:
            jobs.append(big_request(http, url, big_body, args.seconds / 2, big))
        await asyncio.gather(*jobs)
        elapsed = time.monotonic() - start
    ms = 1000
    print(f"clients {args.clients}, {elapsed:.1f} s, model {args.model if not args.url else args.url}, "
          f"max_tokens {args.max_tokens}")
    complete = sum(c for c, _ in stats.complete.values())
    print(f"  requests      {stats.requests} ({stats.requests / elapsed:.2f}/s), "
          f"complete {complete}/{stats.requests}, HTTP errors {stats.errors}")
    print("  per client    " + " ".join(f"{i}:{c}/{n}" for i, (c, n) in sorted(stats.complete.items())))
    print(f"  tokens/s      {stats.tokens / elapsed:.1f}")
    gaps = [g for _, g in stats.gaps]
    for label, values in (("TTFT       ", stats.ttft), ("inter-token", gaps)):
        p50, p99 = percentile(values, 50) * ms, percentile(values, 99) * ms
        print(f"  {label}   p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    if big:
        # a gap is "during" the big request when it overlaps the request's lifetime
        during = [g for t, g in stats.gaps if t >= big["start"] and t - g <= big["end"]]
        outside = [g for t, g in stats.gaps if not (t >= big["start"] and t - g <= big["end"])]
        print(f"  big request   {args.big_request_mb:g} MB: HTTP {big['status']} in "
              f"{(big['end'] - big['start']) * ms:.0f} ms: {big['answer']}")
        for label, values in (("during it ", during), ("outside it", outside)):
            print(f"  gaps {label} n {len(values)}, p99 {percentile(values, 99) * ms:.1f} ms, "
                  f"max {max(values, default=float('nan')) * ms:.1f} ms")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  memory        RSS {rss_start:.0f} MiB at the start, "
          + (f"{big['rss_before']:.0f} MiB before the big request, " if big else "")
          + f"{rss_mb():.0f} MiB at the end, peak {peak:.0f} MiB (clients and server in one process)")
    if server is not None:
        server.should_exit = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=None, help="concurrent streams (default 4; hostile mode 64)")
    p.add_argument("--seconds", type=float, default=None, help="run time (default 10; hostile mode 30)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--model", default="tiny", help="preset served in-process (random weights), or demo")
    p.add_argument("--url", default=None, help="benchmark a running server instead")
    p.add_argument("--served-model", default="dsv4-tiny", help="model name at --url")
    p.add_argument("--api-key", default="none")
    p.add_argument("--big-request-mb", type=float, default=0,
                   help="hostile mode: one request with a prompt of this many MB half-way through (0: off)")
    args = p.parse_args()
    hostile = args.big_request_mb > 0
    args.clients = args.clients or (64 if hostile else 4)
    args.seconds = args.seconds or (30.0 if hostile else 10.0)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
