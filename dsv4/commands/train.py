"""`dsv4 train`: train a DeepSeek-V4 model on `dsv4 prepare-data` shards (`dsv4.train.trainer`).

The run is a `TrainConfig`: its defaults, then a JSON file (`--config`), then flags (one per field, kebab-case;
`--model-arg KEY=VALUE` for ModelArgs overrides), later ones winning. `--resume [PATH]` continues the run in
PATH (default: `--out`) with the checkpoint's own config; only the fields that do not define the run (steps,
logging, evaluation, checkpoint cadence, paths) may be changed by flags then. `--export DIR` writes the final
model as an official checkpoint directory that `dsv4 generate --checkpoint DIR` and `dsv4 serve --model DIR`
load. Bad input is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

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
    from ..train.trainer import OPTIMIZERS

    config_class = _config_class()
    defaults = config_class()
    p = sub.add_parser("train", help="train a model on prepared token shards (checkpoints, resume, export)",
                       description=__doc__.split("\n\n")[1].replace("%", "%%"))
    p.add_argument("--config", metavar="FILE.json", help="TrainConfig fields as a JSON object (flags override)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue from PATH (a run directory or a checkpoint; default: --out)")
    p.add_argument("--export", metavar="DIR", help="after training, write the model as an official checkpoint here")
    choices = {"hc_mode": HC_MODES, "precision": RECIPES, "optimizer": OPTIMIZERS}
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


def run(args: argparse.Namespace) -> int:
    from ..train.trainer import TrainConfig, Trainer, TrainError

    try:
        given = _given(args)
        if args.resume is not None:
            if args.config:
                raise UsageError("--resume continues with the checkpoint's own config; drop --config")
            path = given.get("out", TrainConfig.out) if args.resume is True else args.resume
            trainer = Trainer.from_checkpoint(path, **given)
            print(f"dsv4 train: resumed {path} at step {trainer.step}", file=sys.stderr)
        else:
            config = TrainConfig.from_json(args.config) if args.config else TrainConfig()
            if "model" in given:
                given["model"] = {**config.model, **given["model"]}
            config = dataclasses.replace(config, **given)
            trainer = Trainer(config)
        final = trainer.train()
        c = trainer.config
        summary = f"dsv4 train: {trainer.step} steps, {trainer.tokens_seen:,} tokens; checkpoint in {c.out}"
        if final is not None:
            summary += f"; val loss {final['val_loss']:.4f}"
        print(summary, file=sys.stderr)
        if args.export:
            trainer.export(args.export)
            print(f"dsv4 train: exported to {args.export}", file=sys.stderr)
    except (UsageError, TrainError) as err:
        print(f"dsv4 train: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"dsv4 train: {err}", file=sys.stderr)
        return 1
    return 0
