#!/usr/bin/env bash
# Capture overhead as users meet it, offload, compiled sweeps: one command, results (JSON + markdown)
# under --out, about 8 minutes on one H200 (budget 480 s).
#
#   PYTHONPATH=. benchmarks/run_overhead_benchmarks.sh --out "$OUT"                 # CUDA machine
#   PYTHON=.venv/bin/python benchmarks/run_overhead_benchmarks.sh --smoke --out /tmp/bench
#   ... --only bench_sweep_compiled        # a subset (script names, comma separated)
#
# Order is by priority: bench_capture_api (public API and command line), bench_offload (flux-dev
# 1024² none / group, the command line's offloaded capture), bench_sweep_compiled. Each script gets
# min(its cap, what is left of --budget seconds) and writes its partial results as it goes. Into
# <out> go SUMMARY.md (every table and the runner's log), runner.log and overhead_benchmarks.tar.gz
# (every script's JSON, markdown and log).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
SMOKE=""
BUDGET=480
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --smoke) SMOKE="--smoke"; shift ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --only) ONLY=",$2,"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python}"
export PYTHONPATH="${PYTHONPATH:-.}"
mkdir -p "$OUT"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/flux_ir_overhead.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
RES="$SCRATCH/results"
mkdir -p "$RES"
START=$(date +%s)
: > "$RES/runner.log"

run() {
  local name=$1 cap=$2
  shift 2
  local now left t rc
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then
    return
  fi
  [ -n "$SMOKE" ] && cap=$((cap * 8))  # a shared CPU runs the smoke versions slowly
  now=$(date +%s)
  left=$((BUDGET - (now - START)))
  t=$((cap < left ? cap : left))
  if [ "$t" -lt 30 ]; then
    echo "$name: skipped (time budget spent)" | tee -a "$RES/runner.log"
    return
  fi
  timeout -k 10 "$t" "$PY" "benchmarks/$name.py" --out "$RES" $SMOKE "$@" 2>&1 \
    | tee "$RES/$name.log" | grep --line-buffered -v '^|'
  rc=${PIPESTATUS[0]}
  echo "$name: exit $rc after $(($(date +%s) - now)) s (limit $t s)" | tee -a "$RES/runner.log"
}

run bench_capture_api 190 --scratch "$SCRATCH"
run bench_offload 170 --cli --mode_timeout 110 --cli_timeout 110
run bench_sweep_compiled 240

{
  echo "# Overhead benchmarks"
  echo
  echo "Total $(($(date +%s) - START)) s. Per script:"
  echo
  sed 's/^/    /' "$RES/runner.log"
  for f in capture_api offload_modes sweep_compiled; do
    [ -f "$RES/$f.md" ] && { echo; sed 's/^# /## /' "$RES/$f.md"; }
  done
} > "$RES/SUMMARY.md"
cp "$RES/SUMMARY.md" "$RES/runner.log" "$OUT/"
for f in capture_api offload_modes sweep_compiled; do
  for ext in json md; do [ -f "$RES/$f.$ext" ] && cp "$RES/$f.$ext" "$OUT/"; done
done
tar -czf "$OUT/overhead_benchmarks.tar.gz" -C "$SCRATCH" results
echo
grep -E '^\||^##|^Pool|^\*\*|: exit|skipped' "$OUT/SUMMARY.md" || true
