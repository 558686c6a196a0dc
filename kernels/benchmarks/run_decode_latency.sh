#!/usr/bin/env bash
# Decode-latency runs on the GPU (Llama-2-7B shape, random bf16 weights), as in experiments/*_decode_latency.
# Usage: OUT=dir [METHODS=a,b] [BATCHES=1,8] [BUDGET=s] [ROUNDS=3] [NAME=eager_b1] [EXTRA="--no-plots ..."] \
#        bash kernels/benchmarks/run_decode_latency.sh eager|static [new_tokens]
# ROUNDS>1: the method loop again, reversed every other round; bench_summary.csv holds the medians.
set -uo pipefail
OUT=${OUT:-results}; mode=${1:-eager}; n=${2:-64}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"  # carried wheels, PYTHONPATH
if [[ $mode == eager ]]; then
  python3 -m moelora.bench --model llama2_7b_shape \
    --methods ${METHODS:-base,lora,mixlora,lora_switch_merge,lora_switch_merge_forced,lora_switch_unmerged,reference_mixlora,base_recheck} \
    --batch-sizes ${BATCHES:-1,8,32} --prompt-len 64 --new-tokens "$n" --modes eager --repeats 3 --rounds ${ROUNDS:-1} \
    --case-timeout-s 120 --time-budget-s ${BUDGET:-400} ${EXTRA:-} --out "$OUT/${NAME:-eager}" 2>&1 | grep -Ev "^[0-9-]+ [0-9:,]+ moelora\.bench "
else
  python3 -m moelora.bench --model llama2_7b_shape \
    --methods ${METHODS:-base,lora,mixlora,lora_switch_unmerged} \
    --batch-sizes ${BATCHES:-1} --prompt-len 64 --new-tokens "$n" --modes static --repeats 3 --rounds ${ROUNDS:-1} \
    --case-timeout-s 200 --time-budget-s ${BUDGET:-420} ${EXTRA:-} --out "$OUT/${NAME:-static}" 2>&1 | grep -Ev "^[0-9-]+ [0-9:,]+ moelora\.bench "
fi
