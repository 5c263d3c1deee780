"""How many device kernels one static decode step launches (what a CUDA graph of the step holds, and what a batch-1
decode on a GPU pays per kernel: a few microseconds each however small), by the model part that launches them.

    TRITON_INTERPRET=1 python benchmarks/decode_launches.py [--preset small] [--layers 4 | --ratios 4]
        [--backend triton] [--engine model|bf16|fp8]

Counted on any device, without a GPU: every dispatcher op that writes memory is one kernel (views, allocations,
and the interpreter's own copies inside a Triton launch are not), and every Triton launch is one. On the CPU that
is the kernel list a CUDA run of the same step would launch. The step is `Transformer.static_decode_streams` after
a prefill, in exact numerics with official formats (FP8 linears, FP4 experts), or `--numerics plain`, over a
dense cache; with `--engine FORMAT`, the step an engine's decode graph holds (`Engine(decode_graphs=True)`): the
cache seen through the batch's slots, entries in pages of the paged cache, rows stored in that KV format
(`dsv4.kv_formats`: "fp8" is the production layout).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4 import kernels
from dsv4.config import preset
from dsv4.engine import Engine
from dsv4.engine.sampling import SamplingParams
from dsv4.formats import to_official_formats
from dsv4.model import Transformer, init_weights

# ops that launch nothing: views and metadata, allocations without a fill
_NO_KERNEL = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
              "aten.lift_fresh.default", "aten.detach.default", "aten._unsafe_view.default",
              "aten.resize_.default", "aten.set_.source_Storage_storage_offset", "aten.set_.source_Storage",
              "aten.promote_types.default"}


class Launches(TorchDispatchMode):
    """Counts kernels by (model part, op); `part` is the innermost module name, layer indices dropped."""

    def __init__(self, parts: list[str]) -> None:
        super().__init__()
        self.parts = parts
        self.counts: collections.Counter = collections.Counter()
        self.in_triton = 0

    def count(self, op: str) -> None:
        self.counts[(self.parts[-1] if self.parts else "model", op)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not self.in_triton and not func.is_view and name not in _NO_KERNEL:
            self.count(name.removeprefix("aten."))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def triton_launches(counter: Launches) -> Iterator[None]:
    """Count each Triton launch once, as the kernel's name (under the interpreter its copies are not kernels)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield
        return
    patched = []
    for cls in (InterpretedFunction, JITFunction):
        original = cls.run

        def run(self, *args, __original=original, **kwargs):
            counter.count("triton:" + getattr(self, "__name__", "kernel"))
            counter.in_triton += 1
            try:
                return __original(self, *args, **kwargs)
            finally:
                counter.in_triton -= 1

        cls.run = run
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            cls.run = original


