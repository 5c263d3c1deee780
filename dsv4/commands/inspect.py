"""`dsv4 inspect PATH|PRESET`: tensors, dtypes, bytes and parameters per component, allocating no weights.

A checkpoint is described from its safetensors headers and config (nothing is read from the
tensor data), a preset from the schema of the release; a per-rank directory rank by rank.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..text_table import table
from .common import UsageError, human_bytes, resolve_model


def register(sub: argparse._SubParsersAction) -> None:
    from ..checkpoint.schema import LAYOUTS

    cmd = sub.add_parser("inspect", help="tensor count, dtypes, bytes and parameters of a checkpoint or preset",
                         description="Summarise a checkpoint directory (headers and config only) or a preset.")
    cmd.add_argument("model", metavar="PATH|PRESET", help="checkpoint directory or file, or a preset name")
    cmd.add_argument("--layout", choices=LAYOUTS, default="hf", help="layout described for a preset (default hf)")
    cmd.add_argument("--validate", action="store_true", help="also check the checkpoint against its config")
    cmd.set_defaults(run=run)


def _schedule(a) -> str:
    ratios = a.compress_ratios[: a.n_layers]
    csa = sum(r == 4 for r in ratios)
    swa = sum(r == 0 for r in ratios)
    hca = len(ratios) - csa - swa
    return (f"dim {a.dim}, {a.n_layers} layers ({swa} sliding-only, {csa} CSA, {hca} HCA) + {a.n_mtp_layers} MTP, "
            f"{a.n_heads} heads, {a.n_routed_experts} experts ({a.n_activated_experts} active), vocab {a.vocab_size}, "
            f"weights {a.dtype}, experts {a.routed_expert_dtype}")


def _component_rows(summary) -> list[list[str]]:
    rows = []
    for part, label in (("main", ""), ("mtp", "mtp ")):
        tallies = getattr(summary, part)
        for name, t in sorted(tallies.items(), key=lambda kv: -kv[1].parameters):
            rows.append([label + name, f"{t.tensors:,}", human_bytes(t.bytes), f"{t.parameters:,}",
                         f"{round(t.active):,}"])
        if tallies:
            t = summary.total(part)
            rows.append([f"= {'MTP block' if part == 'mtp' else 'main model'}", f"{t.tensors:,}",
                         human_bytes(t.bytes), f"{t.parameters:,}", f"{round(t.active):,}"])
    total_params = summary.total("main").parameters + summary.total("mtp").parameters
    rows.append(["= total", f"{summary.tensors:,}", human_bytes(summary.bytes), f"{total_params:,}", ""])
    return rows


def _print_summary(title: str, summary) -> None:
    print(title)
    print(f"  {_schedule(summary.args)}")
    print(f"  {summary.tensors:,} tensors, {summary.bytes:,} bytes ({human_bytes(summary.bytes)})")
    print("  dtypes: " + ", ".join(f"{d} {n:,} ({human_bytes(summary.dtype_bytes[d])})"
                                   for d, n in summary.dtypes.most_common()))
    print("\n".join(table(["component", "tensors", "bytes", "parameters", "active/token"],
                          _component_rows(summary))))


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.inspect import summarize_checkpoint, summarize_config
    from ..checkpoint.reader import MP_FILE, Checkpoint, CheckpointError
    from ..checkpoint.validate import validate
    from ..config import PRESETS

    try:
        if args.model in PRESETS:
            _, model_args = resolve_model(args.model)
            _print_summary(f"preset {args.model} ({args.layout} layout, from the schema)",
                           summarize_config(model_args, args.layout))
            return 0
        path = Path(args.model)
        if not path.exists():
            resolve_model(args.model)  # raises the right UsageError (unknown preset / missing path)
        ranks = sorted({int(m.group(2)) for p in path.glob("*.safetensors") if (m := MP_FILE.match(p.name))}) \
            if path.is_dir() else []
        world = ranks[0] if ranks else None
        for rank in range(world) if world else [None]:
            with Checkpoint(path, rank=rank) as ckpt:
                layout = validate(ckpt) if args.validate else None
                summary = summarize_checkpoint(ckpt)
                where = f"rank {rank} of {world}: {ckpt.files[0].name}" if world else f"{len(ckpt.files)} file(s)"
                checked = ", validated" if layout else ""
                _print_summary(f"checkpoint {path} ({summary.layout} layout, {where}, "
                               f"{ckpt.nbytes:,} bytes on disk{checked})", summary)
    except (UsageError, CheckpointError) as err:
        print(f"dsv4 inspect: {err}", file=sys.stderr)
        return 2
    return 0
