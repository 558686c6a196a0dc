#!/usr/bin/env bash
# This session's H200 calls, from the repo root on the GPU machine (a snapshot of the commit under
# test): bash experiments/2026-12-02_h200/run.sh PART [PART...]; each PART writes into $OUT/PART,
# with its wall time in $OUT/PART/wall_s.txt; everything is packed into $OUT/results.tar.gz (the
# device returns at most 8 files). Needs the wheels in .whl (peft, hydra-core, omegaconf, antlr4,
# pytest; see experiments/2026-12-01_multi_adapter_h200/README.md).
set -uo pipefail
OUT=${OUT:-results}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:$PWD/kernels:/tmp/site"
T=${T:-150}  # seconds per part unless the part sets its own
for part in "$@"; do
  D="$OUT/$part"; mkdir -p "$D"; S=$(date +%s)
  case "$part" in
    gpu_tests)
      timeout ${T_TESTS:-120} python3 -m pytest -v -rf -p no:cacheprovider ${TESTS:-tests/test_gpu.py tests/test_decode_graphs.py \
        tests/test_multi_adapter.py tests/test_compiled_mixed_batches.py} > "$D/pytest.txt" 2>&1; tail -4 "$D/pytest.txt" ;;
    mixed_static)  # issue 14: compiled mixed batch of 8 LoRA adapters; perf hints say whether CUDA graphs ran
      TORCH_LOGS=perf_hints timeout ${T_MIXED:-180} python3 -m moelora.bench.multi_adapter --modes static --no-peft \
        --repeats 3 --rounds 1 ${MIXED_ARGS:-} --out "$D" > "$D/log.txt" 2>&1
      grep -i "skipping cudagraphs" "$D/log.txt" | sort | uniq -c | head -5; tail -6 "$D/log.txt" ;;
    bdlora)  # issue 18: TP=1 cost of block-diagonal LoRA, per layer and per decoded token
      timeout ${T_BD:-150} python3 -m moelora.bench.bdlora ${BD_ARGS:---time-budget-s 90} --out "$D" > "$D/log.txt" 2>&1; tail -25 "$D/log.txt" ;;
    concurrent_smollm2)  # issue 17: N jobs over one base vs sequential (SmolLM2-135M shape, random weights)
      timeout ${T_CONC:-150} python3 -m moelora.bench.concurrent_training --model smollm2_135m_shape \
        ${CONC_ARGS:---jobs 1,4,8,16 --steps 5 --time-limit 120} --out "$D" > "$D/log.txt" 2>&1; tail -12 "$D/log.txt" ;;
    concurrent_7b)
      timeout ${T_CONC7:-200} python3 -m moelora.bench.concurrent_training --model llama2_7b_shape \
        ${CONC7_ARGS:---jobs 1,8 --steps 5 --warmup 2 --rows 8 --seq 128 --pad-multiple 64 --processes --time-limit 170} \
        --out "$D" > "$D/log.txt" 2>&1; tail -14 "$D/log.txt" ;;
    graph_breaks)  # issue 14: why the 32-layer compiled decode step fell back (call 1 of 2026-12-02 b)
      TORCH_LOGS=graph_breaks,recompiles timeout ${T_GB:-120} python3 experiments/2026-12-02_h200/graph_breaks.py \
        ${GB_LAYERS:-4} > "$D/log.txt" 2>&1; grep -E "CASE|break x" "$D/log.txt" | head -30 ;;
    serve)
      timeout ${T_SERVE:-360} python3 -m moelora.bench.serve ${SERVE_ARGS:-} --out "$D" > "$D/log.txt" 2>&1; tail -25 "$D/log.txt" ;;
    serve2)  # a second serving configuration in the same call (SERVE2_ARGS)
      timeout ${T_SERVE2:-360} python3 -m moelora.bench.serve ${SERVE2_ARGS:-} --out "$D" > "$D/log.txt" 2>&1; tail -25 "$D/log.txt" ;;
    gathered)  # issue 16: the gathered LoRA op's paths at a serving step's widths (GL_ARGS, then GL2_ARGS if set)
      timeout ${T_GL:-120} python3 kernels/benchmarks/benchmark_gathered_lora.py ${GL_ARGS:-} --out-dir "$D" > "$D/log.txt" 2>&1
      if [ -n "${GL2_ARGS:-}" ]; then timeout ${T_GL:-120} python3 kernels/benchmarks/benchmark_gathered_lora.py $GL2_ARGS \
        --out-dir "$D/second" > "$D/log2.txt" 2>&1; fi
      grep -E "triton|base-linear" "$D/log.txt" "$D/log2.txt" 2>/dev/null | head -40 ;;
    merge_bw)  # issue 19: the LoRA-Switch merge kernel's share of the copy bandwidth
      timeout ${T_MERGE:-90} python3 kernels/benchmarks/benchmark_merge.py --shape llama2-7b --check ${MERGE_ARGS:-} \
        --out "$D" > "$D/log.txt" 2>&1; tail -12 "$D/log.txt" ;;
    train_step)  # issue 19: full-model training step, tokens/s and peak memory vs PEFT LoRA
      timeout ${T_TRAIN:-240} python3 -m moelora.bench.training_step --model llama2_7b_shape \
        ${TRAIN_ARGS:---methods peft_lora,lora,mixlora,mixlora_plain --batch 4 --seq 1024 --steps 5 --warmup 2 --rounds 2} \
        --out "$D" > "$D/log.txt" 2>&1; tail -12 "$D/log.txt" ;;
    bench19)  # issue 19: generate(cache_implementation="static") with a new cache per call, and prefill
      timeout ${T_B19:-300} python3 -m moelora.bench --model llama2_7b_shape ${B19_ARGS:---methods \
        base,lora,mixlora,lora_switch_merge --modes static_new --batch-sizes 1 --prompt-len 64 --new-tokens 128 \
        --rounds 2 --repeats 3} --no-harness-check --out "$D" > "$D/log.txt" 2>&1; tail -14 "$D/log.txt" ;;
    restack)  # issue 16: a one-position change of the mixed stacks, in place vs every site rebuilt (host launches)
      timeout ${T_RESTACK:-60} python3 experiments/2026-12-02_serve_step_profile/restack_cost.py --device cuda \
        --dtype bfloat16 --out "$D/restack.json" > "$D/log.txt" 2>&1; grep -A7 ms_median "$D/log.txt"; grep -A6 aten_ops "$D/log.txt" ;;
    serve_profile)  # issue 16: one mixed packed serving step on the GPU: ops and host time per site, torch.profiler tables
      timeout ${T_SPROF:-150} python3 experiments/2026-12-02_serve_step_profile/profile_step.py --device cuda --dtype bfloat16 \
        ${SPROF_ARGS:---model llama2_7b_shape --layers 32 --num-adapters 40 --max-resident 32 --requests 16 --mixlora-requests 4} \
        --site-times --trace "$D" --out "$D/profile.json" > "$D/log.txt" 2>&1
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(k, json.dumps({x: v['decode'][x] for x in ('ops_p50','ms_p50','host_ms_p50','site_ms_p50','ops_per_linear','ops_per_ffn_own','ops_other')}), 'prefill', json.dumps({x: v['first_step'].get(x) for x in ('tokens','ms','host_ms','site_ms','ops')})) for k, v in d['systems'].items()]" "$D/profile.json"; tail -3 "$D/log.txt" ;;
    *) echo "unknown part $part"; continue ;;
  esac
  echo "$part: $(( $(date +%s) - S )) s" | tee "$D/wall_s.txt"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
tar -czf "$OUT/results.tar.gz" -C "$OUT" --exclude results.tar.gz . 2>/dev/null
