#!/usr/bin/env bash
# The main job, end to end on this machine: build, start kvcd, make a synthetic
# Llama-3-8B-shaped cache, compress it through the server with SnapKV at keep 0.1, print
# the per-layer table and a few /metrics lines, stop kvcd.
#
# Usage: scripts/demo.sh [TOKENS]   (default 4096)
set -euo pipefail
cd "$(dirname "$0")/.."

tokens="${1:-4096}"
scripts/install_deps.sh
cmake --preset default >/dev/null
cmake --build --preset default -j "$(nproc)" --target kvcd kvc

work="$(mktemp -d)"
trap 'kill "${kvcd_pid:-0}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

build/bin/kvcd --address=127.0.0.1:0 --port_file="$work/port" \
  --metrics_address=127.0.0.1:0 --metrics_port_file="$work/metrics_port" \
  >"$work/kvcd.log" 2>&1 &
kvcd_pid=$!
for _ in $(seq 1 300); do
  [[ -s "$work/port" && -s "$work/metrics_port" ]] && break
  sleep 0.1
done
[[ -s "$work/port" ]] || { cat "$work/kvcd.log"; echo "kvcd did not start" >&2; exit 1; }
server="127.0.0.1:$(cat "$work/port")"
metrics_port="$(cat "$work/metrics_port")"
echo "== kvcd listening on $server (metrics on :$metrics_port)"

echo "== kvc info"
build/bin/kvc info --server "$server" | head -n 12

echo "== kvc synth: Llama-3-8B shapes (32 layers, 32 query / 8 KV heads, D=128, bf16), $tokens tokens"
build/bin/kvc synth --output "$work/cache.safetensors" --tokens "$tokens"

echo "== kvc compress --method snapkv --keep 0.1 through kvcd"
build/bin/kvc compress --server "$server" --input "$work/cache.safetensors" \
  --output "$work/compressed.safetensors" --method snapkv --keep 0.1

echo "== a few /metrics lines"
curl -s "http://127.0.0.1:$metrics_port/metrics" |
  grep -E '^kvcompress_(requests_total|tokens_in_total|tokens_kept_total|bytes_received_total|request_duration_seconds_count)' |
  head -n 8
