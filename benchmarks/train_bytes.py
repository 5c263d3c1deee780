"""Bytes a training step's torch ops read and write per token, by model part and op: at a training step's sizes
(thousands of tokens, dim >= 2048) an op's cost is its bytes, not its launch, so this is what a GPU step pays
outside the GEMMs' arithmetic. Measured without a GPU: the count is the same on any device.

    TRITON_INTERPRET=1 python benchmarks/train_bytes.py [--dim 2048] [--layers 2] [--tokens 128 256] [--backend triton]

The step: the first n layers of the small preset at `--dim` under bf16 autocast, the loss as `dsv4 train` computes
it (`Transformer.head_loss`; on a tree without it, `cross_entropy_sum` of the logits, as its trainer did), backward.
It runs at two token counts and prints each (part, op)'s slope, bytes per token (the weights' and other fixed costs
cancel).

What counts: every dispatcher op's tensor inputs and outputs (views excluded; an `empty` allocation writes
nothing), so an op that reads part of a tensor (a gather, an index_add's destination) is counted whole: an upper
bound. Triton kernels' own traffic is not counted (the interpreter's copies are left out); `--kernel-bytes` adds
what the head loss's row kernel moves (two reads and a write of each bf16 logit), the one kernel whose traffic is
per token and large.
"""

from __future__ import annotations

import argparse
import collections
import contextlib

import torch
from decode_launches import part_names, triton_launches
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dsv4 import kernels
from dsv4.config import preset
from dsv4.model import Transformer, init_weights

_WRITES_NOTHING = ("empty.memory_format", "empty_strided.default", "new_empty.default",
                   "new_empty_strided.default", "empty_like.default")


class TensorBytes(TorchDispatchMode):
    """Bytes of every op's tensor inputs and outputs, by (part, op). `triton_launches` marks the ops inside a
    Triton launch (the interpreter's copies of the kernel's arguments), which are not counted."""

    def __init__(self, parts: list[str]) -> None:
        super().__init__()
        self.parts = parts
        self.bytes: collections.Counter = collections.Counter()
        self.in_triton = 0

    def count(self, kernel: str) -> None:
        """(`triton_launches` reports each launch: its traffic is not known here)"""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or self.in_triton:
            return out
        name = func.__name__
        counted = (args, kwargs) if name in _WRITES_NOTHING else (out, args, kwargs)
        n = sum(t.numel() * t.element_size() for t in tree_leaves(counted) if isinstance(t, torch.Tensor))
        self.bytes[(self.parts[-1] if self.parts else "model", name)] += n
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs=2, default=(128, 256))
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--kernel-bytes", action="store_true", help="add the head loss kernel's traffic")
    parser.add_argument("--top", type=int, default=20)
    opts = parser.parse_args()
    base = preset("small")
    layers = min(opts.layers, base.n_layers)
    args = base.replace(dim=opts.dim, n_layers=layers, n_hash_layers=min(base.n_hash_layers, layers),
                        compress_ratios=(*base.compress_ratios[:layers], *base.compress_ratios[base.n_layers:]))
    model = init_weights(Transformer(args, torch.float32), seed=0).train()
    parts: list[str] = []
    counts = {}
    handles = None
    for n in opts.tokens:
        tokens = torch.randint(0, args.vocab_size, (1, n + 1), generator=torch.Generator().manual_seed(n))

        def step(tokens: torch.Tensor = tokens) -> None:
            width = tokens.shape[1] - 1
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if hasattr(model, "head_loss"):
                    loss = model.head_loss(model.forward_streams(tokens[:, :-1]), tokens[:, 1:]) / width
                else:  # (a tree from before `head_loss`: the logits' cross-entropy, as its trainer computed it)
                    logits = model(tokens[:, :-1])
            if not hasattr(model, "head_loss"):
                from dsv4.train.losses import cross_entropy_sum

                loss = cross_entropy_sum(logits.float(), tokens[:, 1:])[0] / width
            parts.append("backward")
            loss.backward()
            parts.pop()
            model.zero_grad(set_to_none=True)

        with kernels.use_backend(opts.backend):
            if handles is None:
                step()  # (first uses: probes)
                handles = part_names(model, parts)
            counter = TensorBytes(parts)
            with triton_launches(counter), counter:
                step()
        if opts.kernel_bytes and hasattr(model, "head_loss") and opts.backend == "triton":
            counter.bytes[("model", "triton:_head_ce_rows_kernel")] += 3 * n * args.vocab_size * 2
        counts[n] = counter.bytes
    (n0, c0), (n1, c1) = sorted(counts.items())
    slope = {key: (c1[key] - c0[key]) / (n1 - n0) for key in set(c0) | set(c1)}
    total = sum(slope.values())
    print(f"small preset at dim {args.dim}, {layers} layers, bf16 autocast, {opts.backend} backend: "
          f"{total / 1e6:.2f} MB a token ({total / 1e6 / layers:.2f} a layer, the head's included), "
          f"between {n0} and {n1} tokens")
    by_part = collections.Counter()
    for (part, _), v in slope.items():
        by_part[part] += v
    print("by part (KB a token):")
    for part, v in by_part.most_common():
        if abs(v) >= 1e3:
            print(f"  {v / 1e3:9.1f}  {part}")
    print(f"the {opts.top} largest (part, op) (KB a token):")
    for (part, op), v in sorted(slope.items(), key=lambda kv: -kv[1])[:opts.top]:
        print(f"  {v / 1e3:9.1f}  {part:28s} {op}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
