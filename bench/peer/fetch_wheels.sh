#!/usr/bin/env bash
# Fetches, on a machine with PyPI, the exact wheels kvpress_bench.py needs on the GPU machine
# (which has no network, and whose image has torch and transformers but not kvpress) into
# bench/peer/wheels/ (git-ignored; the device run carries it: carry=["bench/peer/wheels"]).
#
#   kvpress 0.5.5      the peer (pure Python, --no-deps: torch, transformers, numpy, pandas,
#                      accelerate, peft, requests, huggingface-hub come from the image)
#   cachetools, fire (+ termcolor), datasets (+ dill, multiprocess)
#                      imported by kvpress/__init__ for presses the bench does not run
#                      (DuoAttention, LUKV, ExpectedAttentionStats); absent from the image.
#                      If one still fails to import there, kvpress_bench.py uses the
#                      stand-in in bench/peer/stubs/.
# No transformers wheel: kvpress 0.5.5 declares transformers<5.3 but imports and runs these
# presses against the image's 5.17.0 (checked locally, see README.md).
#
# Targets the image's CPython 3.12 on x86-64 Linux. Usage: bench/peer/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")"
PIP=${PIP:-python3 -m pip}
DEST=wheels
rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
target=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform any)
$PIP download -q --no-deps "${target[@]}" -d "$DEST.tmp" \
  kvpress==0.5.5 cachetools==5.5.2 termcolor==3.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# fire 0.6.0 (kvpress pins fire<0.7) is on PyPI as an sdist only: build its pure-Python wheel.
$PIP wheel -q --no-deps -w "$DEST.tmp" fire==0.6.0
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
( cd "$DEST" && ls -l ./*.whl && sha256sum -- *.whl > SHA256SUMS && du -ch ./*.whl | tail -1 )
