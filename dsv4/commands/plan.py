"""`dsv4 plan`: weights, KV-cache memory and per-token FLOPs of a deployment, without allocating a model.

The arithmetic lives in `dsv4.plan` (its docstring says what is counted and what is ignored); this
module resolves MODEL (a preset name or a checkpoint directory's `config.json`), checks the input
and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..kv_formats import format_names
from ..plan import GIB
from ..text_table import table
from .common import UsageError, human_bytes, positive_int, resolve_model

COMPARE = ("v3.2", "none")
LAYOUT_NOTES = {  # what the weights bytes of each checkpoint layout stand for
    "hf": "the download, official storage formats",
    "converted": "after the official convert.py: wo_a in bf16, FP4 experts as F4",
    "plain": "every linear in bf16, no scales",
}


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    from ..checkpoint.schema import LAYOUTS

    plan = sub.add_parser("plan", help="weights, KV-cache memory and FLOPs per token of a deployment",
                          description="Deployment arithmetic (spec §4.3): weights in the official formats, "
                                      "KV cache for context x batch, FLOPs per token, comparison with V3.2.")
    plan.add_argument("model", metavar="MODEL", help="preset (tiny, small, flash, pro) or a checkpoint directory "
                                                     "with config.json (only the config is read)")
    plan.add_argument("--context", type=positive_int, default=1048576, help="tokens per sequence (default 1048576)")
    plan.add_argument("--batch", type=positive_int, default=1, help="concurrent sequences (default 1)")
    plan.add_argument("--kv-format", choices=format_names(), default="fp8",
                      help="fp8: production layout (584 B entry, 68 B FP4 index key); bf16: all-bf16 accounting")
    plan.add_argument("--layout", choices=LAYOUTS, default="hf",
                      help="checkpoint layout whose bytes are counted: hf (the download, default), converted "
                           "(wo_a in bf16, as the official convert.py writes) or plain (every linear in bf16)")
    plan.add_argument("--gpu-memory", type=_positive_float, default=None, metavar="GiB",
                      help="memory of one GPU; prints how many GPUs hold weights + KV")
    plan.add_argument("--headroom", type=_fraction, default=0.1,
                      help="fraction of each GPU kept free for activations, workspace and fragmentation (default 0.1)")
    plan.add_argument("--compare", choices=COMPARE, default="v3.2", help="reference model to compare with")
    plan.add_argument("--plot", metavar="FILE.png", default=None,
                      help="also draw KV GiB per sequence and FLOPs per token against context length (V4-Pro, "
                           "V4-Flash, V3.2 and MODEL, in --kv-format, up to --context or 1M) as a PNG (needs "
                           "matplotlib: pip install 'dsv4[plot]')")
    plan.set_defaults(run=run)


# ---------------------------------------------------------------------- formatting
def _g(flops: float) -> str:
    """FLOPs (or parameters) in G, or M/K for the research presets."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= size:
            return f"{flops / size:,.1f} {unit}"
    return f"{flops:,.0f}"


def _num(x: float) -> str:
    """Thousands separators; two decimals only where the value is fractional."""
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.2f}"


def _pct(a: float, b: float) -> str:
    value = 100 * a / b
    return f"{value:.1f}%" if value >= 0.1 else f"{value:.2g}%"


# ---------------------------------------------------------------------- sections
def _weights_lines(w) -> list[str]:
    lines = [f"Weights ({w.layout} layout: {LAYOUT_NOTES.get(w.layout, w.layout)})"]
    lines += table(["", "bytes", "size"], [
        ["checkpoint (main + MTP)", _num(w.bytes_total), human_bytes(w.bytes_total)],
        ["main model", _num(w.bytes_main), human_bytes(w.bytes_main)],
        ["MTP block", _num(w.bytes_mtp), human_bytes(w.bytes_mtp)],
    ])
    lines.append("Parameters")
    lines += table(["", "parameters", ""], [
        ["total (main + MTP)", _num(w.params_total), ""],
        ["main model", _num(w.params_main), ""],
        ["active per token", _num(round(w.params_active)), "main model, routed experts k/E, embedding included"],
    ])
    return lines


def _kv_lines(args, kv) -> list[str]:
    from ..plan import kv_entry_bytes

    main, index = kv_entry_bytes(args, kv.kv_format)
    lines = [f"KV cache, {kv.kv_format} (main entry {main} B, indexer key {index} B), {kv.main_layers} main layers"]
    rows = [[r.kind, str(r.layers), str(r.ratio or "-"), _num(r.entry_bytes), _num(r.bytes_per_token_per_layer),
             _num(r.bytes_per_token), _num(r.state_bytes), _num(r.layers * r.state_bytes)] for r in kv.rows]
    rows.append(["all layers", str(kv.main_layers), "", "", _num(kv.bytes_per_token_per_layer),
                 _num(kv.bytes_per_token), "", _num(kv.state_bytes_per_sequence)])
    lines += table(["layer type", "layers", "ratio", "entry B", "B/token/layer", "B/token", "state B/layer",
                     "state B/seq"], rows)
    lines.append("  B/token: amortised (entry / ratio) summed over the layers; 'all layers' B/token/layer = mean.")
    lines.append("  state: constant per sequence = window ring + fp32 compressor state (CSA indexer: its compressor);")
    lines.append(f"  the MTP block's state ({_num(kv.mtp_state_bytes)} B per sequence) is not in the totals.")
    lines.append(f"  per sequence at {kv.context:,} tokens: {_num(kv.growing_bytes_per_sequence)} B compressed "
                 f"+ {_num(kv.state_bytes_per_sequence)} B state = {human_bytes(kv.bytes_per_sequence)}")
    lines.append(f"  total for batch {kv.batch:,}: {_num(kv.total_bytes)} B = {human_bytes(kv.total_bytes)}")
    return lines


