#!/usr/bin/env bash
# One prepared GPU check of the CUDA path, in device calls of at most 5 minutes each:
#
#   tools/gpu_check.sh part1      # CUDA kernel tests; launch/sync profile of one 7B and one 7B-8GB step
#   tools/gpu_check.sh part2      # bench_update, bench_matmul (7B shapes), bench_step (7B 1x256 as shipped),
#                                 # validate_estimator (60M, 1B, 7B at 1x256)
#   tools/gpu_check.sh part3      # bench_step of 7B-8GB 1x256 with [train] cuda_graph = true (one replay per step)
#   tools/gpu_check.sh run NAME.. # only the named checks (names: tools/gpu_check.sh list)
#   tools/gpu_check.sh summary    # rebuild summary.json / summary.md from every check's result under $OUT
#   tools/gpu_check.sh --dry-run part1|part2|run NAME..   # print the commands, run nothing (works on CPU)
#
# Results go to $OUT (default ./gpu-check-out): logs/NAME.log per check, NAME.json where the tool writes
# JSON, checks.jsonl (one line per check: name, command, exit status, seconds, skipped), and summary.json +
# summary.md over everything in $OUT. docs/performance.md and docs/estimator.md, which the benchmarks
# rewrite on CUDA, are copied into $OUT too. Each check has a time limit; a check that would not fit in
# what is left of the part's budget ($GPU_CHECK_BUDGET seconds, default 285) is skipped and says so, so a
# part never outruns its device call. Every command line below was checked against the tool's argparse.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-check-out}"
BUDGET="${GPU_CHECK_BUDGET:-285}"
PY="${PYTHON:-python}"
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi

# name | time limit (s) | command
CHECKS=(
  "kernel-tests|175|$PY -m pytest -q -rfE -p no:cacheprovider -k cuda tests/test_triton_kernels.py tests/test_triton_matmul.py tests/test_apollo_kernels.py tests/test_float_update.py tests/test_release.py tests/test_rms_norm.py"
  "profile-7b|60|$PY tools/count_launches.py 7b --profile cuda --json"
  "profile-7b-8gb|50|$PY tools/count_launches.py 7b-8gb --profile cuda --json"
  "bench-update|40|$PY tools/bench_update.py --device cuda"
  "bench-matmul|70|$PY tools/bench_matmul.py --sizes 7b --tokens 256 --write-docs"
  "bench-step|110|$PY tools/bench_step.py --device cuda --sizes 7b --points 1x256 --no-checkpointing --matmul dequantize --write-docs"
  "validate-estimator|65|$PY tools/validate_estimator.py --point 60m:1x256 --point 1b:1x256 --point 7b:1x256"
  "bench-step-graph|120|$PY tools/bench_step.py --device cuda --sizes 7b-8gb --points 1x256 --no-checkpointing --matmul dequantize --set train.cuda_graph=true"
)
PART1=(kernel-tests profile-7b profile-7b-8gb)
PART2=(bench-update bench-matmul bench-step validate-estimator)
PART3=(bench-step-graph)

field() { local IFS='|'; read -r -a f <<< "$1"; echo "${f[$2]}"; }
lookup() { for c in "${CHECKS[@]}"; do [[ "$(field "$c" 0)" == "$1" ]] && { echo "$c"; return 0; }; done; return 1; }

summary() {
  "$PY" - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "checks.jsonl").read_text().splitlines() if l.strip()] if (out / "checks.jsonl").exists() else []
latest = {}
for r in rows:
    latest[r["name"]] = r  # a rerun replaces the earlier result
result = {"checks": list(latest.values())}
for r in result["checks"]:
    log = out / "logs" / f"{r['name']}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    r["tail"] = text.splitlines()[-25:]
    js = out / f"{r['name']}.json"
    if js.exists():
        try:
            r["result"] = json.loads(js.read_text())
        except ValueError:
            pass
    m = re.findall(r"(\d+) (passed|failed|skipped|error|errors)", text)
    if r["name"] == "kernel-tests" and m:
        r["pytest"] = {k: int(v) for v, k in m}
