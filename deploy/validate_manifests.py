#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests offline.

Usage: validate_manifests.py NAME RENDERED.yaml  (NAME: the overlay, for messages)

Built-in kinds are checked against the OpenAPI-derived JSON schemas that the
`kubernetes-validate` package ships (strict: unknown fields fail), for every version in
$KVC_K8S_VERSIONS (default "1.29.0 1.35.0"). Kinds from CRDs, whose schemas are not shipped
(ServiceMonitor), get the minimal structural check below and are reported as such. Then
kvcompress's own rules: gRPC probes on 50051, non-root, GPU requests, the HPA metric.
Prints one line per object; exits 1 on the first overlay with any failure.
"""

import os
import sys

import kubernetes_validate
import yaml

CRD_CHECKS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"):
        lambda o: _require(o, ["spec", "selector", "matchLabels"]) + [
            f"endpoint {i}: needs port and path" for i, e in
            enumerate(o.get("spec", {}).get("endpoints") or [None])
            if not isinstance(e, dict) or not e.get("port") or not e.get("path")],
}
GRPC_PORT = 50051


def _require(obj, path):
    cur = obj
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return [f"missing {'.'.join(path)}"]
        cur = cur[key]
    return []


def _pod_spec(obj):
    kind = obj.get("kind")
    if kind in ("Deployment", "DaemonSet", "StatefulSet"):
        return obj["spec"]["template"]["spec"]
    return None


def house_rules(obj, overlay):
    """kvcompress's deployment rules, beyond the schema."""
    errors = []
    spec = _pod_spec(obj)
    if spec is not None:
        if not spec.get("securityContext", {}).get("runAsNonRoot"):
            errors.append("pod securityContext.runAsNonRoot must be true")
        for c in spec.get("containers", []):
            for probe in ("readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("grpc", {}).get("port")
                if port != GRPC_PORT:
                    errors.append(f"container {c['name']}: {probe} must be a grpc probe on "
                                  f"{GRPC_PORT}, got {c.get(probe)}")
            if obj["kind"] == "Deployment":
                gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                if not gpus:
                    errors.append(f"container {c['name']}: no nvidia.com/gpu limit")
        if obj["kind"] == "DaemonSet" and not spec.get("hostIPC"):
            errors.append("node-local DaemonSet needs hostIPC for CUDA IPC")
    if obj.get("kind") == "HorizontalPodAutoscaler":
        names = [m.get("pods", {}).get("metric", {}).get("name")
                 for m in obj["spec"].get("metrics", [])]
        if "kvcompress_queue_depth" not in names:
            errors.append(f"HPA must scale on kvcompress_queue_depth, got {names}")
    return errors


def main():
    overlay, path = sys.argv[1], sys.argv[2]
    versions = os.environ.get("KVC_K8S_VERSIONS", "1.29.0 1.35.0").split()
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    if not docs:
        print(f"{overlay}: rendered nothing")
        return 1
    failures = 0
    for obj in docs:
        name = f"{overlay}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        key = (obj.get("apiVersion"), obj.get("kind"))
        errors = []
        if key in CRD_CHECKS:
            errors += CRD_CHECKS[key](obj)
            how = "CRD kind, no schema shipped: structural check only"
        else:
            how = "schema " + ", ".join(versions)
            for version in versions:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    errors.append(f"k8s {version}: {where}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    errors.append(f"k8s {version}: unknown kind ({e}); add a CRD check")
        errors += house_rules(obj, overlay)
        print(f"{'FAIL' if errors else 'ok  '} {name} ({how})")
        for e in errors:
            print(f"       {e}")
        failures += bool(errors)
    print(f"{overlay}: {len(docs)} objects, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
