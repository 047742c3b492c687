#!/usr/bin/env bash
# Multi-GPU sweep scaling on one host: one full random-weight schnell pipeline per GPU (rank r on
# cuda:LOCAL_RANK), images/s of one GPU and of all GPUs measured in the same run. Writes
# bench_sweep_scaling.{json,md} and bench_sweep_scaling.log into --out.
#
#   NCCL_NVLS_ENABLE=0 PYTHONPATH=. benchmarks/run_sweep_scaling.sh --out "$OUT"   # all GPUs
#   ... --nproc 2 --scaling_points 256        # extra arguments go to bench_sweep.py
#   PYTHON=.venv/bin/python benchmarks/run_sweep_scaling.sh --smoke --out /tmp/bench   # CPU, 2 gloo ranks
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
NPROC=""
SMOKE=""
LIMIT="${LIMIT:-540}"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --nproc) NPROC="$2"; shift 2 ;;
    --smoke) SMOKE="--smoke"; shift ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
PY="${PYTHON:-python3}"
export PYTHONPATH="${PYTHONPATH:-.}"
export HF_HUB_OFFLINE=1
if [ -z "$NPROC" ]; then
  if [ -n "$SMOKE" ]; then
    NPROC=2
  else
    NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  fi
fi
if [ "$NPROC" -lt 2 ]; then
  echo "scaling needs at least 2 GPUs (found $NPROC)" >&2
  exit 2
fi
if [ -n "$SMOKE" ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
mkdir -p "$OUT"
START=$(date +%s)
timeout -k 10 "$LIMIT" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  benchmarks/bench_sweep.py --scaling --out "$OUT" $SMOKE ${EXTRA[@]+"${EXTRA[@]}"} \
  > "$OUT/bench_sweep_scaling.log" 2>&1
rc=$?
echo "bench_sweep --scaling on $NPROC processes: exit $rc after $(($(date +%s) - START)) s (limit $LIMIT s)" \
  | tee -a "$OUT/bench_sweep_scaling.log"
stem=bench_sweep_scaling
[ -n "$SMOKE" ] && stem=bench_sweep_scaling_smoke
if [ -f "$OUT/$stem.md" ]; then cat "$OUT/$stem.md"; else tail -n 30 "$OUT/bench_sweep_scaling.log"; fi
exit $rc