def _flops_lines(args, fl) -> list[str]:
    from ..config import CSA_RATIO
    from ..plan import attention_keys, weights_plan

    w = weights_plan(args, "hf")
    ratios = [args.layer_ratio(i) for i in range(args.n_layers)]
    csa = ratios.count(CSA_RATIO)
    hca_ratio = next((r for r in ratios if r not in (0, CSA_RATIO)), 128)
    layers = {"SWA-only": ratios.count(0), "CSA": csa, "HCA": len(ratios) - csa - ratios.count(0)}
    keys = {"SWA-only": attention_keys(args, 0, fl.position), "CSA": attention_keys(args, CSA_RATIO, fl.position),
            "HCA": attention_keys(args, hca_ratio, fl.position)}
    rows = [["linear", _g(fl.linear),
             f"2 x (active {_g(w.params_active)} - embedding {_g(w.params_embedding)} parameters)"]]
    for kind, value in fl.attention.items():
        rows.append([f"attention {kind}", _g(value), f"{layers[kind]} layers x {args.n_heads} heads x "
                     f"{keys[kind]:,} keys x {2 * args.head_dim:,} dims"])
    rows.append(["indexer", _g(fl.indexer), f"{csa} layers x {args.index_n_heads} heads x {args.index_head_dim} "
                 f"dims x {fl.position // CSA_RATIO:,} entries"])
    rows.append(["total", _g(fl.total), ""])
    return [f"FLOPs per token at position {fl.position:,} (2 per MAC)"] + table(["term", "FLOPs", "how"], rows)


def _compare_lines(name, kv, fl, v32) -> list[str]:
    lines = [f"DeepSeek-V3.2 ({kv.kv_format}: 61 layers x (MLA latent + indexer key) per token; 37 B active, "
             "128 heads x top-2048 keys x (576+512), indexer 64 x 128 over all keys)"]
    rows = [
        ["KV B/token", _num(kv.bytes_per_token), _num(v32.bytes_per_token), _pct(kv.bytes_per_token,
                                                                                  v32.bytes_per_token)],
        ["KV total", human_bytes(kv.total_bytes), human_bytes(v32.total_bytes), _pct(kv.total_bytes, v32.total_bytes)],
        ["FLOPs linear", _g(fl.linear), _g(v32.flops.linear), _pct(fl.linear, v32.flops.linear)],
        ["FLOPs attention", _g(fl.attention_total), _g(v32.flops.attention_total),
         _pct(fl.attention_total, v32.flops.attention_total)],
        ["FLOPs indexer", _g(fl.indexer), _g(v32.flops.indexer), _pct(fl.indexer, v32.flops.indexer)],
        ["FLOPs/token", _g(fl.total), _g(v32.flops.total), _pct(fl.total, v32.flops.total)],
    ]
    return lines + table(["", f"V4 {name}", "V3.2", "V4/V3.2"], rows)


def _gpu_lines(w, kv, gpu_gib: float, headroom: float) -> list[str]:
    from ..plan import gpus_needed

    need = w.bytes_total + kv.total_bytes
    n = gpus_needed(need, gpu_gib, headroom)
    usable = gpu_gib * GIB * (1 - headroom)
    return [f"GPUs of {gpu_gib:g} GiB with {headroom:.0%} headroom ({human_bytes(usable)} usable each): "
            f"weights {human_bytes(w.bytes_total)} + KV {human_bytes(kv.total_bytes)} = {human_bytes(need)} "
            f"-> {n} GPU{'s' * (n != 1)}",
            "  (a lower bound: weights and KV assumed to shard evenly; activations live in the headroom)"]


def run(args: argparse.Namespace) -> int:
    from ..plan import flops_per_token, kv_plan, v32_reference, weights_plan

    try:
        label, model_args = resolve_model(args.model)
    except UsageError as err:
        print(f"dsv4 plan: {err}", file=sys.stderr)
        return 2
    weights = weights_plan(model_args, args.layout)
    kv = kv_plan(model_args, args.context, args.batch, args.kv_format)
    flops = flops_per_token(model_args, args.context)
    lines = [f"dsv4 plan: {label}, context {args.context:,} tokens, batch {args.batch:,}, KV format "
             f"{args.kv_format}", ""]
    lines += _weights_lines(weights) + [""] + _kv_lines(model_args, kv) + [""] + _flops_lines(model_args, flops)
    if args.compare == "v3.2":
        v32 = v32_reference(args.context, args.batch, args.kv_format)
        lines += [""] + _compare_lines(Path(args.model).name, kv, flops, v32)
    if args.gpu_memory is not None:
        lines += [""] + _gpu_lines(weights, kv, args.gpu_memory, args.headroom)
    print("\n".join(lines))
    if args.plot is not None:
        return _plot(args, label, model_args)
    return 0


def _plot(args: argparse.Namespace, label: str, model_args) -> int:
    from ..plots import MILLION, PlotUnavailable, plan_figure, save

    path = Path(args.plot)
    if path.suffix.lower() != ".png":
        print(f"dsv4 plan: --plot {args.plot!r}: the file must end in .png", file=sys.stderr)
        return 2
    if not path.parent.is_dir():
        print(f"dsv4 plan: --plot {args.plot!r}: no directory {str(path.parent)!r}", file=sys.stderr)
        return 2
    try:
        fig = plan_figure(args.kv_format, max(args.context, MILLION), extra=(label, model_args))
        save(fig, path)
    except PlotUnavailable as err:
        print(f"dsv4 plan: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"dsv4 plan: --plot {args.plot!r}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"plot: {path}")
    return 0
