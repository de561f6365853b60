#!/usr/bin/env bash
# kvcd end to end on a GPU machine: start kvcd (--backend=cuda, and --backend=cpu for
# comparison at the smallest size), make Llama-3-8B-shaped caches with kvc synth, compress them
# through the server with kvc compress (inline gRPC transport, loopback), print what kvc
# reports (per-stage timings, summary) and the wall time of each call.
# Usage: bench/gpu/kvcd_end_to_end.sh BIN_DIR [TOKENS...]   (default 4096 32768)
set -euo pipefail
bin=$1
shift
sizes=("${@:-4096 32768}")
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

start_kvcd() {  # start_kvcd NAME BACKEND
  "$bin/kvcd" --address=127.0.0.1:0 --port_file="$work/$1.port" --metrics_address= \
    --backend="$2" >"$work/$1.log" 2>&1 &
  for _ in $(seq 1 300); do [[ -s "$work/$1.port" ]] && break; sleep 0.1; done
  [[ -s "$work/$1.port" ]] || { cat "$work/$1.log"; exit 1; }
  head -3 "$work/$1.log"
}
compress() {  # compress PORT_NAME TOKENS
  local begin
  begin=$(date +%s%N)
  "$bin/kvc" compress --server "127.0.0.1:$(cat "$work/$1.port")" \
    --input "$work/cache_$2.safetensors" --output "$work/out.safetensors" \
    --method snapkv --keep 0.1 | tail -12
  echo "== $1 T=$2: kvc compress wall $(( ($(date +%s%N) - begin) / 1000000 )) ms"
}

start_kvcd cuda cuda
start_kvcd cpu cpu
for tokens in ${sizes[*]}; do
  "$bin/kvc" synth --output "$work/cache_$tokens.safetensors" --tokens "$tokens" >/dev/null
  compress cuda "$tokens"
  compress cuda "$tokens"  # the second call runs on warm device memory pools
done
first=$(echo ${sizes[*]} | awk '{print $1}')
compress cpu "$first"
