#!/usr/bin/env bash
# Static checks of the Kubernetes deployment files, with no cluster:
#   - every manifest under deploy/kubernetes/ and the Helm chart rendered with its default
#     values and with each values file under deploy/helm/outbox-relay/ci/, validated against
#     the Kubernetes OpenAPI schemas in strict mode (kubernetes-validate; unknown fields
#     are errors), for the oldest Kubernetes the chart supports and a recent one;
#   - helm lint --strict, with the same values;
#   - the Pod Security Standards "restricted" profile and the relay's own rules (no subPath,
#     resources, no readinessProbe on a sidecar relay...) by scripts/pss_restricted.py,
#     after its self-test proves that it fails on broken manifests;
#   - the relay.toml inside every ConfigMap parses as TOML.
# It installs what it needs under $HOME/.cache/outbox-relay/tools (a Python venv with
# kubernetes-validate and PyYAML, Helm built with `go install`), so a second run is fast.
#
# kubectl is not used: `kubectl create --dry-run=client -f` needs an API server even for
# client-side dry runs (it asks the server for its API groups to map kinds), both with
# Debian 12's kubernetes-client 1.20 and with kubectl 1.32, so it cannot run offline.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${OUTBOX_RELAY_TOOLS:-$HOME/.cache/outbox-relay/tools}"
VENV="$TOOLS/venv"
KUBERNETES_VALIDATE_VERSION=1.37.0
# Oldest (Chart.yaml kubeVersion) and newest Kubernetes versions validated against.
KUBE_VERSIONS=(1.27.0 1.37.0)
HELM_MODULE=helm.sh/helm/v4/cmd/helm@v4.3.2
HELM_FALLBACK_MODULE=helm.sh/helm/v3/cmd/helm@v3.21.4
CHART=deploy/helm/outbox-relay

passed=0
failed=0
failures=()
step_start=$SECONDS
say() { printf 'check-deploy: %s\n' "$*"; }
ok() { passed=$((passed + 1)); say "ok   $* ($((SECONDS - step_start)) s)"; step_start=$SECONDS; }
fail() {
    failed=$((failed + 1)); failures+=("$*")
    say "FAIL $* ($((SECONDS - step_start)) s)" >&2; step_start=$SECONDS
}
# Runs a check: its output is shown only when it fails.
check() {
    local name=$1; shift
    local out
    if out=$("$@" 2>&1); then ok "$name"; else printf '%s\n' "$out" >&2; fail "$name"; fi
}

