"""`dsv4 serve`: the OpenAI- and Anthropic-compatible HTTP server (FastAPI + uvicorn) over the engine.

`--model` is a checkpoint directory or a preset (random weights, vocabulary resized to the official tokenizer's so
any text encodes). The default is the demo model shipped in the package (`dsv4.demo.MODEL_DIR`, served as
"dsv4-demo"): a 3M-parameter V4 trained by `dsv4 train --recipe demo` that does arithmetic with and without
reasoning, calls the weather and calculator tools of `dsv4.demo.corpus.TOOLS`, and quotes Shakespeare.

Under `torchrun --nproc-per-node N -m dsv4 serve ...` the model is split over the ranks (tensor + expert
parallel, gloo on CPU, NCCL on GPUs): rank 0 serves HTTP and drives a `LockstepEngine`, the other ranks replay
its steps on their shards."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from ..demo import MODEL_DIR, MODEL_NAME
from .common import UsageError, positive_int

DEFAULT_MODEL = "demo"  # the shipped demo model (dsv4.demo.MODEL_DIR)


def resolve_model(name: str) -> str:
    """The preset or path `--model` names: "demo" is the demo model directory shipped in the package."""
    if name != DEFAULT_MODEL:
        return name
    if not (MODEL_DIR / "config.json").is_file():
        raise UsageError(f"the demo model is missing from the package ({MODEL_DIR}); build it with "
                         "`dsv4 train --recipe demo --export dsv4/demo/model` or give --model")
    return str(MODEL_DIR)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI and Anthropic APIs over HTTP",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH|PRESET",
                   help="checkpoint directory, preset (random weights, official vocabulary), or 'demo' (the "
                        "default: the demo model shipped in the package)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="names clients use in `model` (default: dsv4-PRESET or the checkpoint directory's name)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="accepted key (repeatable; also DSV4_API_KEY, comma-separated); none: no authentication")
    p.add_argument("--max-concurrent", type=positive_int, default=8, help="requests generating at once")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those (then 429)")
    p.add_argument("--max-context", type=positive_int, default=None,
                   help="prompt + output tokens per request (default: the model's max_seq_len)")
    p.add_argument("--max-output-tokens", type=positive_int, default=4096, help="default and cap of max_tokens")
    p.add_argument("--prefill-chunk", type=positive_int, default=256, help="engine token budget per step")
    p.add_argument("--prefix-cache-mb", type=int, default=64, help="prefix cache size (0: off)")
    p.add_argument("--num-speculative", type=int, default=0, help="MTP draft tokens per step (0: off)")
    p.add_argument("--price-file", default=None, help="JSON price table overriding the launch prices")
    p.add_argument("--strict-reasoning", action="store_true",
                   help="400 when a thinking-mode tool-call turn comes back without its reasoning_content")
    p.add_argument("--numerics", choices=("plain", "exact"), default="exact")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="random weights' seed (presets)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=run)


def recommended_sampling(model_dir: Path) -> dict[str, float] | None:
    """The sampling a model directory's generation_config.json recommends (what thinking modes use): greedy when
    it says `do_sample: false`, else its temperature and top_p; None without the file (V4's T = 1, top_p = 1)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: cannot read it ({err})") from None
    if config.get("do_sample") is False:
        return {"temperature": 0.0, "top_p": 1.0}
    return {"temperature": float(config.get("temperature", 1.0)), "top_p": float(config.get("top_p", 1.0))}


def api_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key or [])
    env = os.environ.get("DSV4_API_KEY", "")
    keys += [k.strip() for k in env.split(",") if k.strip()]
    return keys


