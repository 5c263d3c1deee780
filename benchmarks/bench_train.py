"""Training benchmarks on TinyShakespeare at byte level (training.md §5): a small V4 on a 2-core CPU.

Run:  python benchmarks/bench_train.py [--parts base optim mhc precision] [--steps 300] [--seeds 0 1]

The data (`../shared/data/tinyshakespeare/input.txt`) is prepared once with `dsv4 prepare-data --tokenizer
bytes --val-fraction 0.1` (the last 10% of the text is the val split), into `--work` (kept between runs).
Every run trains the `--preset` model (default `tiny` with the byte vocabulary, ~0.57M parameters) with
`dsv4.train.Trainer` for `--steps` optimizer steps of `--batch-size` x `--seq-len` tokens, evaluating the
val loss (`--eval-batches` fixed batches) every `--eval-every` steps. Parts (each selectable):

  base       one run of the default recipe (Muon + AdamW, mHC, fp32): final val loss, wall time, train
             tokens/s (mean over steps after the first).
  optim      Muon vs AdamW-for-everything at the same lr, per seed: final val loss of each, and the steps
             Muon needs to reach AdamW's final val loss (first eval at or below it; training.md §5.1.1 measured
             ~1150 vs 2000 at 0.8M parameters).
  mhc        mHC vs unconstrained HC vs plain residual: final val loss, the composite Amax gain (forward /
             backward) at its peak over the run and at the end (training.md §2.5: mHC ~1, HC grows).
  precision  fp32 vs the fp8 and fp8+fp4 fake-quant recipes: final val loss and its gap to fp32 (V3 reports
             < 0.25% relative at scale).

The figures print as tables; `--json FILE` also writes every run's summary. The full benchmark takes a while
on 2 cores (about 0.2-0.4 s per step at the defaults, times the number of runs); `--steps 10` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsv4.cli import main as dsv4_main
from dsv4.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
PARTS = ("base", "optim", "mhc", "precision")


def prepare(work: Path) -> Path:
    data = work / "tinyshakespeare-bytes"
    if not (data / "manifest.json").is_file():
        if not SHAKESPEARE.is_file():
            raise SystemExit(f"bench_train: {SHAKESPEARE} is missing")
        rc = dsv4_main(["prepare-data", str(SHAKESPEARE), "--out", str(data), "--tokenizer", "bytes",
                        "--val-fraction", "0.1"])
        if rc:
            raise SystemExit(f"bench_train: prepare-data failed ({rc})")
    return data


def run(args: argparse.Namespace, data: Path, label: str, **changes) -> dict:
    """Train one configuration; returns its summary (and prints a line)."""
    records: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.work) as out:
        config = TrainConfig(data=str(data), out=out, preset=args.preset, model=dict(args.model), steps=args.steps,
                             batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                             warmup_steps=min(args.warmup, args.steps // 2), eval_every=args.eval_every,
                             eval_batches=args.eval_batches, log_every=1, progress=False, threads=args.threads,
                             **changes)
        t0 = time.perf_counter()
        Trainer(config, log=records.append).train()
        wall = time.perf_counter() - t0
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    speeds = [r["tokens_per_s"] for r in train[1:]] or [train[0]["tokens_per_s"]]
    summary = {
        "label": label, **changes, "steps": args.steps, "wall_s": wall, "val_loss": evals[-1]["val_loss"],
        "curve": [(r["step"], r["val_loss"]) for r in evals], "tokens_per_s": statistics.mean(speeds),
        "final_train_ce": train[-1]["ce"],
        "hc_gain_fwd_peak": max(r["hc_gain_fwd"] for r in train),
        "hc_gain_bwd_peak": max(r["hc_gain_bwd"] for r in train),
        "hc_gain_fwd_end": train[-1]["hc_gain_fwd"], "hc_gain_bwd_end": train[-1]["hc_gain_bwd"],
        "load_max_mean_end": train[-1].get("load_max_mean"),
    }
    print(f"  {label:<28} val {summary['val_loss']:.4f}  train ce {summary['final_train_ce']:.4f}  "
          f"{summary['tokens_per_s']:7.0f} tok/s  {wall:6.1f} s", flush=True)
    return summary


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def part_base(args, data) -> list[dict]:
    print("base: Muon + AdamW, mHC, fp32")
    return [run(args, data, "base")]


def part_optim(args, data) -> list[dict]:
    print(f"optim: Muon vs AdamW at lr {args.lr}, seeds {args.seeds}")
    results = []
    for seed in args.seeds:
        adamw = run(args, data, f"adamw seed {seed}", optimizer="adamw", seed=seed)
        muon = run(args, data, f"muon seed {seed}", optimizer="muon", seed=seed)
        reach = steps_to(muon["curve"], adamw["val_loss"])
        print(f"    seed {seed}: Muon - AdamW val {muon['val_loss'] - adamw['val_loss']:+.4f}; Muon reaches AdamW's "
              f"final {adamw['val_loss']:.4f} at step {reach if reach is not None else 'never'} of {args.steps}")
        results += [adamw, {**muon, "steps_to_adamw_final": reach}]
    return results


def part_mhc(args, data) -> list[dict]:
    print("mhc: composite Amax gain (forward / backward) and val loss")
    results = [run(args, data, f"hc_mode {mode}", hc_mode=mode) for mode in ("mhc", "hc", "residual")]
    for r in results:
        print(f"    {r['label']:<18} gain peak {r['hc_gain_fwd_peak']:.3f} / {r['hc_gain_bwd_peak']:.3f}, "
              f"end {r['hc_gain_fwd_end']:.3f} / {r['hc_gain_bwd_end']:.3f}")
    return results


def part_precision(args, data) -> list[dict]:
    print("precision: fake-quant recipes vs fp32")
    results = [run(args, data, f"precision {p}", precision=p) for p in ("fp32", "fp8", "fp8+fp4")]
    base = results[0]["val_loss"]
    for r in results[1:]:
        print(f"    {r['label']:<18} val gap {r['val_loss'] - base:+.4f} ({100 * (r['val_loss'] / base - 1):+.2f}%)")
    return results


def model_arg(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key, parsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model-arg", dest="model", action="append", type=model_arg, default=[],
                   metavar="KEY=VALUE", help="ModelArgs override, e.g. n_layers=2")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dsv4-bench-train")
    p.add_argument("--json", type=Path, default=None, help="write every run's summary here")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    data = prepare(args.work)
    print(f"TinyShakespeare bytes, preset {args.preset} {dict(args.model) or ''}, {args.steps} steps of "
          f"{args.batch_size}x{args.seq_len} tokens, {args.threads} threads", flush=True)
    results = []
    for part in args.parts:
        results += globals()[f"part_{part}"](args, data)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
