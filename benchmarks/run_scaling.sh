#!/usr/bin/env bash
# Scaling over the GPUs of one host (bench_scaling.py): sweep, harvest and causal map, each timed
# on one GPU and then on all N in the same launch, one torchrun launch per part under its own time
# cap; then the summary of every part in --out (scaling.{json,md}) against the targets.
#
#   PYTHONPATH=. benchmarks/run_scaling.sh                         # every part, every GPU of the host
#   PYTHONPATH=. benchmarks/run_scaling.sh --parts sweep,harvest   # a subset (then --parts causal)
#   PYTHONPATH=. benchmarks/run_scaling.sh --nproc 4 --limit 300 --seconds 60
#   PYTHON=.venv/bin/python benchmarks/run_scaling.sh --smoke --out /tmp/scaling   # CPU, 2 gloo ranks
#
# --out: default benchmarks/results/<gpu>x<N>-<date>/ (e.g. h200x8-2026-12-10). --limit: seconds per
# part (default 540: each part fits a 10-minute command). Other arguments go to bench_scaling.py
# (--seconds: one GPU's share of work per part, default 100; --units; --scratch). NVLink multicast
# is switched off in NCCL, PyTorch and NVSHMEM.
set -u
cd "$(dirname "$0")/.."
OUT=""
NPROC=""
SMOKE=""
PARTS="sweep,harvest,causal"
LIMIT="${LIMIT:-540}"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --nproc) NPROC="$2"; shift 2 ;;
    --parts) PARTS="$2"; shift 2 ;;
    --limit) LIMIT="$2"; shift 2 ;;
    --smoke) SMOKE="--smoke"; shift ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
PY="${PYTHON:-python3}"
export PYTHONPATH="${PYTHONPATH:-.}"
export HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -n "$SMOKE" ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  NPROC="${NPROC:-2}"
  OUT="${OUT:-${TMPDIR:-/tmp}/flux-ir-scaling-smoke}"
else
  NPROC="${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}"
  if [ -z "$OUT" ]; then
    GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower() if torch.cuda.is_available() else 'cpu')")
    OUT="benchmarks/results/${GPU}x${NPROC}-$(date -u +%F)"
  fi
fi
if [ "$NPROC" -lt 2 ]; then
  echo "scaling needs at least 2 GPUs (found $NPROC)" >&2
  exit 2
fi
mkdir -p "$OUT"
LOG="$OUT/scaling.log"
launch() {  # $1: parts, $2: log stem
  local start rc
  start=$(date +%s)
  timeout -k 10 "$LIMIT" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    benchmarks/bench_scaling.py --parts "$1" --out "$OUT" $SMOKE ${EXTRA[@]+"${EXTRA[@]}"} \
    > "$OUT/$2.log" 2>&1
  rc=$?
  echo "$1 on $NPROC processes: exit $rc after $(($(date +%s) - start)) s (limit $LIMIT s)" | tee -a "$LOG"
  [ $rc -ne 0 ] && tail -n 20 "$OUT/$2.log" >&2
  return $rc
}
status=0
if [ -n "$SMOKE" ]; then  # one launch for every part: the script's check, in seconds
  launch "$PARTS" scaling_smoke || status=$?
else
  for part in ${PARTS//,/ }; do
    launch "$part" "scaling_$part" || status=$?
  done
fi
# a launch that finished wrote the summary; after one that did not, write it from what is there
[ $status -ne 0 ] && "$PY" benchmarks/bench_scaling.py --summary --out "$OUT" > /dev/null
cat "$OUT/scaling.md" 2>/dev/null
echo "results: $OUT"
exit $status
