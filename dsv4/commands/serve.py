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
import os
import sys

from ..runtime import EngineConfig, ModelSource, ServerConfig
from .common import non_negative_int, positive_int
from .runtime_flags import MIB, add_engine_flags, add_model_flags, engine_config, error_line, model_source

SIGNATURE_KEY_ENV = "DSV4_SIGNATURE_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI and Anthropic APIs over HTTP",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, "checkpoint directory, preset (random weights, official vocabulary), or 'demo' (the "
                       "default: the demo model shipped in the package)")
    p.add_argument("--seed", type=int, default=0, help="random weights' seed (presets) and the sampler's")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="names clients use in `model` (default: dsv4-PRESET or the checkpoint directory's name)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="accepted key (repeatable; also DSV4_API_KEY, comma-separated); none: no authentication")
    p.add_argument("--max-concurrent", type=positive_int, default=EngineConfig.max_batch,
                   help="requests generating at once (the engine's batch)")
    p.add_argument("--max-queue", type=non_negative_int, default=ServerConfig.max_queue,
                   help="requests waiting beyond those (then 429)")
    p.add_argument("--max-output-tokens", type=positive_int, default=ServerConfig.max_output_tokens,
                   help="default and cap of max_tokens")
    p.add_argument("--price-file", default=None, help="JSON price table overriding the launch prices")
    p.add_argument("--strict-reasoning", action="store_true",
                   help="400 when a thinking-mode tool-call turn comes back without its reasoning_content")
    p.add_argument("--max-body-mb", type=positive_int, default=ServerConfig.max_body_bytes // MIB,
                   help="largest request body in MiB, then 413 (default: Anthropic's limit, room for a full 1M-token "
                        "context)")
    p.add_argument("--signature-key", default=None, metavar="KEY",
                   help=f"secret of Anthropic thinking-block signatures (also ${SIGNATURE_KEY_ENV}, which keeps it "
                        "out of the process list; default: random per process, so blocks signed before a restart "
                        "are refused)")
    add_engine_flags(p)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=run)


def api_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key or [])
    env = os.environ.get("DSV4_API_KEY", "")
    keys += [k.strip() for k in env.split(",") if k.strip()]
    return keys


def configs(args: argparse.Namespace) -> tuple[ModelSource, EngineConfig, ServerConfig]:
    """The runtime configs `dsv4 serve`'s flags (and DSV4_API_KEY, DSV4_SIGNATURE_KEY) describe, for
    `dsv4.runtime.build_serve_context`."""
    source = model_source(args, seed=args.seed, served_names=tuple(args.served_model_name or ()))
    server = ServerConfig(max_output_tokens=args.max_output_tokens, strict_reasoning=args.strict_reasoning,
                          price_file=args.price_file, api_keys=tuple(api_keys(args)), max_queue=args.max_queue,
                          max_body_bytes=args.max_body_mb * MIB,
                          signature_key=args.signature_key or os.environ.get(SIGNATURE_KEY_ENV) or None)
    return source, engine_config(args, max_batch=args.max_concurrent, seed=args.seed), server


def run(args: argparse.Namespace) -> int:
    import logging
    from datetime import timedelta

    import uvicorn

    from ..parallel import close_distributed, init_distributed
    from ..runtime import build_serve_context
    from ..serve.app import create_app

    env = init_distributed(device=args.device, timeout=timedelta(days=7))  # idle ranks wait between requests
    try:
        source, engine_settings, server = configs(args)
        ctx = build_serve_context(source, engine_settings, server, env=env)
    except ValueError as err:  # OptionError, ShardingError, CheckpointError, a bad price file, the engine's checks
        print(error_line("serve", err), file=sys.stderr)
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
    if server.signature_key is None:
        print(f"dsv4 serve: thinking signatures use a random key for this process (Anthropic thinking blocks from "
              f"before a restart will be refused; set --signature-key or ${SIGNATURE_KEY_ENV} to keep them)",
              file=sys.stderr)
    try:
        uvicorn.run(create_app(ctx), host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    finally:
        if env.world_size > 1:
            engine.shutdown()
        close_distributed(env)
    return 0
