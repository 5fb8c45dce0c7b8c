#!/usr/bin/env bash
# The GPU check of the CUDA path in ONE call of a bare, offline GPU machine (at most 330 s of work):
#
#   tools/gpu_check.sh              # every stage, each under its own `timeout`; results in $OUT
#   tools/gpu_check.sh --plan       # one line per stage, "NAME LIMIT_S", then "total LIMIT_S" (runs nothing)
#   tools/gpu_check.sh --dry-run    # "NAME LIMIT_S: COMMAND" per stage (runs nothing)
#   tools/gpu_check.sh --files      # the result files it writes under $OUT (at most 6)
#
# Side by side in $OUT/summary.md: the CUDA kernel tests; tok/s, step time and peak allocated memory of 7b and
# 7b-8gb as shipped (captured step) and eager, and 7b-8gb captured without checkpointing, each with fit's
# grad-norm hook, beside `qtrain estimate`'s peak; the bf16 no-optimizer floor and apollo-torch's Q-APOLLO-Mini
# at the same 7B shape. A stage that would not fit in what is left of $DEADLINE (default 330 s) is skipped and
# says so; a stage that fails leaves its error in the summary and the next one runs.
#
# The machine has no network: the wheels qtrain needs beyond the GPU image (bitsandbytes; apollo-torch for the
# official baseline) come from $CARRY (default .gpu_carry, git-ignored), carried with the tree. Prepare it once:
#   pip download --no-deps -d .gpu_carry bitsandbytes apollo-torch      # or copy the wheels there
# then, with the device tool: command "bash tools/gpu_check.sh", carry [".gpu_carry"], timeout_s 400.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-check-out}"
CARRY="${CARRY:-.gpu_carry}"
DEADLINE="${DEADLINE:-330}"
PY="${PYTHON:-python3}"
RESULTS=(summary.md summary.json run.log probes.jsonl pytest.log)

PROBE="$PY tools/step_probe.py"
# name | limit (s) | command
STAGES=(
  "setup|30|bash -c 'ln -sfn ../recipes qtrain/recipes; ls $CARRY/*.whl >/dev/null 2>&1 && $PY -m pip install -q --no-index --no-deps --find-links $CARRY bitsandbytes apollo-torch; $PY -c \"import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())\"'"
  "kernel-tests|70|$PY -m pytest -q -rfE -p no:cacheprovider -k cuda tests/test_triton_kernels.py tests/test_triton_matmul.py tests/test_apollo_kernels.py tests/test_float_update.py tests/test_adam8bit.py tests/test_rms_norm.py tests/test_release.py"
  "7b|35|$PROBE qtrain 7b --name 7b-captured --out $OUT/probes.jsonl"
  "7b-eager|35|$PROBE qtrain 7b --set train.cuda_graph=false --name 7b-eager --out $OUT/probes.jsonl"
  "7b-8gb|30|$PROBE qtrain 7b-8gb --name 7b-8gb-captured --out $OUT/probes.jsonl"
  "7b-8gb-eager|30|$PROBE qtrain 7b-8gb --set train.cuda_graph=false --name 7b-8gb-eager --out $OUT/probes.jsonl"
  "7b-8gb-no-ckpt|25|$PROBE qtrain 7b-8gb --set train.activation_checkpointing=false --name 7b-8gb-captured-no-ckpt --out $OUT/probes.jsonl"
  "floor|25|$PROBE floor 7b --name bf16-floor-7b --out $OUT/probes.jsonl"
  "official|35|$PROBE official 7b --name official-q-apollo-mini-7b --out $OUT/probes.jsonl"
  "summary|10|$PY tools/gpu_check_summary.py $OUT"
)

field() { local IFS='|'; read -r -a f <<< "$1"; echo "${f[$2]}"; }

case "${1:-}" in
  --plan)
    total=0
    for s in "${STAGES[@]}"; do echo "$(field "$s" 0) $(field "$s" 1)"; total=$((total + $(field "$s" 1))); done
    echo "total $total"; exit 0 ;;
  --dry-run)
    for s in "${STAGES[@]}"; do echo "$(field "$s" 0) $(field "$s" 1): $(field "$s" 2)"; done; exit 0 ;;
  --files)
    printf '%s\n' "${RESULTS[@]}"; exit 0 ;;
  "") ;;
  *) sed -n '2,6p' "$0"; exit 2 ;;
esac

mkdir -p "$OUT"
: > "$OUT/run.log"; : > "$OUT/probes.jsonl"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/qtrain-triton-cache QTRAIN_CACHE=/tmp/qtrain-cache
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
for s in "${STAGES[@]}"; do
  name="$(field "$s" 0)"; limit="$(field "$s" 1)"; cmd="$(field "$s" 2)"
  left=$((DEADLINE - (SECONDS - START)))
  if [[ "$name" != summary ]] && (( left < limit )); then  # the summary always runs (it is what comes back)
    echo "== $name: SKIPPED (${left}s left of ${DEADLINE}s, needs up to ${limit}s)" | tee -a "$OUT/run.log"
    echo "{\"stage\": \"$name\", \"skipped\": \"${left}s left, needs ${limit}s\"}" >> "$OUT/probes.jsonl"
    continue
  fi
  echo "== $name (limit ${limit}s, ${left}s left): $cmd" | tee -a "$OUT/run.log"
  t0=$SECONDS
  if [[ "$name" == kernel-tests ]]; then
    timeout -k 5 "$limit" bash -c "$cmd" > "$OUT/pytest.log" 2>&1; rc=$?
    tail -n 15 "$OUT/pytest.log" >> "$OUT/run.log"
  else
    timeout -k 5 "$limit" bash -c "$cmd" >> "$OUT/run.log" 2>&1; rc=$?
  fi
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/run.log"
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$OUT/probes.jsonl"
done
echo "total $((SECONDS - START))s" | tee -a "$OUT/run.log"
