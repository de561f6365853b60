#!/usr/bin/env bash
# Creates (or refreshes) the project's Python environment in .venv with every
# tests/*/requirements.txt and bench/*/requirements.txt installed. Python test suites
# registered with ctest run with .venv/bin/python. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
shopt -s nullglob
requirements=(tests/*/requirements.txt bench/*/requirements.txt)
if ((${#requirements[@]} > 0)); then
  stamp=.venv/.requirements.sha256
  wanted="$(cat "${requirements[@]}" | sha256sum | cut -d' ' -f1)"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
    args=()
    for file in "${requirements[@]}"; do args+=(-r "$file"); done
    .venv/bin/python -m pip install -q --disable-pip-version-check "${args[@]}"
    echo "$wanted" >"$stamp"
  fi
fi
