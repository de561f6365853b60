#!/usr/bin/env bash
# The GPU transports from the command line, as client/README.md shows them, on a machine with
# two GPUs: kvcd on GPU 0; kvc_decode_example on GPU 1 listening for two forwarded requests;
# kvc_prefill_example forwarding through cuda_ipc (GPU 0) and through nccl (GPU 1); then
# `kvc compress --server` of a synthetic cache over --transport=cuda_ipc and =nccl, whose kept
# positions must equal --transport=inline's. Exits non-zero on the first failure.
# Usage: bench/gpu/examples_run.sh DIST
set -euo pipefail
dist=$1
scratch=$(mktemp -d)
"$dist/kvcd" --address=127.0.0.1:0 --metrics_address=127.0.0.1:0 --port_file="$scratch/port" \
  --backend=cuda --cuda_device=0 --allow_cuda_ipc --allow_nccl > "$scratch/kvcd.log" 2>&1 &
kvcd=$!
trap 'kill $kvcd 2>/dev/null; wait $kvcd 2>/dev/null || true' EXIT
for _ in $(seq 600); do [[ -s "$scratch/port" ]] && break; sleep 0.1; done
target="127.0.0.1:$(cat "$scratch/port")"

echo "== decode worker on GPU 1, two requests"
"$dist/kvc_decode_example" --target="$target" --device=1 --channel-id-file="$scratch/channel" \
  --requests=2 --dump-dir="$scratch/dumps" > "$scratch/decode.log" 2>&1 &
decode=$!
for transport_device in cuda_ipc:0 nccl:1; do
  echo "== prefill worker: ${transport_device%%:*} from GPU ${transport_device##*:}"
  "$dist/kvc_prefill_example" --target="$target" --forward-channel-file="$scratch/channel" \
    --transport="${transport_device%%:*}" --device="${transport_device##*:}" --tokens=8192 \
    --layers=8 --method=snapkv --keep=0.1
done
wait $decode
cat "$scratch/decode.log"
echo "dumped: $(find "$scratch/dumps" -name '*.bin' | wc -l) layers"

echo "== kvc compress over each transport"
"$dist/kvc" synth --output "$scratch/cache.safetensors" --layers 4 --tokens 4096 > /dev/null
for transport in inline cuda_ipc nccl; do
  # kvc uses the current device: kvcd's GPU for cuda_ipc, the other one for nccl.
  visible=0; [[ $transport == nccl ]] && visible=1
  CUDA_VISIBLE_DEVICES=$visible "$dist/kvc" compress --server "$target" \
    --input "$scratch/cache.safetensors" --method snapkv --keep 0.1 --transport=$transport \
    --output "$scratch/out-$transport.safetensors" | tail -3
done
for transport in cuda_ipc nccl; do
  # Every compressed tensor must equal the inline transport's byte for byte (the metadata may
  # differ: it records how the request was sent).
  python3 - "$scratch/out-inline.safetensors" "$scratch/out-$transport.safetensors" <<'PY'
import json, struct, sys
def load(path):
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        data = f.read()
    meta = header.pop("__metadata__", {})
    return {k: data[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in header.items()}, meta
(want, want_meta), (got, got_meta) = load(sys.argv[1]), load(sys.argv[2])
assert want.keys() == got.keys(), (sorted(want), sorted(got))
bad = [k for k in want if want[k] != got[k]]
assert not bad, f"tensors differ: {bad}"
diff = {k: (want_meta.get(k), got_meta.get(k)) for k in set(want_meta) | set(got_meta)
        if want_meta.get(k) != got_meta.get(k)}
print(f"{len(want)} tensors identical; metadata differing: {diff}")
PY
  echo "kvc --transport=$transport: tensors identical to --transport=inline"
done
