#!/usr/bin/env bash
# The GPU issue's measurement as one bounded command for the lent GPU machine (see ../shared/device.md):
#
#   bash benchmarks/gpu_run.sh [SECTION ...]      # sections of benchmarks/bench_gpu.py; all by default
#
# That machine reaches no package index and lacks some of dsv4's dependencies: fetch them as wheels into .whl/
# beforehand on a connected machine (the command is in ../shared/device.md; keep .whl/ out of git with
# .git/info/exclude) and carry .whl with the run. They are installed into .site/ next to the machine's own torch
# and triton. Results: $OUT/bench_gpu.json (written as each section ends) and $OUT/bench_gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
    export PYTHONPATH="$PWD/.site:$PYTHONPATH"
fi
export OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
timeout "${BENCH_TIMEOUT:-480}" python3 benchmarks/bench_gpu.py "$@" 2>&1 | tee "$OUT/bench_gpu.log"