def build_context(args: argparse.Namespace, env=None):
    """The ServeContext `dsv4 serve` runs (model, engine, tokenizer, service, limits, prices); `env` (a
    `dsv4.parallel.DistEnv` of several ranks) shards the model and makes the engine a `LockstepEngine`."""
    import torch

    from ..chat.tokenizer import Tokenizer
    from ..config import PRESETS, preset
    from ..engine import AsyncEngine, Engine
    from ..engine.lockstep import LockstepEngine
    from ..parallel import check_shardable, shard_model
    from ..serve.context import ServeConfig, ServeContext
    from ..serve.prices import PriceTable
    from ..serve.service import ChatService

    dtype = getattr(torch, args.dtype)
    parallel = env is not None and env.world_size > 1
    model_path = resolve_model(args.model)
    if args.model in PRESETS:
        from ..model import Transformer, init_weights

        tokenizer = Tokenizer.bundled()
        margs = dataclasses.replace(preset(args.model), vocab_size=tokenizer.vocab_size)
        if parallel:
            check_shardable(margs, env.world_size)
        with torch.device(args.device):
            model = init_weights(Transformer(margs), seed=args.seed).to(dtype)  # the same weights on every rank
        if parallel:
            model = shard_model(model, env.rank, env.world_size)
        default_name = f"dsv4-{args.model}"
        sampling = None
    else:
        from ..checkpoint.loader import load_model

        path = Path(model_path)
        if not path.exists():
            raise UsageError(f"--model {args.model!r}: not a preset ({', '.join(PRESETS)}) nor a directory")
        if parallel:
            model = load_model(path, numerics=args.numerics, dtype=dtype, device=args.device, rank=env.rank,
                               world_size=env.world_size, shard=lambda m: shard_model(m, env.rank, env.world_size))
        else:
            model = load_model(path, numerics=args.numerics, dtype=dtype, device=args.device)
        root = path if path.is_dir() else path.parent
        tokenizer = Tokenizer.load(root) if (root / "tokenizer.json").exists() else Tokenizer.bundled()
        default_name = MODEL_NAME if root.resolve() == MODEL_DIR else root.name
        sampling = recommended_sampling(root)
    model.eval()
    names = args.served_model_name or [default_name]
    max_context = min(args.max_context or model.args.max_seq_len, model.args.max_seq_len)
    engine = (LockstepEngine if parallel else Engine)(
        model, max_batch=args.max_concurrent, max_seq_len=max_context, prefill_chunk=args.prefill_chunk,
        eos_id=tokenizer.eos_id, seed=args.seed, prefix_cache_bytes=args.prefix_cache_mb * 2**20,
        num_speculative=args.num_speculative)
    prices = PriceTable.load(args.price_file) if args.price_file else PriceTable()
    max_output = min(args.max_output_tokens, max_context - 1)
    service = ChatService(AsyncEngine(engine), tokenizer, names, prices=prices, max_context=max_context,
                          max_output_tokens=max_output, strict_reasoning=args.strict_reasoning,
                          thinking_sampling=sampling)
    config = ServeConfig(served_model_names=names, api_keys=api_keys(args), max_concurrent=args.max_concurrent,
                         max_queue=args.max_queue, max_context=max_context, max_output_tokens=max_output,
                         prices=prices)
    return ServeContext(service, config)


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from ..serve.app import create_app

    if args.max_queue < 0:
        print("dsv4 serve: --max-queue must be >= 0", file=sys.stderr)
        return 2
    from datetime import timedelta

    from ..parallel import ShardingError, close_distributed, init_distributed

    env = init_distributed(device=args.device, timeout=timedelta(days=7))  # idle ranks wait between requests
    try:
        ctx = build_context(args, env)
    except (UsageError, ValueError, ShardingError) as err:
        print(f"dsv4 serve: {err}", file=sys.stderr)
        close_distributed(env, wait_for_peers=False)
        return 2
    engine = ctx.backend.engine.engine
    if not env.is_main:  # the other ranks replay rank 0's engine steps on their shards
        engine.follow()
        close_distributed(env)
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = ", ".join(ctx.config.served_model_names)
    auth = f"{len(ctx.config.api_keys)} API key(s)" if ctx.config.api_keys else "no authentication"
    print(f"dsv4 serve: {names} on http://{args.host}:{args.port} ({auth}, context {ctx.config.max_context})",
          file=sys.stderr)
    try:
        uvicorn.run(create_app(ctx), host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    finally:
        if env.world_size > 1:
            engine.shutdown()
        close_distributed(env)
    return 0
