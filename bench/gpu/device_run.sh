#!/usr/bin/env bash
# One device run: GPU tests (backend and kvcd --backend=cuda), a compute-sanitizer subset, the
# benchmark, kvcd end to end, kvpress on the same shapes (bench/peer, when its wheels were
# carried) and an ncu kernel breakdown, from binaries built elsewhere and packaged into $DIST
# by bench/gpu/package_dist.sh (default build-cuda/dist).
#
# Logs go to $LOGS and are packed into $OUT/logs.tar.gz (the device tool returns at most 8
# files); a summary is printed. Each step has its own time limit; STEPS picks steps (default
# all: tests_small tests_kvcd tests_ipc bench tests_large kvcd_end_to_end kvpress sanitizer ncu — more
# than one 10-minute device call holds, so split them over two), BENCH_ARGS passes arguments
# to gpu_bench, KVPRESS_ARGS to kvpress_bench.py.
set -u
DIST=${DIST:-build-cuda/dist}
OUT=${OUT:-device-out}
LOGS=${LOGS:-/tmp/kvc-device-logs}
rm -rf "$LOGS"; mkdir -p "$OUT" "$LOGS"
export LD_LIBRARY_PATH="$PWD/$DIST/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# NCCL from the device image's Python wheel (nvidia-nccl), not carried (package_dist.sh).
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
[ -n "$nccl_lib" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$nccl_lib"
export NCCL_NVLS_ENABLE=0  # the device's rule: never NVLink multicast
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  head -2 /etc/os-release; ldd --version | head -1; } 2>&1 | tee "$LOGS/machine.txt"
if ! "$DIST/gpu_cuda_backend_test" --gtest_list_tests > /dev/null 2>"$LOGS/loader.txt"; then
  echo "binaries do not load; trying the carried libstdc++"; cat "$LOGS/loader.txt"
  export LD_LIBRARY_PATH="$PWD/$DIST/fallback:$LD_LIBRARY_PATH"
fi
STEPS=${STEPS:-tests_small tests_kvcd tests_ipc bench tests_large kvcd_end_to_end kvpress sanitizer ncu}
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local start=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - start)) s"
}
step tests_small 150 "$DIST/gpu_cuda_backend_test" --gtest_filter='SmallConfigs*:*Contract*'
step tests_kvcd 90 "$DIST/gpu_kvcd_cuda_test"
step tests_ipc 120 env KVC_BIN_DIR="$PWD/$DIST" "$DIST/gpu_cuda_ipc_test"
step tests_nccl 240 env KVC_BIN_DIR="$PWD/$DIST" "$DIST/gpu_nccl_transport_test"
step examples 180 bash bench/gpu/examples_run.sh "$DIST"
step transport 240 env BIN="$DIST" bash bench/transport/run.sh ${TRANSPORT_ARGS:-} --json="$OUT/transport.json"
# The same over a slower link: NCCL without peer-to-peer (through host memory), standing in
# for a network between nodes; both the raw baseline and kvcd use it.
step transport_nop2p 240 env BIN="$DIST" NCCL_P2P_DISABLE=1 bash bench/transport/run.sh ${TRANSPORT_ARGS:-} --json="$OUT/transport_nop2p.json"
step bench 200 "$DIST/gpu_bench" ${BENCH_ARGS:-}
step tests_large 120 "$DIST/gpu_cuda_backend_test" --gtest_filter='LargeConfigs*'
step kvcd_end_to_end 100 bash bench/gpu/kvcd_end_to_end.sh "$DIST"
if [ -d bench/peer/wheels ]; then
  step kvpress 300 bash -c "bash bench/peer/install_wheels.sh /tmp/kvpress-site && \
    PYTHONPATH=/tmp/kvpress-site PYTHONUNBUFFERED=1 python3 bench/peer/kvpress_bench.py \
    --out $OUT/kvpress.json ${KVPRESS_ARGS:-}"
fi
step sanitizer 100 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 \
  "$DIST/gpu_cuda_backend_test" --gtest_filter='SmallConfigs/CudaBackendTest.MatchesCpuReference/*'
step ncu 60 ncu --clock-control none --metrics gpu__time_duration.sum \
  "$DIST/gpu_bench" --tokens=32768 --layers=4 --methods=snapkv,knorm --repeats=1
tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
[ -f "$LOGS/bench.log" ] && tail -30 "$LOGS/bench.log"
[ -f "$LOGS/transport.log" ] && grep -E "^(cache|raw|kvcd|end)" "$LOGS/transport.log"
[ -f "$LOGS/transport_nop2p.log" ] && grep -E "^(cache|raw|kvcd|end)" "$LOGS/transport_nop2p.log"
[ -f "$LOGS/examples.log" ] && tail -25 "$LOGS/examples.log"
[ -f "$LOGS/tests_nccl.log" ] && grep -E "^\[ +(OK|FAILED|SKIPPED) |Failure|error" "$LOGS/tests_nccl.log" | head -30
grep -hE "^\[  (PASSED|FAILED) |tests? ran|gpu totals|near-ties|Failure" "$LOGS"/tests_*.log | head -60
[ -f "$LOGS/kvcd_end_to_end.log" ] && grep -E "^== |backend|total" "$LOGS/kvcd_end_to_end.log" | head -30
[ -f "$LOGS/kvpress.log" ] && tail -25 "$LOGS/kvpress.log"
[ -f "$LOGS/sanitizer.log" ] && grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" "$LOGS/sanitizer.log" | head -10
