"""Every Triton kernel the backend launches builds for a Hopper GPU (sm_90), checked without one: the interpreter
tests cannot see what only the GPU compiler rejects, nor a kernel that spills its registers to memory.
See `tests/triton_hopper_build.py`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton backend's tests need the triton package (the dev extra installs it)")

KERNELS = ("_block_quant_kernel", "_fp8_gemm_kernel", "_fp8_gemm_pair_kernel", "_fp4_gemm_kernel", "_gate_up_kernel",
           "_down_kernel", "_sinkhorn_kernel", "_sparse_attn_kernel", "_index_scores_kernel", "_earliest_k_kernel",
           "_mixes_partials_kernel", "_collapse_kernel", "_post_kernel", "_rms_norm_kernel", "_rows_kernel",
           "_schedule_kernel", "_combine_kernel", "_hadamard_kernel",
           "_gated_pool_kernel", "_route_kernel", "_norm_rope_qat_kernel",
           "_ring_pool_kernel", "_hide_kernel", "_sinkhorn_collapse_kernel", "_sinkhorn_backward_kernel",
           "_post_backward_kernel", "_collapse_backward_kernel", "_mixes_backward_kernel",
           "_rms_norm_backward_kernel", "_head_ce_rows_kernel",
           "_sparse_attn_backward_kernel", "_split_combine_kernel", "_store_rows_kernel", "_load_rows_kernel",
           "_project_ring_pool_kernel")


# What a thread may spill (bytes of spill stores, ptxas's count) before a build counts as a register-budget
# regression: a few hundred bytes are ptxas's own shuffling between versions, a tile too big for the registers
# spills thousands.
SPILL_BYTES = 512
BUILD = re.compile(r"^ok +(?P<name>\w+) (?P<constexprs>\{.*\}) \[(?P<warps>\d+) warps, (?P<registers>\d+) "
                   r"registers, (?P<shared>\d+) B shared, spills (?P<stores>\d+)/(?P<loads>\d+) B, "
                   r"(?P<narrow>\d+) narrow loads\]$")
# The kernels that stream weights (a decode's bulk of bytes): their tiles are loaded as 16-byte vectors, the only
# one-element loads a few scale bytes. Weights read through a pointer table lost this once (16,384 byte loads for
# an FP8 tile of 128 x 128) until the pointers were declared aligned.
WEIGHT_STREAMING = ("_fp8_gemm_kernel", "_fp8_gemm_pair_kernel", "_fp4_gemm_kernel", "_gate_up_kernel", "_down_kernel",
                    "_project_ring_pool_kernel")
NARROW_LOADS = 32  # (an FP4 tile of 64 rows loads its per-32 scale bytes one by one: 16)


def spills_by_design(name: str, constexprs: str) -> bool:
    """The builds known to spill more than SPILL_BYTES, none on a path the GPU issue's targets run:
    - the exact-fp32 attention at D >= 256 (its dots on the FMA units keep [16, D] operands in registers; V4's
      models run it in bf16, the fp32 small preset at D = 128);
    - the attention's backward at D >= 256 (the [slots, D] row gradient and the [16, D] q, dO and dq at once;
      the training config's D is 128)."""
    d = int(re.search(r"'D': (\d+)", constexprs).group(1)) if "'D':" in constexprs else 0
    if name == "_sparse_attn_kernel":
        return d >= 256 and "'MID': triton.language.float32" in constexprs
    return name == "_sparse_attn_backward_kernel" and d >= 256


@pytest.mark.slow
def test_every_kernel_builds_for_hopper():
    """Every kernel builds for sm_90 with the specialisations a launch would give it, within Hopper's shared memory;
    none spills more than SPILL_BYTES a thread unless `spills_by_design` says why, and the weight-streaming kernels
    load their tiles as vectors."""
    script = Path(__file__).with_name("triton_hopper_build.py")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, str(script), "--resources"], capture_output=True, text=True, timeout=1200,
                          env=env, cwd=script.parents[1])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    builds = [BUILD.match(line) for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert builds and all(builds), "a build line without its resources"
    built = {m["name"] for m in builds}
    assert set(KERNELS) <= built, f"not built: {sorted(set(KERNELS) - built)}"
    spilling = [m.group(0) for m in builds
                if int(m["stores"]) > SPILL_BYTES and not spills_by_design(m["name"], m["constexprs"])]
    assert not spilling, "\n".join(spilling)
    scalar = [m.group(0) for m in builds if m["name"] in WEIGHT_STREAMING and int(m["narrow"]) > NARROW_LOADS]
    assert not scalar, "\n".join(scalar)


# The GPU machine's triton is older than CI's, and its compiler is not CI's: a kernel CI builds can fail there (the
# fp8 KV layout's attention did, on 3.6's layout pass). `.ci/run` installs the oldest triton the GPU code supports
# (the `gpu` extra's floor) with `pip install --no-deps --target` and names the folder here; the build runs with it
# ahead of the installed one on the path.
OLDEST_TRITON = os.environ.get("DSV4_OLDEST_TRITON")


@pytest.mark.slow
@pytest.mark.skipif(not OLDEST_TRITON, reason="DSV4_OLDEST_TRITON names no `pip install --no-deps --target DIR "
                                              "triton==3.6.0` (.ci/run makes one)")
def test_every_kernel_builds_with_the_oldest_supported_triton():
    script = Path(__file__).with_name("triton_hopper_build.py")
    floor = re.search(r'"triton>=([\d.]+)"', script.parents[1].joinpath("pyproject.toml").read_text().split("gpu =")[1])
    path = os.pathsep.join(p for p in (OLDEST_TRITON, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1200, env=env,
                          cwd=script.parents[1])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.startswith(f"triton {floor.group(1)}"), done.stdout[:200]
    built = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("ok ")}
    assert set(KERNELS) <= built, f"not built: {sorted(set(KERNELS) - built)}"
