#!/usr/bin/env bash
# Two benchmark runs at once on a two-GPU machine, one per GPU, each in its own process
# (CUDA_VISIBLE_DEVICES), its own output folder and log; then the GPU tests on GPU 0.
#   BENCH_TIMEOUT=520 bash scripts/device/pair_suite.sh SCENARIOS_GPU0 SCENARIOS_GPU1 [benchmark args...]
# Each folder comes back as $OUT/gpuN.tgz (results.json, results.md, PNGs, logs).
# PROFILE=1: scripts/device/profile_core.py on GPU 0 after its scenarios (into gpu0/).
# THEN=SCENARIOS: afterwards one run over both GPUs (scaleout, colocated), THEN_TIMEOUT s,
# back as $OUT/gpu01.tgz. GPU_TESTS=1: the GPU tests on GPU 0 at the end.
set -uo pipefail
source "$(dirname "$0")/setup.sh"
mkdir -p "$OUT" results
first=$1 second=$2; shift 2
bench() {  # GPU SCENARIOS ARGS...
  local gpu=$1 what=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout -s INT "${BENCH_TIMEOUT:-3600}" python3 -m experiments.benchmark \
    --scenario "$what" --scale full --device cuda --out "results/gpu$gpu" --no-progress "$@" \
    > "results/gpu$gpu.log" 2>&1
  echo "GPU $gpu ($what): exit $?"
}
nvidia-smi --query-gpu=index,name,memory.total --format=csv
first_gpu() {
  bench 0 "$first" "$@"
  if [ -n "${PROFILE:-}" ]; then
    CUDA_VISIBLE_DEVICES=0 OUT=results/gpu0 timeout 200 python3 scripts/device/profile_core.py \
      > results/gpu0/profile.log 2>&1
    grep '^[{[]' results/gpu0/profile.log
  fi
}
first_gpu "$@" &
bench 1 "$second" "$@" &
wait
for gpu in 0 1; do
  mkdir -p "results/gpu$gpu" && cp "results/gpu$gpu.log" "results/gpu$gpu/"
  tar czf "$OUT/gpu$gpu.tgz" -C results "gpu$gpu"
  grep -E "^(scenario|---|[a-z]+ +[a-z])" "results/gpu$gpu.log" | tail -25
done
if [ -n "${THEN:-}" ]; then
  CUDA_VISIBLE_DEVICES=0,1 timeout -s INT "${THEN_TIMEOUT:-600}" python3 -m experiments.benchmark \
    --scenario "$THEN" --scale full --device cuda --out results/gpu01 --no-progress "$@" \
    > results/gpu01.log 2>&1
  echo "GPUs 0,1 ($THEN): exit $?"
  cp results/gpu01.log results/gpu01/ 2>/dev/null
  tar czf "$OUT/gpu01.tgz" -C results gpu01
  grep -E "^(scenario|---|[a-z]+ +[a-z])" results/gpu01.log | tail -25
fi
if [ -n "${GPU_TESTS:-}" ]; then
  CUDA_VISIBLE_DEVICES=0 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider > results/gpu0/gpu_tests.log 2>&1
  tail -3 results/gpu0/gpu_tests.log
fi
