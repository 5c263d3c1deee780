"""Where an engine decode step reads device values on the host (each one a wait for the device on a GPU, and
nothing a CUDA graph can hold), counted by `tests/host_reads.py` over a few decode steps in exact numerics.

    TRITON_INTERPRET=1 python benchmarks/decode_reads.py [--preset small] [--layers 6] [--batch 2] [--backend triton]

On a machine without a GPU the triton backend runs its kernels through Triton's interpreter (set
TRITON_INTERPRET=1); on CPU tensors the top-k still asks which rows a tie cuts (a read that costs nothing there).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from host_reads import count_host_reads  # noqa: E402

from dsv4.config import preset  # noqa: E402
from dsv4.engine import Engine, SamplingParams  # noqa: E402
from dsv4.formats import to_official_formats  # noqa: E402
from dsv4.model import Transformer, init_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args()
    torch.set_grad_enabled(False)
    base = preset(opts.preset)
    layers = min(opts.layers, base.n_layers)
    ratios = (*base.compress_ratios[:layers], *base.compress_ratios[base.n_layers:])  # then the MTP blocks'
    args = base.replace(n_layers=layers, compress_ratios=ratios, max_seq_len=512)
    model = to_official_formats(init_weights(Transformer(args, torch.bfloat16, "exact"), seed=0)).eval()
    engine = Engine(model.to(opts.device), max_batch=opts.batch, max_seq_len=300, kernel_backend=opts.backend)
    for row in range(opts.batch):  # prompts of different lengths: rows finish compressed entries at different steps
        engine.add_request(list(range(3 + row, 20 + 2 * row)),
                           SamplingParams(temperature=0.0, max_tokens=opts.steps + 4, ignore_eos=True))
    engine.step()  # the prompts
    engine.step()  # a first decode step
    per_step, total = [], collections.Counter()
    for _ in range(opts.steps):
        with count_host_reads() as reads:
            engine.step()
        per_step.append(sum(reads.values()))
        total.update(reads)
    print(f"{opts.preset} preset, {layers} layers, batch {opts.batch}, {opts.backend} backend on {opts.device}: "
          f"reads a decode step {per_step}")
    for site, n in sorted(total.items(), key=lambda item: -item[1]):
        print(f"  {n:4d}  {site}")


if __name__ == "__main__":
    main()
