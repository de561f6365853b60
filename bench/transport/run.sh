#!/usr/bin/env bash
# Runs transport_bench against a kvcd on GPU 0 (two GPUs needed). Binaries from $BIN (default
# build-cuda/bin); arguments pass through to transport_bench.
#   bench/transport/run.sh --tokens=32768 --layers=32 --json=/tmp/transport.json
set -euo pipefail
BIN=${BIN:-build-cuda/bin}
scratch=$(mktemp -d)
"$BIN/kvcd" --address=127.0.0.1:0 --metrics_address=127.0.0.1:0 --port_file="$scratch/port" \
  --backend=cuda --cuda_device=0 --allow_cuda_ipc --allow_nccl > "$scratch/kvcd.log" 2>&1 &
kvcd=$!
trap 'kill $kvcd 2>/dev/null; wait $kvcd 2>/dev/null; rm -rf "$scratch"' EXIT
for _ in $(seq 600); do [[ -s "$scratch/port" ]] && break; sleep 0.1; done
[[ -s "$scratch/port" ]] || { cat "$scratch/kvcd.log"; exit 1; }
"$BIN/transport_bench" --target="127.0.0.1:$(cat "$scratch/port")" "$@" || {
  status=$?; tail -20 "$scratch/kvcd.log"; exit $status; }