(out / "summary.json").write_text(json.dumps(result, indent=1))
md = ["# GPU check", "", "| check | status | seconds | key figures |", "|---|---|---:|---|"]
for r in result["checks"]:
    status = "skipped (" + r["skipped"] + ")" if r.get("skipped") else ("ok" if r["rc"] == 0 else f"FAILED (exit {r['rc']})")
    key = ""
    res = r.get("result") or {}
    if "kernels" in res:
        key = (f"{res['kernels']} kernels, {res['runtime_launch_calls']} launch calls, syncs {res['syncs']}, "
               f"runtime sync calls {res['runtime_sync_calls']}, wall {res['wall_ms']} ms, host {res['host_ms']} ms, "
               f"GPU busy {res['gpu_busy_ms']} ms ({res['gpu_busy_fraction']})")
    elif "pytest" in r:
        key = ", ".join(f"{v} {k}" for k, v in r["pytest"].items())
    md.append(f"| {r['name']} | {status} | {r['seconds']} | {key} |")
for r in result["checks"]:
    md += ["", f"## {r['name']}", "", f"`{r['command']}`", "", "```", *r["tail"], "```"]
    res = r.get("result") or {}
    if res.get("top_kernels_ms"):
        md += ["", "top kernels (ms): " + "; ".join(f"{k} {v}" for k, v in res["top_kernels_ms"])]
(out / "summary.md").write_text("\n".join(md) + "\n")
print(f"wrote {out / 'summary.json'} and {out / 'summary.md'}")
EOF
}

run_checks() {
  local start=$SECONDS
  [[ $DRY == 1 ]] || mkdir -p "$OUT/logs"
  for name in "$@"; do
    local c; c="$(lookup "$name")" || { echo "unknown check '$name' (tools/gpu_check.sh list)" >&2; return 2; }
    local limit cmd; limit="$(field "$c" 1)"; cmd="$(field "$c" 2)"
    if [[ $DRY == 1 ]]; then echo "[$name, limit ${limit}s] $cmd"; continue; fi
    local used=$((SECONDS - start)) skipped="" rc=0 t0=$SECONDS
    if (( used + limit > BUDGET )); then
      skipped="budget: ${used}s used of ${BUDGET}s, needs up to ${limit}s; run tools/gpu_check.sh run $name"
      echo "== $name: SKIPPED ($skipped)"
      rc=-1
    else
      echo "== $name (limit ${limit}s): $cmd"
      if [[ "$cmd" == *" --json"* ]]; then
        timeout "$limit" bash -c "$cmd" > "$OUT/$name.json" 2> "$OUT/logs/$name.log"; rc=$?
        cat "$OUT/$name.json" >> "$OUT/logs/$name.log"
      else
        timeout "$limit" bash -c "$cmd" > "$OUT/logs/$name.log" 2>&1; rc=$?
      fi
      tail -n 5 "$OUT/logs/$name.log"
      echo "== $name: exit $rc after $((SECONDS - t0))s"
    fi
    "$PY" -c 'import json,sys; print(json.dumps({"name": sys.argv[1], "command": sys.argv[2], "rc": int(sys.argv[3]), "seconds": int(sys.argv[4]), "skipped": sys.argv[5]}))' \
      "$name" "$cmd" "$rc" "$((SECONDS - t0))" "$skipped" >> "$OUT/checks.jsonl"
  done
  [[ $DRY == 1 ]] && return 0
  cp docs/performance.md docs/estimator.md "$OUT/" 2>/dev/null
  "$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")' > "$OUT/device.txt" 2>&1
  summary
}

case "${1:-}" in
  part1) run_checks "${PART1[@]}" ;;
  part2) run_checks "${PART2[@]}" ;;
  part3) run_checks "${PART3[@]}" ;;
  run) shift; run_checks "$@" ;;
  summary) summary ;;
  list) for c in "${CHECKS[@]}"; do echo "$(field "$c" 0) (limit $(field "$c" 1)s): $(field "$c" 2)"; done ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
