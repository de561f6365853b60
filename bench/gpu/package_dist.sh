#!/usr/bin/env bash
# Packages the GPU binaries of a CUDA build for a device machine that lacks this machine's
# libraries (abseil, gRPC, protobuf, civetweb, …): the binaries go to $DIST, every shared
# library they load — except glibc's own, the CUDA driver and what the CUDA runtime brings —
# to $DIST/lib, and this machine's libstdc++ to $DIST/fallback (device_run.sh uses it only
# when the device's is too old).
# Usage: bench/gpu/package_dist.sh [BUILD_DIR] [DIST]   (defaults build-cuda, BUILD_DIR/dist)
set -euo pipefail
build=${1:-build-cuda}
dist=${2:-$build/dist}
binaries=("$build/tests/gpu_cuda_backend_test" "$build/tests/gpu_kvcd_cuda_test"
          "$build/tests/gpu_cuda_ipc_test" "$build/bin/gpu_bench" "$build/bin/kvcd"
          "$build/bin/kvc")
# The nccl transport's tests, examples and benchmark, when the build has NCCL.
for optional in "$build/tests/gpu_nccl_transport_test" "$build/bin/kvc_decode_example" \
                "$build/bin/kvc_prefill_example" "$build/bin/transport_bench"; do
  [[ -f "$optional" ]] && binaries+=("$optional")
done
rm -rf "$dist"
mkdir -p "$dist/lib" "$dist/fallback"
for binary in "${binaries[@]}"; do
  [[ -f "$binary" ]] || { echo "missing $binary (build it first)" >&2; exit 1; }
  cp "$binary" "$dist/"
  ldd "$binary" | awk '/=> \// {print $3}' | while read -r library; do
    case "$(basename "$library")" in
      # NCCL (200+ MiB) is not carried: device_run.sh takes the device's own (PyTorch's wheel).
      libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libcuda.so*|libnccl.so*) ;;
      libstdc++.so*|libgcc_s.so*) cp -L "$library" "$dist/fallback/" ;;
      *) cp -L "$library" "$dist/lib/" ;;
    esac
  done
done
du -sh "$dist"