def part_names(model: torch.nn.Module, parts: list[str]) -> list:
    """Hooks that keep `parts` as the stack of module names being run (``layers.3.attn.compressor`` ->
    ``attn.compressor``)."""
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        short = ".".join(p for p in name.split(".") if not p.isdigit() and p not in ("layers", "mtp")) or "block"
        handles.append(module.register_forward_pre_hook(lambda m, a, short=short: parts.append(short)))
        handles.append(module.register_forward_hook(lambda m, a, o: None if parts.pop() else None))
    return handles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--layers", type=int, default=4, help="the first n layers (their ratios as the preset's)")
    parser.add_argument("--ratios", type=int, nargs="+", help="the layers' compression ratios instead (0: sliding "
                        "only), one a layer: `--ratios 4` is the GPU run's one-CSA-layer model (`flash_layer`)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--numerics", choices=("exact", "plain"), default="exact")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--top", type=int, default=40, help="the most frequent (part, op) rows to print")
    parser.add_argument("--engine", metavar="KV_FORMAT", help="count an engine's graphed decode step instead, its "
                        "cache in this KV format (model, bf16, fp8)")
    opts = parser.parse_args()
    torch.set_grad_enabled(False)
    base = preset(opts.preset)
    if opts.ratios:
        layers = len(opts.ratios)
        args = base.replace(n_layers=layers, n_hash_layers=min(base.n_hash_layers, layers), max_seq_len=256,
                            compress_ratios=(*opts.ratios, *base.compress_ratios[base.n_layers:]))
    else:
        layers = min(opts.layers, base.n_layers)
        args = base.replace(n_layers=layers, compress_ratios=(*base.compress_ratios[:layers],
                                                              *base.compress_ratios[base.n_layers:]), max_seq_len=256)
    if opts.numerics == "plain":
        model = init_weights(Transformer(args, torch.float32, "plain"), seed=0).eval()
    else:
        model = to_official_formats(init_weights(Transformer(args, torch.bfloat16, "exact"), seed=0)).eval()
    tokens = torch.randint(0, args.vocab_size, (opts.batch, opts.prompt), generator=torch.Generator().manual_seed(0))
    counter = (engine_step_launches(model, tokens, opts.backend, opts.engine) if opts.engine
               else static_step_launches(model, tokens, opts.backend))
    total = sum(parts_of(counter).values())
    step = f"an engine's graphed decode step ({opts.engine} KV rows)" if opts.engine else "a static decode step"
    print(f"{opts.preset} preset, {layers} layers (ratios {list(args.compress_ratios[:layers])}), batch {opts.batch}, "
          f"{opts.numerics} numerics, {opts.backend} backend: {total} kernels {step}, {total / layers:.0f} a layer")
    print_breakdown(counter, layers, opts.top)


def counted(model: Transformer, run) -> Launches:
    """The kernels of `run()` by model part."""
    parts: list[str] = []
    handles = part_names(model, parts)
    counter = Launches(parts)
    try:
        with counter, triton_launches(counter):
            run()
    finally:
        for handle in handles:
            handle.remove()
    return counter


def static_step_launches(model: Transformer, tokens: torch.Tensor, backend: str) -> Launches:
    """A static decode step's kernels over a dense cache, after a prefill of `tokens` and one step (the first uses:
    plans, tables)."""
    cache = model.new_cache(tokens.shape[0], 256)
    step = tokens[:, -1:]
    with kernels.use_backend(backend):
        model.forward_streams(tokens, cache)
        model.static_decode_streams(step, cache, 128)
        return counted(model, lambda: model.static_decode_streams(step, cache, 128))


def engine_step_launches(model: Transformer, tokens: torch.Tensor, backend: str, kv_format: str) -> Launches:
    """The kernels of an engine's graphed decode step (replayed eagerly off CUDA: the same kernels) for the batch's
    rows of `tokens` as prompts, its third (the first ones build plans and tables)."""
    engine = Engine(model, max_batch=tokens.shape[0], max_seq_len=256, kernel_backend=backend, kv_format=kv_format,
                    decode_graphs=True)
    for prompt in tokens.tolist():
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    while engine.graphs.steps < 2 and engine.has_unfinished():
        engine.step()
    replays: list[Launches] = []

    def count(replay) -> None:
        # (outside inference mode, which hides some ops from a dispatch mode: torch 2.13 shows it no `.to()` copy)
        with torch.inference_mode(False), torch.no_grad():
            replays.append(counted(model, replay))

    for graph in engine.graphs.graphs.values():  # (each graph's replay counted, on this instance only)
        graph.replay = lambda replay=graph.replay: count(replay)
    engine.step()
    if len(replays) != 1:
        raise SystemExit(f"expected one graphed decode step, the engine ran {len(replays)}")
    return replays[0]


def parts_of(counter: Launches) -> collections.Counter:
    """The counted kernels by model part."""
    by_part: collections.Counter = collections.Counter()
    for (part, _), n in counter.counts.items():
        by_part[part] += n
    return by_part


def print_breakdown(counter: Launches, layers: int, top: int) -> None:
    """The kernels by part (and a layer's share) and the `top` most frequent (part, op)."""
    print("by part:")
    for part, n in parts_of(counter).most_common():
        print(f"  {n:5d}  {n / layers:7.1f}/layer  {part}")
    print(f"the {top} most frequent (part, op):")
    for (part, op), n in counter.counts.most_common(top):
        print(f"  {n:5d}  {part:28s} {op}")


if __name__ == "__main__":
    main()
