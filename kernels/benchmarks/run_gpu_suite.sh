#!/usr/bin/env bash
# GPU validation + kernel benchmarks in one go (what we run on the H100; see README "Benchmarks").
# Usage: OUT=results_dir bash kernels/benchmarks/run_gpu_suite.sh [tests|bench|all]
# Carried wheels in .whl/ (hydra-core, omegaconf, antlr4, mixlora) are installed first if present.
set -uo pipefail
OUT=${OUT:-kernels/benchmarks/results}
mkdir -p "$OUT"
what=${1:-all}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"  # carried wheels, PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log.txt"
python3 -c "import json; from moelora.bench.versions import record_versions; print(json.dumps(record_versions()))" | tee -a "$OUT/log.txt"
if [[ $what == tests || $what == all ]]; then
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -rf --tb=short --maxfail=30 -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_decode_graphs.py \
    kernels/moelora_kernels/tests > "$OUT/gpu_tests.txt" 2>&1
  tail -n 60 "$OUT/gpu_tests.txt"
fi
if [[ $what == overhead || $what == all ]]; then
  timeout 120 python3 kernels/benchmarks/launch_overhead.py 2>&1 | tee -a "$OUT/log.txt"
fi
if [[ $what == bench || $what == all ]]; then
  timeout 200 python3 kernels/benchmarks/benchmark_merge.py --shape llama2-7b --experts 8 --top-k 2 --rank 16 --check --sweep --out "$OUT/merge" 2>&1 | tail -n 30 | tee -a "$OUT/log.txt"
  timeout 200 python3 kernels/benchmarks/benchmark_gathered_lora.py --out-dir "$OUT/gathered" 2>&1 | tail -n 60 | tee -a "$OUT/log.txt"
  timeout 120 python3 kernels/benchmarks/benchmark_mixlora_block.py --out "$OUT/block" 2>&1 | tail -n 12 | tee -a "$OUT/log.txt"
fi
