#!/usr/bin/env bash
# Run every capture benchmark within a wall-clock budget; results (JSON + markdown) under --out.
#
#   PYTHONPATH=. benchmarks/run_capture_benchmarks.sh --out "$OUT"      # CUDA machine
#   PYTHON=.venv/bin/python benchmarks/run_capture_benchmarks.sh --smoke --out /tmp/bench
#   ... --only bench_compile,bench_offload     # a subset (script names, comma separated)
#
# Order is by priority; each script gets min(its own cap, what is left of --budget seconds) and writes
# its partial results as it goes. Into <out> go three files: SUMMARY.md (all tables and the runner's
# log), runner.log, and capture_benchmarks.tar.gz (every script's JSON, markdown and log).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
SMOKE=""
BUDGET=470
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
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/flux_ir_bench.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
RES="$SCRATCH/results"
mkdir -p "$RES" "$SCRATCH/shards"
START=$(date +%s)
: > "$RES/runner.log"

run() {
  local name=$1 cap=$2
  shift 2
  local now left t rc
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then
    return
  fi
  now=$(date +%s)
  left=$((BUDGET - (now - START)))
  t=$((cap < left ? cap : left))
  if [ "$t" -lt 20 ]; then
    echo "$name: skipped (time budget spent)" | tee -a "$RES/runner.log"
    return
  fi
  timeout -k 10 "$t" "$PY" "benchmarks/$name.py" --out "$RES" $SMOKE "$@" > "$RES/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $(($(date +%s) - now)) s (limit $t s)" | tee -a "$RES/runner.log"
}

run bench_capture 150
run bench_hook_path 60
run bench_stream 150 --scratch "$SCRATCH/shards"
run bench_lens 60
run bench_offload 180 --model flux-schnell --modes none,model,group,sequential --mode_timeout 90
run bench_compile 150

{
  echo "# Capture benchmarks"
  echo
  echo "Total $(($(date +%s) - START)) s. Per script:"
  echo
  sed 's/^/    /' "$RES/runner.log"
  for f in capture_overhead hook_path stream_store offload_modes lens_throughput compile; do
    [ -f "$RES/$f.md" ] && { echo; sed 's/^# /## /' "$RES/$f.md"; }
  done
} > "$RES/SUMMARY.md"
cp "$RES/SUMMARY.md" "$RES/runner.log" "$OUT/"
tar -czf "$OUT/capture_benchmarks.tar.gz" -C "$SCRATCH" results
cat "$OUT/SUMMARY.md"
