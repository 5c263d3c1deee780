"""How many device kernels one training step launches (forward, loss and backward), by model part: what an eager
step on a GPU pays a launch each for, and, where the host issues them more slowly than the GPU runs them, what
bounds its speed. The count is the same on any device, so it is measured without a GPU (see
`benchmarks/decode_launches.py` for what counts as a kernel).

    TRITON_INTERPRET=1 python benchmarks/train_launches.py [--preset small] [--layers 4] [--backend triton]

The step: the first n layers of the preset in fp32 (optionally under bf16 autocast), tokens [batch, seq + 1], the
cross-entropy of the next tokens, `backward()`. The backward's kernels are counted under "backward" (autograd runs
them outside the modules). Reads of the device on the host (each one a sync on a GPU) are counted too
(`tests/host_reads.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from decode_launches import Launches, part_names, parts_of, print_breakdown, triton_launches

from dsv4 import kernels
from dsv4.config import preset
from dsv4.model import Transformer, init_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from host_reads import count_host_reads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--layers", type=int, default=4, help="the first n layers (their ratios as the preset's)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--autocast", choices=("off", "bf16"), default="off")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--top", type=int, default=25, help="the most frequent (part, op) rows to print")
    opts = parser.parse_args()
    base = preset(opts.preset)
    layers = min(opts.layers, base.n_layers)
    args = base.replace(n_layers=layers, compress_ratios=(*base.compress_ratios[:layers],
                                                          *base.compress_ratios[base.n_layers:]))
    model = init_weights(Transformer(args, torch.float32), seed=0).train()
    tokens = torch.randint(0, args.vocab_size, (opts.batch, opts.seq + 1), generator=torch.Generator().manual_seed(0))
    parts: list[str] = []

    def step() -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=opts.autocast == "bf16")
        with autocast:  # (the loss as `dsv4 train` computes it: the head's summed cross-entropy)
            loss = model.head_loss(model.forward_streams(tokens[:, :-1]), tokens[:, 1:]) / tokens[:, 1:].numel()
        parts.append("backward")
        loss.backward()
        parts.pop()
        model.zero_grad(set_to_none=True)

    with kernels.use_backend(opts.backend):
        step()  # (first uses: probes, compilation)
        handles = part_names(model, parts)
        counter = Launches(parts)
        with counter, triton_launches(counter), count_host_reads() as reads:
            step()
        for handle in handles:
            handle.remove()
    by_part = parts_of(counter)
    total = sum(by_part.values())
    print(f"{opts.preset} preset, {layers} layers, dim {args.dim}, tokens {opts.batch}x{opts.seq}, autocast "
          f"{opts.autocast}, {opts.backend} backend: {total} kernels a training step "
          f"({by_part['backward']} backward), {total / layers:.0f} a layer; {sum(reads.values())} reads of the device")
    print_breakdown(counter, layers, opts.top)
    if reads:
        print("reads of the device:", dict(reads))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
