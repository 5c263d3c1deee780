"""Serving benchmark: N concurrent streaming clients for T seconds against the OpenAI endpoint on loopback.

Starts `dsv4 serve`'s app in-process (a preset with random weights, thinking off; random weights may
write EOS early, so answers can be shorter than max_tokens) or targets `--url`. Each client loops: one streaming chat
request with `stream_options.include_usage`, read to `data: [DONE]`. Prints requests/s, completion tokens/s
(from usage), p50/p99 time to first token and inter-token latency (between chunks that carry text), and
whether every stream ended complete (a finish_reason, a usage chunk and [DONE], no error event).

    .venv/bin/python benchmarks/bench_serve.py --clients 4 --seconds 10 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time

import httpx


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


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


async def client(http: httpx.AsyncClient, url: str, model: str, deadline: float, args, stats: dict) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
            "max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "thinking": {"type": "disabled"}, "temperature": 1.0, "seed": 0}
    while time.monotonic() < deadline:
        start = time.monotonic()
        last = None
        finish = usage = done = error = False
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                stats["errors"] += 1
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
                    stats["tokens"] += chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    d = c.get("delta", {})
                    if d.get("content") or d.get("reasoning_content"):
                        now = time.monotonic()
                        if last is None:
                            stats["ttft"].append(now - start)
                        else:
                            stats["itl"].append(now - last)
                        last = now
                    finish = finish or c.get("finish_reason") is not None
        stats["requests"] += 1
        stats["complete"] += finish and usage and done and not error


async def main_async(args: argparse.Namespace) -> None:
    url, server = (args.url, None) if args.url else start_server(args)
    model = args.served_model if args.url else "bench"
    stats = {"requests": 0, "complete": 0, "tokens": 0, "errors": 0, "ttft": [], "itl": []}
    async with httpx.AsyncClient(timeout=120, headers={"authorization": f"Bearer {args.api_key}"}) as http:
        start = time.monotonic()
        deadline = start + args.seconds
        await asyncio.gather(*(client(http, url, model, deadline, args, stats) for _ in range(args.clients)))
        elapsed = time.monotonic() - start
    ms = 1000
    print(f"clients {args.clients}, {elapsed:.1f} s, model {args.model if not args.url else args.url}, "
          f"max_tokens {args.max_tokens}")
    print(f"  requests      {stats['requests']} ({stats['requests'] / elapsed:.2f}/s), "
          f"complete {stats['complete']}/{stats['requests']}, HTTP errors {stats['errors']}")
    print(f"  tokens/s      {stats['tokens'] / elapsed:.1f}")
    for label, key in (("TTFT       ", "ttft"), ("inter-token", "itl")):
        p50, p99 = percentile(stats[key], 50) * ms, percentile(stats[key], 99) * ms
        print(f"  {label}   p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    if server is not None:
        server.should_exit = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--model", default="tiny", help="preset served in-process (random weights)")
    p.add_argument("--url", default=None, help="benchmark a running server instead")
    p.add_argument("--served-model", default="dsv4-tiny", help="model name at --url")
    p.add_argument("--api-key", default="none")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
