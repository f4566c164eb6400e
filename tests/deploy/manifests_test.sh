#!/usr/bin/env bash
# Every overlay renders with `kubectl kustomize`, and every rendered object (and the KServe
# example) validates against the Kubernetes API schemas (tests/deploy/validate_manifests.mjs).
set -euo pipefail
cd "$(dirname "$0")/../.."
validator=tests/deploy/validate_manifests.mjs
[ -d tests/deploy/node_modules/kubernetes-models ] || { echo "run scripts/install-deps.sh (npm packages missing)"; exit 1; }
status=0
for overlay in deploy/kubernetes/overlays/*/; do
  name=$(basename "$overlay")
  rendered=$(kubectl kustomize "$overlay" 2>/dev/null) || { echo "$name: kubectl kustomize failed"; status=1; continue; }
  node "$validator" "$name" <<<"$rendered" || status=1
done
node "$validator" kserve < deploy/kserve/inferenceservice.yaml || status=1
exit "$status"
