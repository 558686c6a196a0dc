#!/usr/bin/env bash
# The H200 calls of this experiment (issue 14), run from the repo root on the GPU machine:
#   bash experiments/2026-12-01_multi_adapter_h200/run.sh tests|regression|mixed_eager|mixed_static
# Needs: the repo on PYTHONPATH (no install), peft/hydra/pytest wheels in .whl (see README.md
# here), and for `regression` the pre-redesign source (git archive 1feacf1 moelora kernels conf
# pyproject.toml) unpacked in baseline_src/. Results go to $OUT (default: results/).
set -uo pipefail
OUT=${OUT:-results}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
NEW="$PWD:$PWD/kernels:/tmp/site"
OLD="$PWD/baseline_src:$PWD/baseline_src/kernels:/tmp/site"
BENCH_ARGS="--model llama2_7b_shape --methods ${METHODS:-base,lora,mixlora,lora_switch_merge,lora_switch_unmerged} --batch-sizes ${BATCHES:-1,8} --prompt-len 64 --new-tokens 32 --modes eager --repeats 3 --no-plots"
case "${1:-}" in
  tests)
    PYTHONPATH=$NEW timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_decode_graphs.py \
      tests/test_multi_adapter.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25 ;;
  regression)  # the same moelora-bench before (pre-redesign commit 1feacf1) and after, alternating
    for i in $(seq ${PAIRS:-1}); do for v in before after; do
      # python -m puts the working directory first on sys.path: run each version from its own tree
      if [ $v = before ]; then P=$OLD; M=moelora.eval.latency; D=baseline_src; else P=$NEW; M=moelora.bench; D=.; fi
      (cd $D && PYTHONPATH=$P timeout 280 python3 -m $M $BENCH_ARGS --out "$OUT/bench_$v$i") > "$OUT/bench_$v$i.log" 2>&1
      echo "== $v (exit $?)"; tail -8 "$OUT/bench_$v$i.log"
    done; done ;;
  train_regression)  # training step before (1feacf1) and after, alternating, one process each (train_regression.py)
    S=$PWD/experiments/2026-12-01_multi_adapter_h200/train_regression.py
    for i in $(seq ${PAIRS:-1}); do for v in before after; do
      if [ $v = before ]; then P=$OLD; D=baseline_src; else P=$NEW; D=.; fi
      (cd $D && PYTHONPATH=$P timeout ${T_TRAINREG:-150} python3 $S --label $v$i ${TRAINREG_ARGS:-}) > "$OUT/train_$v$i.log" 2>&1
      echo "== $v$i (exit $?)"; grep '^{' "$OUT/train_$v$i.log" || tail -5 "$OUT/train_$v$i.log"
    done; done ;;
  mixed_eager)
    PYTHONPATH=$NEW timeout ${MIXED_TIMEOUT:-300} python3 -m moelora.bench.multi_adapter --modes eager --repeats 2 --rounds 2 \
      --out "$OUT/mixed_eager" 2>&1 | grep -v Warning | tail -16 ;;
  mixed_static)
    PYTHONPATH=$NEW timeout ${MIXED_TIMEOUT:-300} python3 -m moelora.bench.multi_adapter --modes static --no-peft --repeats 3 --rounds 2 \
      --out "$OUT/mixed_static" 2>&1 | grep -v Warning | tail -16 ;;
  *) echo "usage: $0 tests|regression|train_regression|mixed_eager|mixed_static"; exit 2 ;;
esac
