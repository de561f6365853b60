#!/usr/bin/env bash
# On the GPU machine (no network): installs the wheels that fetch_wheels.sh put in
# bench/peer/wheels/ into a target folder that goes before the image's site-packages on
# PYTHONPATH, without touching the image. Skips any package the image already has (kvpress
# excepted), so nothing of the image is shadowed. Then checks `import kvpress`.
#
#   bash bench/peer/install_wheels.sh [TARGET]      # default /tmp/kvpress-site
#   export PYTHONPATH=/tmp/kvpress-site${PYTHONPATH:+:$PYTHONPATH}
#
# PYTHON (default python3) picks the interpreter; WHEELS (default bench/peer/wheels) the folder.
set -uo pipefail
TARGET=$(realpath -m "${1:-/tmp/kvpress-site}")
HERE=$(cd "$(dirname "$0")" && pwd) || exit 1
WHEELS=$(realpath -m "${WHEELS:-$HERE/wheels}")
PY=${PYTHON:-python3}
cd "$HERE" || exit 1
ls "$WHEELS"/*.whl > /dev/null 2>&1 || { echo "no wheels in $WHEELS: run fetch_wheels.sh and carry bench/peer/wheels" >&2; exit 1; }
if [ -f "$WHEELS/SHA256SUMS" ]; then (cd "$WHEELS" && sha256sum -c --quiet SHA256SUMS) || exit 1; fi
install=()
for whl in "$WHEELS"/*.whl; do
  dist=$(basename "$whl" | cut -d- -f1)
  if [ "$dist" != kvpress ] && "$PY" -m pip show -q "$dist" > /dev/null 2>&1; then
    echo "image has $dist $("$PY" -m pip show "$dist" 2>/dev/null | sed -n 's/^Version: //p'): not installing $(basename "$whl")"
  else
    install+=("$whl")
  fi
done
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" "${install[@]}" || exit 1
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
# A carried import-only dependency that does not import against the image's packages is
# removed, so that kvpress_bench.py falls back to its stand-in rather than failing.
for mod in cachetools fire datasets; do
  if [ -d "$TARGET/$mod" ] && ! "$PY" -c "import $mod" > /dev/null 2>&1; then
    echo "warning: carried $mod does not import here; removing it (kvpress_bench.py will use bench/peer/stubs/$mod):"
    "$PY" -c "import $mod" 2>&1 | tail -1
    rm -rf "${TARGET:?}/$mod" "${TARGET:?}/$mod"-*.dist-info
  fi
done
"$PY" - <<'PY' || exit 1
import sys
sys.path.append("stubs")  # as kvpress_bench.py does, only for what is still missing
import kvpress, transformers, torch
from kvpress import AdaKVPress, KnormPress, PyramidKVPress, SnapKVPress, StreamingLLMPress
stubbed = sorted(n for n, m in sys.modules.items() if "." not in n and "stubs/" in str(getattr(m, "__file__", "") or ""))
print(f"kvpress {kvpress.__file__} imports: transformers {transformers.__version__}, torch {torch.__version__}, "
      f"cuda {torch.cuda.is_available()}, stand-ins {stubbed or 'none'}")
PY
echo "installed into $TARGET; export PYTHONPATH=$TARGET\${PYTHONPATH:+:\$PYTHONPATH}"
