"""Pictures where people would rather look than read: the deployment arithmetic against context length
(`dsv4 plan --plot`) and a training run's loss curves (`dsv4 train` writes ``loss.png`` next to its metrics).

matplotlib is an optional extra (``pip install 'dsv4[plot]'``); without it `PlotUnavailable` says so. The
figures are drawn with the non-interactive Agg backend (no display needed) and returned, so a caller (or a
test) can read their axes and series.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ModelArgs, preset
from .plan import flops_per_token, kv_plan, v32_reference

MILLION = 1_048_576  # the 1M-token mark
MODELS = (("V4-Pro", "pro"), ("V4-Flash", "flash"))


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("drawing a plot needs matplotlib: pip install 'dsv4[plot]' (or matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def context_points(longest: int = MILLION, points: int = 48) -> list[int]:
    """Context lengths from 1K to `longest`, evenly spaced on a log axis."""
    lo, hi = 1024, max(longest, 2048)
    step = (hi / lo) ** (1 / (points - 1))
    values = sorted({round(lo * step**i) for i in range(points)} | {hi})
    return values


def plan_figure(kv_format: str = "fp8", longest: int = MILLION, extra: tuple[str, ModelArgs] | None = None):
    """Two panels against context length (log axes): KV-cache GiB per sequence and GFLOPs per decoded token at that
    position, for V4-Pro, V4-Flash and DeepSeek-V3.2 in the same KV format (and `extra`, a (label, config) pair,
    when it is neither V4 release), with the 1M-token mark."""
    plt = _pyplot()
    contexts = context_points(longest)
    fig, (kv_ax, flops_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    models = [(label, preset(name)) for label, name in MODELS]
    if extra is not None and all(extra[1] != args for _, args in models):
        models.append(extra)
    series: list[tuple[str, list[float], list[float]]] = []
    for label, args in models:
        series.append((label, [kv_plan(args, c, 1, kv_format).bytes_per_sequence / 2**30 for c in contexts],
                       [flops_per_token(args, c).total / 1e9 for c in contexts]))
    v32 = [v32_reference(c, 1, kv_format) for c in contexts]
    series.append(("V3.2", [p.total_bytes / 2**30 for p in v32], [p.flops.total / 1e9 for p in v32]))
    for label, kv, flops in series:
        kv_ax.plot(contexts, kv, label=label, linewidth=2)
        flops_ax.plot(contexts, flops, label=label, linewidth=2)
    for ax, title, unit in ((kv_ax, f"KV cache per sequence ({kv_format})", "GiB"),
                            (flops_ax, "FLOPs per token at that position", "GFLOPs")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if longest >= MILLION:
            ax.axvline(MILLION, color="grey", linestyle="--", linewidth=1, label="1M tokens")
        ax.legend()
    fig.tight_layout()
    return fig


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (lines that are not JSON objects are skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def loss_figure(records: Sequence[dict[str, Any]], title: str = "training loss"):
    """Train CE per step (one series per attention stage: dense, indexer warm-up, sparse) and held-out CE at the
    evaluations, against the step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    train = [r for r in records if r.get("kind") == "train" and "ce" in r]
    stages: dict[str, list[tuple[int, float]]] = {}
    for r in train:
        stages.setdefault(r.get("stage", "train"), []).append((r["step"], r["ce"]))
    for stage, points in stages.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=f"train ({stage})", linewidth=1.5)
    evals = [r for r in records if r.get("kind") == "eval" and "val_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if stages or evals:
        ax.legend()
    fig.tight_layout()
    return fig


def save(fig, path: str | Path) -> Path:
    """Write the figure as a PNG and free it."""
    plt = _pyplot()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
