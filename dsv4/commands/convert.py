"""`dsv4 convert`: per-rank model-parallel files, plain bf16/fp32 exports, and back to the official formats.

The work is done by `dsv4.checkpoint.convert.convert` (its docstring describes every target); this
module parses the command line, reports what was written and turns bad input into exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from .common import human_bytes, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from ..checkpoint.convert import EXPERT_DTYPES, TARGETS

    conv = sub.add_parser(
        "convert", help="convert a checkpoint: per-rank MP files, plain bf16/fp32, back to official",
        description="mp: model{r}-mp{N}.safetensors exactly as the official convert.py (wo_a bf16, FP4 "
                    "experts as F4, experts whole on their rank). bf16/fp32: every weight dequantised "
                    "(exactly). official: re-quantise a plain export (bit-exact round trip) or merge per-rank files.")
    conv.add_argument("src", help="checkpoint directory (HF release, converted, plain or per-rank files)")
    conv.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite)")
    conv.add_argument("--to", required=True, choices=TARGETS, help="what to write")
    conv.add_argument("--world-size", type=positive_int, default=None, help="model-parallel ranks (--to mp)")
    conv.add_argument("--expert-dtype", choices=EXPERT_DTYPES, default=None,
                      help="re-encode the FP4 routed experts losslessly as FP8 (--to mp / official)")
    conv.add_argument("--shards", type=positive_int, default=None,
                      help="number of files of a single-checkpoint output (default: files of at most 4 GiB)")
    conv.add_argument("--layout", choices=("hf", "converted"), default=None,
                      help="official layout for --to official (default: the source's; hf from a plain export)")
    conv.add_argument("--overwrite", action="store_true", help="write into a non-empty DST, replacing its weights")
    conv.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.convert import convert

    progress = None
    if sys.stderr.isatty():
        def progress(done: int, total: int) -> None:
            print(f"\r  {human_bytes(done)} / {human_bytes(total)}", end="", file=sys.stderr, flush=True)
    try:
        result = convert(args.src, args.dst, args.to, world_size=args.world_size, expert_dtype=args.expert_dtype,
                         shards=args.shards, layout=args.layout, overwrite=args.overwrite, progress=progress)
    except ValueError as err:  # CheckpointError, ShardingError, ConfigError and bad option combinations
        print(f"\ndsv4 convert: {err}" if progress else f"dsv4 convert: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"dsv4 convert: {err}", file=sys.stderr)
        return 1
    if progress:
        print(file=sys.stderr)
    what = (f"{result.world_size} per-rank files" if result.target == "mp"
            else f"{len(result.files)} shard{'s' * (len(result.files) != 1)}")
    print(f"wrote {result.dst}: {result.tensors} tensors, {human_bytes(result.nbytes)} in {what} "
          f"({result.layout} layout, {result.float_dtype if result.layout == 'plain' else 'official formats'}) "
          f"in {result.seconds:.1f}s")
    return 0
