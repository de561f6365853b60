#!/usr/bin/env bash
# Renders every overlay in deploy/k8s/overlays (and deploy/grafana, the dashboard's ConfigMap)
# with kustomize and validates the result offline (deploy/validate_manifests.py): Kubernetes
# schemas from the kubernetes-validate package, a structural check for CRD kinds, kvcompress's
# rules. Also lints the Dockerfile's essentials.
# Needs: kubectl (Debian kubernetes-client) or kustomize; python with kubernetes-validate and
# PyYAML (tests/deploy/requirements.txt, installed into .venv by scripts/python_env.sh).
# Usage: deploy/validate.sh            PYTHON=... to choose the interpreter.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
[[ -x "$python" ]] || python=python3

if command -v kubectl >/dev/null; then
  render=(kubectl kustomize)
elif command -v kustomize >/dev/null; then
  render=(kustomize build)
else
  echo "validate.sh: needs kubectl (apt-get install kubernetes-client) or kustomize" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0
# The overlays, and the Grafana dashboard's ConfigMap (applied on its own, beside Grafana).
for overlay in "$here"/k8s/overlays/*/ "$here"/grafana/; do
  name="$(basename "$overlay")"
  # kustomize ≥ 5 warns about fields kept for kustomize 2 (kubectl 1.20); only errors matter.
  if ! "${render[@]}" "$overlay" >"$work/$name.yaml" 2>"$work/$name.err"; then
    echo "FAIL $name: ${render[*]} failed:" && cat "$work/$name.err"
    status=1
    continue
  fi
  "$python" "$here/validate_manifests.py" "$name" "$work/$name.yaml" || status=1
done

dockerfile="$here/docker/Dockerfile"
for want in '^FROM nvidia/cuda:.*-devel-.* AS build' '^FROM nvidia/cuda:.*-runtime-' \
            '^USER 10001' '^EXPOSE 50051 9464' '^ENTRYPOINT \["/usr/local/bin/kvcd"\]'; do
  if ! grep -q -E "$want" "$dockerfile"; then
    echo "FAIL Dockerfile: no line matching $want"
    status=1
  fi
done
[[ $status -eq 0 ]] && echo "validate.sh: every overlay rendered and valid"
exit $status
