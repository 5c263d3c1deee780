"""The demo recipe's pre-training throughput: its corpus, tokenizer, shards, model, batch and optimizer (Muon), the
first `--steps` steps of its `pretrain` stage with `--dense` of them on dense CSA (the recipe runs 60 of 380 so).

Run:  python benchmarks/bench_recipe.py [--steps 38] [--dense 6] [--work DIR] [--shakespeare PATH]

The data is built once into --work (about a minute: `dsv4.demo.recipe.build_demo` with one-step stages), then
each run trains a fresh model and prints tokens/s over the whole `Trainer.train` call (set-up included, no
checkpoints or evaluations in between). To compare two trees, run the same command in each with the same --work.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from dsv4.demo import recipe as demo_recipe
from dsv4.train.trainer import TrainConfig, Trainer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=38)
    parser.add_argument("--dense", type=int, default=6, help="of them on dense CSA (the indexer's warm-up)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dsv4-bench-recipe")
    parser.add_argument("--shakespeare", type=Path, default=SHAKESPEARE)
    opts = parser.parse_args()
    base = demo_recipe.RECIPES["demo"]
    if not (opts.work / "data" / "pretrain" / "manifest.json").is_file():
        tiny = dataclasses.replace(base, pretrain_steps=1, dense_steps=1, sft_steps=1, qat_steps=1, warmup_steps=1,
                                   eval_every=0)
        demo_recipe.build_demo(tiny, opts.work, None, opts.shakespeare)
    recipe = dataclasses.replace(base, pretrain_steps=opts.steps, dense_steps=opts.dense,
                                 warmup_steps=min(base.warmup_steps, max(1, opts.steps // 4)))
    config = recipe.train_config("pretrain", opts.work)
    run_dir = opts.work / f"bench-{time.time_ns()}"
    config.update(progress=False, log_every=opts.steps, checkpoint_every=10**9, out=str(run_dir))
    trainer = Trainer(TrainConfig.from_dict(config))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    shutil.rmtree(run_dir, ignore_errors=True)
    tokens = opts.steps * recipe.batch_size * recipe.seq_len
    print(f"demo recipe pre-training: {opts.steps} steps ({opts.dense} dense) x {recipe.batch_size * recipe.seq_len} "
          f"tokens in {seconds:.1f} s: {tokens / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
