"""How many device kernels one static decode step launches (what a CUDA graph of the step holds, and what a batch-1
decode on a GPU pays per kernel: a few microseconds each however small), by the model part that launches them.

    TRITON_INTERPRET=1 python benchmarks/decode_launches.py [--preset small] [--layers 4 | --ratios 4]
        [--backend triton]

Counted on any device, without a GPU: every dispatcher op that writes memory is one kernel (views, allocations,
and the interpreter's own copies inside a Triton launch are not), and every Triton launch is one. On the CPU that
is the kernel list a CUDA run of the same step would launch. The step is `Transformer.static_decode_streams` after
a prefill, in exact numerics with official formats (FP8 linears, FP4 experts), or `--numerics plain`.
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
    cache = model.new_cache(opts.batch, 256)
    tokens = torch.randint(0, args.vocab_size, (opts.batch, opts.prompt), generator=torch.Generator().manual_seed(0))
    with kernels.use_backend(opts.backend):
        model.forward_streams(tokens, cache)
        step = tokens[:, -1:]
        model.static_decode_streams(step, cache, 128)  # (first uses: plans, tables)
        parts: list[str] = []
        handles = part_names(model, parts)
        counter = Launches(parts)
        with counter, triton_launches(counter):
            model.static_decode_streams(step, cache, 128)
        for handle in handles:
            handle.remove()
    total = sum(parts_of(counter).values())
    print(f"{opts.preset} preset, {layers} layers (ratios {list(args.compress_ratios[:layers])}), batch {opts.batch}, "
          f"{opts.numerics} numerics, {opts.backend} backend: {total} kernels a static decode step, "
          f"{total / layers:.0f} a layer")
    print_breakdown(counter, layers, opts.top)


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