apt_updated=
apt_install() {
    if [ "$(id -u)" != 0 ]; then say "need root to install $*" >&2; return 1; fi
    if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- tools -----------------------------------------------------------------------------
mkdir -p "$TOOLS"
t0=$SECONDS
requirements="kubernetes-validate==$KUBERNETES_VALIDATE_VERSION pyyaml"
if [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$requirements" ] \
    || ! "$VENV/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    say "installing $requirements into $VENV"
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        # Debian's python3 ships venv (and ensurepip) separately.
        rm -rf "$VENV"
        apt_install python3-venv
        python3 -m venv "$VENV"
    fi
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install --quiet --disable-pip-version-check $requirements
    echo "$requirements" >"$VENV/.requirements"
fi
PY="$VENV/bin/python"
KV="$VENV/bin/kubernetes-validate"

HELM="$TOOLS/helm"
if ! "$HELM" version >/dev/null 2>&1; then
    # The machine image has Go in /usr/local/go; Helm 4.3 needs Go 1.26 (Go 1.21 or later
    # fetches that toolchain by itself).
    command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"
    command -v go >/dev/null || { say "Go is needed to build Helm (go install)" >&2; exit 1; }
    say "building Helm with go install (a few minutes on 2 cores)"
    h0=$SECONDS
    if ! (cd "$TOOLS" && GOBIN="$TOOLS" GOFLAGS=-mod=mod go install "$HELM_MODULE"); then
        say "$HELM_MODULE did not build; trying $HELM_FALLBACK_MODULE" >&2
        (cd "$TOOLS" && GOBIN="$TOOLS" GOFLAGS=-mod=mod go install "$HELM_FALLBACK_MODULE")
    fi
    say "Helm built in $((SECONDS - h0)) s"
fi
say "tools ready in $((SECONDS - t0)) s: $("$HELM" version --short 2>/dev/null || "$HELM" version), kubernetes-validate $KUBERNETES_VALIDATE_VERSION"
step_start=$SECONDS

# --- the checker fails where it must -----------------------------------------------------
check "pss_restricted self-test" "$PY" scripts/pss_restricted.py --self-test
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/bad.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad}
spec:
  selector: {matchLabels: {app: bad}}
  template:
    metadata: {labels: {app: bad}}
    spec:
      securityContext: {runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: outbox-relay
          image: registry.example.com/outbox-relay:0.1.0
          args: [--config, /etc/outbox-relay/relay.toml, run]
          readinessProbe: {httpGet: {path: /readyz, port: 9187}}
          livenessProbe: {httpGet: {path: /healthz, port: 9187}}
          resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {memory: 256Mi}}
          securityContext:
            privileged: true
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
          volumeMounts:
            - {name: config, mountPath: /etc/outbox-relay/relay.toml, subPath: relay.toml}
      volumes: [{name: config, configMap: {name: relay}}]
EOF
bad_rejected() {
    local out
    if out=$("$PY" scripts/pss_restricted.py "$work/bad.yaml" 2>&1); then
        echo "a privileged relay with a subPath mount passed"; return 1
    fi
    if ! grep -q "privileged" <<<"$out" || ! grep -q "subPath" <<<"$out"; then
        echo "$out"; echo "the failure does not name privileged and subPath"; return 1
    fi
}
check "pss_restricted rejects privileged: true and a subPath mount" bad_rejected
kv_rejects_typo() {
    sed 's/^spec:/spec:\n  replica: 2/' "$work/bad.yaml" >"$work/typo.yaml"
    ! "$KV" --strict --quiet "$work/typo.yaml" >/dev/null 2>&1
}
check "kubernetes-validate --strict rejects an unknown field" kv_rejects_typo

# --- the files under test ----------------------------------------------------------------
manifests=(deploy/kubernetes/*.yaml)
values_sets=("default")
for f in "$CHART"/ci/*.yaml; do [ -e "$f" ] && values_sets+=("$f"); done

for values in "${values_sets[@]}"; do
    args=()
    [ "$values" = default ] || args=(-f "$values")
    label="helm ${values##*/}"
    check "helm lint --strict ($label)" "$HELM" lint --strict "$CHART" "${args[@]}"
    out="$work/helm-$(basename "$values" .yaml).yaml"
    if "$HELM" template orders "$CHART" --namespace orders "${args[@]}" >"$out" 2>"$out.err"; then
        ok "helm template ($label)"
        manifests+=("$out")
    else
        cat "$out.err" >&2; fail "helm template ($label)"
    fi
done
# The PDB's other form and no init Job render too.
out="$work/helm-variants.yaml"
if "$HELM" template orders "$CHART" --set init.enabled=false --set podDisruptionBudget.enabled=false \
    --set service.enabled=false --set serviceAccount.create=false >"$out" 2>"$out.err"; then
    ok "helm template (init, PDB, Service and ServiceAccount disabled)"; manifests+=("$out")
else
    cat "$out.err" >&2; fail "helm template (init, PDB, Service and ServiceAccount disabled)"
fi

for version in "${KUBE_VERSIONS[@]}"; do
    check "schemas of Kubernetes $version, strict (${#manifests[@]} files)" \
        "$KV" --strict --quiet --kubernetes-version "$version" "${manifests[@]}"
done
check "Pod Security Standards restricted + relay rules" "$PY" scripts/pss_restricted.py "${manifests[@]}"

toml_parses() {
    "$PY" - "$@" <<'EOF'
import sys, tomllib, yaml
count = 0
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "ConfigMap" and "relay.toml" in (doc.get("data") or {}):
            try:
                tomllib.loads(doc["data"]["relay.toml"])
            except tomllib.TOMLDecodeError as e:
                sys.exit(f"{path}: ConfigMap/{doc['metadata']['name']}: relay.toml: {e}")
            count += 1
if count == 0:
    sys.exit("no relay.toml found")
print(f"{count} relay.toml parse")
EOF
}
check "relay.toml in every ConfigMap parses as TOML" toml_parses "${manifests[@]}"

# The sidecar example must stay free of readiness coupling (pss_restricted checks any pod
# with a relay beside other containers; this makes sure the example still is one).
sidecar_is_sidecar() {
    "$PY" - deploy/kubernetes/sidecar.yaml <<'EOF'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") == "Deployment":
        cs = doc["spec"]["template"]["spec"]["containers"]
        relay = [c for c in cs if "outbox-relay" in c.get("image", "")]
        if len(cs) > 1 and relay and all("readinessProbe" not in c for c in relay) \
                and all("livenessProbe" in c for c in relay):
            sys.exit(0)
sys.exit("sidecar.yaml: no app Deployment whose relay has a livenessProbe and no readinessProbe")
EOF
}
check "sidecar.yaml: relay beside the app, liveness only" sidecar_is_sidecar

say "took $SECONDS s"
for f in "${failures[@]}"; do say "failed: $f" >&2; done
echo "check-deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
