#!/usr/bin/env bash
# Renders every kustomize overlay (and the ghz Job) and validates each object offline with
# kubeconform against the vendored Kubernetes and KubeRay schemas in k8s/schemas/
# (scripts/gen_k8s_schemas.py makes them). No cluster and no network needed.
# Usage: scripts/k8s_check.sh [OUT_DIR]   (rendered YAML is written there; default a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(scripts/dev_tools.sh kustomize kubeconform)"
K8S_VERSION=1.37.2 # keep in step with K8S_VERSION in scripts/gen_k8s_schemas.py
OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
schemas=k8s/schemas
for target in k8s/overlays/dev-cpu k8s/overlays/prod-gpu k8s/load; do
  name="$(basename "$target")"
  "$BIN/kustomize" build "$target" >"$OUT/$name.yaml"
  "$BIN/kubeconform" -strict -summary -kubernetes-version "$K8S_VERSION" \
    -schema-location "$schemas/kubernetes/{{.NormalizedKubernetesVersion}}-standalone{{.StrictSuffix}}/{{.ResourceKind}}{{.KindSuffix}}.json" \
    -schema-location "$schemas/crds/{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json" \
    "$OUT/$name.yaml"
done
