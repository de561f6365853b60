#!/usr/bin/env bash
# One device run: GPU tests, a compute-sanitizer subset, the benchmark and an ncu kernel
# breakdown, from binaries built elsewhere and carried in $DIST (default build-cuda/dist:
# gpu_cuda_backend_test, gpu_bench, lib/ with the shared libraries they need).
# Logs go to $OUT (default ./device-out). Each step has its own time limit; SKIP_NCU=1 skips
# the ncu breakdown, BENCH_ARGS passes arguments to gpu_bench.
set -u
DIST=${DIST:-build-cuda/dist}
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/$DIST/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv; head -2 /etc/os-release; ldd --version | head -1; } 2>&1 | tee "$OUT/machine.txt"
if ! "$DIST/gpu_cuda_backend_test" --gtest_list_tests > /dev/null 2>"$OUT/loader.txt"; then
  echo "binaries do not load; trying the carried libstdc++"; cat "$OUT/loader.txt"
  export LD_LIBRARY_PATH="$PWD/$DIST/fallback:$LD_LIBRARY_PATH"
fi
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - start)) s"
}
step bench 150 "$DIST/gpu_bench" ${BENCH_ARGS:-}
step tests_small 150 "$DIST/gpu_cuda_backend_test" --gtest_filter='SmallConfigs*:*Contract*'
step tests_large 120 "$DIST/gpu_cuda_backend_test" --gtest_filter='LargeConfigs*'
step sanitizer 100 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 \
  "$DIST/gpu_cuda_backend_test" --gtest_filter='SmallConfigs/CudaBackendTest.MatchesCpuReference/*'
[ -n "${SKIP_NCU:-}" ] || step ncu 60 ncu --clock-control none --metrics gpu__time_duration.sum \
  "$DIST/gpu_bench" --tokens=32768 --layers=4 --methods=snapkv,knorm --repeats=1
tail -25 "$OUT/bench.log"
grep -E "^\[  (PASSED|FAILED) |tests? ran|gpu totals|near-ties" "$OUT"/tests_*.log | head -40
grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" "$OUT/sanitizer.log" | head -10
