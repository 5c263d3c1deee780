"""The flags of the runtime's model and engine settings, shared by `dsv4 serve` and `dsv4 chat`.

Each flag sets one field of `dsv4.runtime.ModelSource` or `EngineConfig` (defaults are the configs' own), and
`error_line` shows an `OptionError`'s fields as the flags that set them."""

from __future__ import annotations

import argparse

from .. import kernels
from ..kv_formats import format_names
from ..runtime import DEMO, DTYPES, NUMERICS, EngineConfig, ModelSource, OptionError
from .common import byte_size, non_negative_int, positive_int

MIB = 2**20

# config fields whose flag is not the field in kebab case
FLAGS = {"max_batch": "--max-concurrent", "max_seq_len": "--max-context", "kv_budget_bytes": "--kv-budget",
         "prefix_cache_bytes": "--prefix-cache-mb", "served_names": "--served-model-name", "api_keys": "--api-key",
         "max_body_bytes": "--max-body-mb"}


def add_model_flags(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", default=DEMO, metavar="PATH|PRESET", help=model_help)
    p.add_argument("--numerics", choices=("auto", *NUMERICS), default="auto",
                   help="exact: the official FP8/FP4 numerics; plain: float math (default: exact for a checkpoint "
                        "or under --kv-format fp8, plain for a preset's random weights)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="weights and activations (default: float32, bfloat16 under --kv-format fp8)")
    p.add_argument("--device", default="cpu")


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-context", type=positive_int, default=None,
                   help="prompt + output tokens per request (default: the model's max_seq_len)")
    p.add_argument("--prefill-chunk", type=positive_int, default=EngineConfig.prefill_chunk,
                   help="engine token budget per step")
    p.add_argument("--kv-format", choices=format_names(), default=EngineConfig.kv_format,
                   help="KV cache rows: the model's dtype, bf16, or fp8 (the production FP8 / FP4 byte layouts, "
                        "for a bfloat16 model in exact numerics: the auto --dtype and --numerics pick those)")
    p.add_argument("--kv-budget", type=byte_size, default=None, metavar="SIZE",
                   help="KV cache bytes, e.g. 512M, 2G, 1.5GiB (default: room for every request at --max-context)")
    p.add_argument("--page-tokens", type=positive_int, default=None, metavar="N",
                   help="tokens per KV page, a multiple of every compression ratio (default: 128 for V4)")
    p.add_argument("--prefix-cache-mb", type=non_negative_int, default=EngineConfig.prefix_cache_bytes // MIB,
                   help="prefix cache size (0: off)")
    p.add_argument("--prefix-interval", type=non_negative_int, default=EngineConfig.prefix_interval, metavar="N",
                   help="also save long prompts in the prefix cache every N tokens, so prompts sharing a system "
                        "prompt or tools resume from it (default: %(default)s; 0: only whole prompts and outputs)")
    p.add_argument("--num-speculative", type=non_negative_int, default=EngineConfig.num_speculative,
                   help="MTP draft tokens per step (0: off)")
    p.add_argument("--decode-graphs", action="store_true",
                   help="run decode steps as CUDA graphs, one per batch and context bucket, captured at first use "
                        "(CUDA with the triton kernel backend; not with --num-speculative; on a CPU nothing is "
                        "captured and the static steps cost 10-20%% more)")
    p.add_argument("--kernel-backend", choices=kernels.backend_names(), default=None,
                   help=f"the kernel backend the model runs on (default: ${kernels.ENV_VAR}, else "
                        f"{kernels.DEFAULT_BACKEND})")


def model_source(args: argparse.Namespace, seed: int = 0, served_names: tuple[str, ...] = ()) -> ModelSource:
    return ModelSource(model=args.model, numerics=args.numerics, dtype=args.dtype, device=args.device, seed=seed,
                       served_names=served_names)


def engine_config(args: argparse.Namespace, max_batch: int, seed: int = 0) -> EngineConfig:
    return EngineConfig(max_batch=max_batch, max_seq_len=args.max_context, prefill_chunk=args.prefill_chunk,
                        kv_format=args.kv_format, kv_budget_bytes=args.kv_budget, page_tokens=args.page_tokens,
                        prefix_cache_bytes=args.prefix_cache_mb * MIB, prefix_interval=args.prefix_interval or None,
                        num_speculative=args.num_speculative, seed=seed, kernel_backend=args.kernel_backend,
                        decode_graphs=args.decode_graphs)


def error_line(command: str, err: Exception) -> str:
    """`dsv4 COMMAND: ...` for an error building the runtime; an `OptionError` names its fields as flags."""
    if not isinstance(err, OptionError):
        return f"dsv4 {command}: {err}"
    names = " and ".join(FLAGS.get(o, "--" + o.replace("_", "-")) for o in err.options)
    return f"dsv4 {command}: {names}: {err.message}"
