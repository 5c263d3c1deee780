"""`dsv4 train`: train a DeepSeek-V4 model on `dsv4 prepare-data` shards (`dsv4.train.trainer`).

The run is a `TrainConfig`: its defaults, then a JSON file (`--config`), then flags (one per field, kebab-case;
`--model-arg KEY=VALUE` for ModelArgs overrides), later ones winning. `--resume [PATH]` continues the run in
PATH (default: `--out`) with the checkpoint's own config; only the fields that do not define the run (steps,
logging, evaluation, checkpoint cadence, paths) may be changed by flags then. `--export DIR` writes the final
model as an official checkpoint directory that `dsv4 generate --checkpoint DIR` and `dsv4 serve --model DIR`
load. Bad input is a one-line error and exit status 2.

Under `torchrun --nproc-per-node N` (WORLD_SIZE > 1) every process builds the same model and trains its share of
each global batch (N processes with --grad-accum A see the batches of one process with A x N), on the CPU over
gloo: `--fsdp` shards the parameters (FSDP2), `--expert-parallel` partitions the routed experts (over `--ep-size`
ranks, default all; N / ep-size replicas of each expert set), neither: the parameters are replicated (DDP-like).
Rank 0 prints, writes metrics.jsonl, checkpoints and the export; a parallel run resumes from its own checkpoints
(the optimizer states are sharded), under any of these layouts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path

from .common import UsageError

_HELP = {
    "data": "prepared data directory (dsv4 prepare-data); a val split enables evaluation",
    "out": "run directory: checkpoints/, metrics.jsonl, tensorboard/",
    "preset": "model size preset (tiny, nano, small, ...); the vocabulary size comes from the data",
    "hc_mode": "residual connections: mhc (V4) or the ablations hc (no Sinkhorn) and residual",
    "precision": "training precision recipe",
    "optimizer": "muon: V4's Muon + AdamW; adamw: AdamW for every parameter (baseline)",
    "decay_steps": "cosine decay over the last N steps (-1: the last 20%%)",
    "dense_steps": "first N steps with dense CSA attention (everything trains)",
    "indexer_warmup_steps": "then N steps training only the lightning indexers (dense, KL loss)",
    "bucket_tokens": "group a batch's document rows into forwards of at most N positions (0: one forward)",
    "checkpoint_every": "steps between checkpoints (0: only at the end)",
    "eval_every": "steps between evaluations on the val split (0: only at the end)",
    "device": "where the model trains: cpu, cuda or cuda:N",
    "autocast": "bf16: the forward under torch.autocast in bf16 (fp32 master weights, fp32 losses)",
    "peak_tflops": "the device's peak TFLOP/s for the metrics' mfu (0: known GPUs' dense bf16 peak, else none)",
}


def _field_type(f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(_config_class())
    return hints[f.name]


def _config_class():
    from ..train.trainer import TrainConfig

    return TrainConfig


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    if isinstance(parsed, list):
        parsed = tuple(parsed)
    return key.strip(), parsed


def register(sub: argparse._SubParsersAction) -> None:
    from ..model.mhc import HC_MODES
    from ..train.precision import RECIPES
    from ..train.trainer import AUTOCAST, OPTIMIZERS

    config_class = _config_class()
    defaults = config_class()
    p = sub.add_parser("train", help="train a model on prepared token shards (checkpoints, resume, export)",
                       description=__doc__.split("\n\n")[1].replace("%", "%%"))
    p.add_argument("--config", metavar="FILE.json", help="TrainConfig fields as a JSON object (flags override)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue from PATH (a run directory or a checkpoint; default: --out)")
    p.add_argument("--export", metavar="DIR", help="after training, write the model as an official checkpoint here")
    p.add_argument("--recipe", choices=("demo", "demo-smoke"), default=None,
                   help="build the demo model end to end in --out (corpus, tokenizer, shards, pre-training, "
                        "fine-tuning, export; dsv4.demo.recipe) instead of training one --data; --seed applies")
    p.add_argument("--shakespeare", metavar="PATH", default=None,
                   help="with --recipe: TinyShakespeare's input.txt (the free text of the demo corpus)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the parameters over the processes (FSDP2)")
    p.add_argument("--expert-parallel", action="store_true",
                   help="under torchrun: partition the routed experts over the processes")
    p.add_argument("--ep-size", type=int, default=None, metavar="P",
                   help="with --expert-parallel: experts split over P ranks, WORLD_SIZE / P replicas (default: all)")
    choices = {"hc_mode": HC_MODES, "precision": RECIPES, "optimizer": OPTIMIZERS, "autocast": AUTOCAST}
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = _HELP.get(f.name, f.name.replace("_", " "))
        if f.name == "model":
            p.add_argument("--model-arg", dest="model", action="append", type=_model_arg, default=None,
                           metavar="KEY=VALUE", help="ModelArgs override (JSON value), repeatable, e.g. n_layers=2")
            continue
        kind = _field_type(f)
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default: {default})")
        else:
            p.add_argument(flag, dest=f.name, type=kind, default=None, choices=choices.get(f.name),
                           metavar=None if f.name in choices else f.name.split("_")[-1].upper(),
                           help=f"{help_text} (default: {default})")
    p.set_defaults(run=run)


def _given(args: argparse.Namespace) -> dict[str, object]:
    values = {}
    for f in dataclasses.fields(_config_class()):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        values[f.name] = dict(value) if f.name == "model" else value
    return values


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _parallel_model(config, args: argparse.Namespace, world: int):
    """The Trainer's model (same seed on every rank), parallelized over a CPU mesh of the `world` processes."""
    from torch.distributed.device_mesh import init_device_mesh

    from ..parallel.fsdp import parallelize
    from ..train.trainer import build_model

    ep = args.ep_size or world
    if args.expert_parallel and ep != world:
        mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep"))
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",) if args.expert_parallel else ("dp",))
    try:
        return parallelize(build_model(config), mesh, fsdp=args.fsdp, expert_parallel=args.expert_parallel)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _run_recipe(args: argparse.Namespace, world: int) -> int:
    """`--recipe`: the demo build (its own stage configs; only --out, --export and --seed are taken)."""
    import dataclasses as dc

    from ..demo.recipe import RECIPES, build_demo
    from ..train.data import DataError
    from ..train.trainer import TrainError

    if world > 1:
        print("dsv4 train: --recipe runs in one process (not under torchrun)", file=sys.stderr)
        return 2
    other = sorted(k for k in _given(args) if k not in ("out", "seed"))
    if other:
        print(f"dsv4 train: --recipe sets its own training config; drop {', '.join(other)}", file=sys.stderr)
        return 2
    recipe = RECIPES[args.recipe]
    if args.seed is not None:
        recipe = dc.replace(recipe, seed=args.seed)
    shakespeare = Path(args.shakespeare or "")
    if not args.shakespeare or not shakespeare.is_file():
        print(f"dsv4 train: {shakespeare}: no such file (the TinyShakespeare input.txt; --shakespeare PATH)",
              file=sys.stderr)
        return 2
    try:
        build_demo(recipe, args.out or f"runs/{args.recipe}", args.export, shakespeare)
    except (TrainError, DataError) as err:
        print(f"dsv4 train: {err}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> int:
    from ..parallel.distributed import close_distributed, init_distributed
    from ..parallel.fsdp import dp_group
    from ..train.trainer import TrainConfig, Trainer, TrainError, checkpoint_config

    world = _world_size()
    if args.recipe is not None:
        return _run_recipe(args, world)
    if world <= 1 and (args.fsdp or args.expert_parallel or args.ep_size is not None):
        print("dsv4 train: --fsdp / --expert-parallel / --ep-size need several processes: start with "
              "torchrun --nproc-per-node N -m dsv4 train ...", file=sys.stderr)
        return 2
    if args.ep_size is not None and (not args.expert_parallel or args.ep_size < 1 or world % args.ep_size):
        print(f"dsv4 train: --ep-size {args.ep_size} needs --expert-parallel and must divide the {world} processes",
              file=sys.stderr)
        return 2
    env = init_distributed("cpu") if world > 1 else None
    main = env is None or env.is_main
    ok = False
    try:
        given = _given(args)
        if args.resume is not None:
            if args.config:
                raise UsageError("--resume continues with the checkpoint's own config; drop --config")
            path = given.get("out", TrainConfig.out) if args.resume is True else args.resume
            if env is None:
                trainer = Trainer.from_checkpoint(path, **given)
            else:
                config = checkpoint_config(path, **given)
                model = _parallel_model(config, args, world)
                trainer = Trainer(config, model=model, dp_group=dp_group(model), grad_sync="wrapper")
                trainer.resume(path)
            if main:
                print(f"dsv4 train: resumed {path} at step {trainer.step}", file=sys.stderr)
        else:
            config = TrainConfig.from_json(args.config) if args.config else TrainConfig()
            if "model" in given:
                given["model"] = {**config.model, **given["model"]}
            config = dataclasses.replace(config, **given)
            if env is None:
                trainer = Trainer(config)
            else:
                model = _parallel_model(config, args, world)
                trainer = Trainer(config, model=model, dp_group=dp_group(model), grad_sync="wrapper")
        final = trainer.train()
        c = trainer.config
        summary = f"dsv4 train: {trainer.step} steps, {trainer.tokens_seen:,} tokens; checkpoint in {c.out}"
        if env is not None:
            summary += f"; {world} processes"
        if final is not None:
            summary += f"; val loss {final['val_loss']:.4f}"
        if main:
            print(summary, file=sys.stderr)
        if args.export:
            trainer.export(args.export)
            if main:
                print(f"dsv4 train: exported to {args.export}", file=sys.stderr)
        ok = True
    except (UsageError, TrainError) as err:
        print(f"dsv4 train: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"dsv4 train: {err}", file=sys.stderr)
        return 1
    finally:
        if env is not None:
            close_distributed(env, wait_for_peers=ok)
    return 0
