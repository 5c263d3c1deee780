"""`dsv4 make-checkpoint`: a random checkpoint in the exact official format, for any preset or config.

Wraps `dsv4.checkpoint.maker.make_random_checkpoint`: every tensor of the release layout for the
config, values of a trained model's order of magnitude, quantised with the official formats, streamed
into shards with `config.json` and the index - a stand-in for a download in tests and demos.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .common import UsageError, human_bytes, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from ..config import PRESETS

    make = sub.add_parser("make-checkpoint", help="write a random checkpoint in the official format",
                          description="Random weights, official storage formats (FP8 + FP4 experts), "
                                      "config.json + index + shards like the release.")
    make.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite)")
    which = make.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=tuple(PRESETS), help="model preset")
    which.add_argument("--config", help="config.json (HF or inference dialect) or a directory holding one")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--shards", type=positive_int, default=None,
                      help="number of shards (default: at most 4 GiB each)")
    make.add_argument("--layout", choices=("hf", "converted"), default="hf",
                      help="hf: the download (wo_a FP8, FP4 experts I8); converted: wo_a bf16 and FP4 experts F4, "
                           "as after the official convert")
    make.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    make.set_defaults(run=run)


def _config_args(text: str):
    from ..checkpoint.reader import read_args, read_json
    from ..config import ModelArgs

    path = Path(text)
    if path.is_dir():
        return read_args(path)[0]
    if not path.is_file():
        raise UsageError(f"--config {text}: no such file or directory")
    return ModelArgs.from_config(read_json(path))


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.maker import make_random_checkpoint
    from ..checkpoint.reader import INDEX_FILE
    from ..checkpoint.schema import expected_tensors
    from ..config import preset

    try:
        model_args = preset(args.preset) if args.preset else _config_args(args.config)
        dst = Path(args.dst)
        if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not args.overwrite)):
            raise UsageError(f"{dst}: exists and is not an empty directory; choose another or pass --overwrite")
        specs = expected_tensors(model_args, args.layout)
        total = sum(s.nbytes for s in specs.values())
        probe = dst if dst.exists() else next(p for p in dst.absolute().parents if p.exists())
        free = shutil.disk_usage(probe).free
        if free < total:
            raise UsageError(f"{dst}: the checkpoint needs {human_bytes(total)}, only {human_bytes(free)} free")
        if dst.exists() and args.overwrite:
            for old in dst.glob("*.safetensors"):
                old.unlink()
            (dst / INDEX_FILE).unlink(missing_ok=True)
        make_random_checkpoint(dst, model_args, seed=args.seed, shards=args.shards, layout=args.layout)
    except ValueError as err:  # UsageError, ConfigError, CheckpointError
        print(f"dsv4 make-checkpoint: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"dsv4 make-checkpoint: {err}", file=sys.stderr)
        return 1
    files = len(list(dst.glob("*.safetensors")))
    print(f"wrote {dst}: {len(specs)} tensors, {human_bytes(total)} in {files} shard{'s' * (files != 1)} "
          f"({args.layout} layout, seed {args.seed})")
    return 0
