#!/usr/bin/env bash
# Renders every kustomization under deploy/k8s and validates what a cluster would receive:
#
# 1. `kubectl kustomize` (kustomize v5 built into kubectl) renders overlays/cpu, overlays/gpu,
#    overlays/vllm-router, overlays/llm-d and prometheus-adapter; a broken kustomization fails
#    here.
# 2. kubernetes-validate (PyPI; bundles the Kubernetes JSON schemas) checks every built-in
#    object against two Kubernetes versions in strict mode, which rejects unknown fields (a
#    misspelt field is otherwise silently dropped by the API server). It only warns about
#    kinds it has no schema for: any such warning fails here, except for the CRDs listed in
#    ALLOWED_UNKNOWN (ServiceMonitor, the Gateway API, InferencePool, Istio's DestinationRule).
# 3. check_manifests.py validates those CRDs against strict schemas of the fields used, and
#    checks what no schema sees: selectors, port names, drain timing, probes, the image's uid,
#    the HPA metric against the prometheus-adapter rule, and for the router overlays the
#    routers' discovery, RBAC, KV-event ports and topic and the endpoint picker's config.
#
# Needs kubectl and `pip install kubernetes-validate`. Exits non-zero on any error.
set -euo pipefail
cd "$(dirname "$0")"

# The oldest Kubernetes these manifests claim (autoscaling/v2 and policy/v1 are GA long
# before it) and a recent one.
VERSIONS=(1.29.0 1.34.0)
# Kinds kubernetes-validate has no schema for (CRDs): check_manifests.py validates each one
# against a strict schema of the fields used.
ALLOWED_UNKNOWN=(
  "kind ServiceMonitor with api version monitoring.coreos.com/v1 "
  "kind InferencePool with api version inference.networking.k8s.io/v1 "
  "kind Gateway with api version gateway.networking.k8s.io/v1 "
  "kind HTTPRoute with api version gateway.networking.k8s.io/v1 "
  "kind DestinationRule with api version networking.istio.io/v1 "
)

command -v kubectl >/dev/null || { echo "validate.sh: kubectl not found" >&2; exit 1; }
python3 -c 'import kubernetes_validate' 2>/dev/null \
  || { echo "validate.sh: pip install kubernetes-validate" >&2; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
k_args=()
for v in "${VERSIONS[@]}"; do k_args+=(-k "$v"); done

failed=0
for dir in overlays/cpu overlays/gpu overlays/vllm-router overlays/llm-d prometheus-adapter; do
  file="$out/${dir//\//-}.yaml"
  if ! kubectl kustomize "$dir" >"$file"; then
    echo "FAIL $dir: kustomize could not render it"
    failed=1
    continue
  fi
  docs=$(grep -c '^kind:' "$file" || true)
  log="$out/${dir//\//-}.log"
  rc=0
  python3 -m kubernetes_validate --strict --quiet "${k_args[@]}" "$file" >"$log" 2>&1 || rc=$?
  # Whatever it printed, other than the one expected warning, is a failure.
  allowed=()
  for a in "${ALLOWED_UNKNOWN[@]}"; do allowed+=(-e "$a"); done
  problems=$(grep -vF "${allowed[@]}" "$log" || true)
  if [ "$rc" -ne 0 ] || [ -n "$problems" ]; then
    echo "FAIL $dir (kubernetes-validate exit $rc):"
    echo "$problems" | sed "s#$out/##"
    failed=1
  else
    echo "ok   $dir: $docs objects valid against Kubernetes ${VERSIONS[*]} (strict)"
  fi
done

if [ "$failed" -eq 0 ]; then
  python3 check_manifests.py "$out/overlays-cpu.yaml" "$out/overlays-gpu.yaml" \
    "$out/overlays-vllm-router.yaml" "$out/overlays-llm-d.yaml" \
    --adapter "$out/prometheus-adapter.yaml" || failed=1
fi

if [ "$failed" -ne 0 ]; then
  echo "validate.sh: FAILED" >&2
  exit 1
fi
echo "validate.sh: all manifests valid"
