#!/usr/bin/env bash
# Installs the Debian packages kvcompress builds and tests with, when they are missing.
# Safe to run repeatedly: does nothing when everything is present.
set -euo pipefail

# civetweb (the tool) is listed because civetweb's CMake package checks that its binary
# exists, although kvcd only links the library. zlib compresses the PNG heatmaps of
# `kvc inspect`; libpng decodes them in the tests (a reader independent of ours). prometheus
# brings promtool and the Prometheus server that the observability tests run against kvcd.
# libssl-dev: kvcd checks its TLS files and compares bearer tokens with OpenSSL; openssl
# makes the test certificates of the TLS tests.
packages=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev nlohmann-json3-dev libcivetweb-dev civetweb
  libgtest-dev libgmock-dev libbenchmark-dev
  zlib1g-dev libpng-dev
  curl python3
  prometheus
  libssl-dev openssl
)
# kubectl renders the Kubernetes manifests (tests/deploy). This image may already carry one
# from another package, which Debian's kubernetes-client would conflict with.
if ! command -v kubectl >/dev/null 2>&1; then packages+=(kubernetes-client); fi

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if ((${#missing[@]} > 0)); then
  echo "kvcompress: installing ${missing[*]}" >&2
  sudo_cmd=()
  if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
