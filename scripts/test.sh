#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds with the default preset, runs ctest.
# Usage: scripts/test.sh            (default preset)
#        KVC_PRESET=asan scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install_deps.sh
scripts/python_env.sh
preset="${KVC_PRESET:-default}"
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" -j "$(nproc)"
ctest --preset "$preset" -j "$(nproc)"
