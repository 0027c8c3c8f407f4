#!/usr/bin/env bash
# Runs AEGIS's GPU checks and benchmarks on a device machine (torch and transformers
# preinstalled, no network). Pure-Python wheels the image lacks travel in .whl/ and a
# Redis server in .device/redis/ (see scripts/device/README.md).
#   bash scripts/device/gpu_suite.sh tests|SCENARIOS [extra benchmark args...]
# Results: results/gpu/; results.json, results.md and gpu.tgz (everything there: PNGs,
# the services' logs, profiles) go to $OUT (a run brings back at most 8 files).
set -uo pipefail
source "$(dirname "$0")/setup.sh"
mkdir -p "$OUT" results/gpu
what=$1; shift
if [ "$what" = tests ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_tests.log"
  python3 -m pytest -m gpu tests/gpu -v -p no:cacheprovider 2>&1 | tee -a "$OUT/gpu_tests.log"
  exit 0
fi
# BENCH_TIMEOUT (s) stops a long run early; results.json keeps every finished scenario.
timeout -s INT "${BENCH_TIMEOUT:-3600}" python3 -m experiments.benchmark --scenario "$what" --scale full --device cuda \
  --out results/gpu --no-progress "$@"
rc=$?
cp results/gpu/*.json results/gpu/*.md "$OUT/" 2>/dev/null
tar czf "$OUT/gpu.tgz" --exclude='*.db' --exclude='system-data' -C results gpu
exit $rc
