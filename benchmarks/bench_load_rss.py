"""Peak resident memory while loading a random official-format checkpoint, against its size on disk.

Writes a checkpoint of a few hundred MB (FP8 projections, FP4 routed experts, several shards), then
in a fresh process per case loads it and runs one forward, reporting the process's peak RSS minus the
RSS of an idle `import torch, dsv4` process. `exact` numerics keep FP8/FP4 packed and memory-mapped,
so their cost should stay near the bytes on disk; `plain` dequantises to bf16 for contrast.

    python benchmarks/bench_load_rss.py [--dir /tmp/dsv4-rss] [--experts 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
import dsv4.checkpoint.loader as loader
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = peak_mib()
case, path = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if case != "idle":
    model = loader.load_model(path, numerics=case, dtype=torch.bfloat16)
    t1 = time.perf_counter()
    loaded = peak_mib()
    with torch.inference_mode():
        model(torch.randint(0, model.args.vocab_size, (1, 16)))
    print(json.dumps({"base": base, "loaded": loaded, "forward": peak_mib(), "seconds": t1 - t0}))
else:
    print(json.dumps({"base": base}))
"""


def _run(case: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, case, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from dsv4.checkpoint.maker import make_random_checkpoint
    from dsv4.config import preset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--experts", type=int, default=64, help="routed experts per layer (sets the size)")
    args = parser.parse_args()
    config = preset("tiny").replace(
        vocab_size=8192, dim=1024, n_layers=8, n_hash_layers=1, n_heads=8, head_dim=128, rope_head_dim=32,
        q_lora_rank=256, o_groups=2, o_lora_rank=256, moe_inter_dim=512, n_routed_experts=args.experts,
        n_activated_experts=4, index_n_heads=4, index_head_dim=64, window_size=16,
        compress_ratios=(0, 4, 16, 4, 16, 4, 16, 0, 0), max_seq_len=256)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_random_checkpoint((args.dir or Path(tmp)) / "ckpt", config, shards=4)
        disk = sum(p.stat().st_size for p in root.glob("*.safetensors")) / 2**20
        idle = _run("idle", root)["base"]
        print(f"checkpoint: {disk:,.1f} MiB on disk in 4 shards; idle process (torch + dsv4): {idle:,.1f} MiB RSS")
        print(f"{'numerics':<8} {'load s':>7} {'peak after load':>16} {'peak after forward':>19} {'/ disk':>7}")
        for case in ("exact", "plain"):
            r = _run(case, root)
            extra_load, extra_fwd = r["loaded"] - idle, r["forward"] - idle
            print(f"{case:<8} {r['seconds']:>7.2f} {extra_load:>12,.1f} MiB {extra_fwd:>15,.1f} MiB "
                  f"{extra_fwd / disk:>6.2f}x")


if __name__ == "__main__":
    main()
