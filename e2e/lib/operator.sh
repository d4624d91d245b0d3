# Shared steps of demo.sh, test.sh and bench.sh: install the chart into a
# running local cluster and run operator replicas as local processes under the
# chart's own ServiceAccount (kwok simulates pods, so the chart's operator pods
# never run a container; these processes do the work instead).
#
# Source it after `KUBECONFIG` is exported and `bin` names the tools directory.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=common.sh
. "$repo/e2e/lib/common.sh"
OPERATOR_NAMESPACE=pec-system
OPERATOR_RELEASE=pec-operator

# build_operator: the operator binary (debug build, shared with the tests).
build_operator() {
  (cd "$repo" && cargo build --quiet --bin pec-operator)
  echo "${CARGO_TARGET_DIR:-$repo/target}/debug/pec-operator"
}

# install_chart: helm install the chart (CRDs, ServiceAccount, RBAC, Deployment).
install_chart() {
  "$bin/kubectl" get namespace "$OPERATOR_NAMESPACE" >/dev/null 2>&1 || "$bin/kubectl" create namespace "$OPERATOR_NAMESPACE" >/dev/null
  "$bin/helm" upgrade --install "$OPERATOR_RELEASE" "$repo/charts/pec-operator" \
    --namespace "$OPERATOR_NAMESPACE" --wait=false >/dev/null
  "$bin/kubectl" wait --for condition=Established --timeout=60s \
    crd/sites.pec.dev crd/maildomains.pec.dev crd/signingkeys.pec.dev >/dev/null
}

# check_crd_upgrade: the README's upgrade story, as a user meets it. A copy
# of the chart whose Site CRD lacks a field (an older release) is installed;
# `helm upgrade` to this chart leaves the CRD as it was (Helm never upgrades
# `crds/`), so a Site using the field is still refused; the documented step
# (`kubectl apply --server-side --force-conflicts -f charts/pec-operator/crds/`:
# Helm is the CRDs' field manager, so a plain server-side apply conflicts) then upgrades
# the CRDs Helm installed and the Site is accepted. Leaves the release installed.
check_crd_upgrade() {
  local old site
  old=$(mktemp -d)
  cp -r "$repo/charts/pec-operator" "$old/"
  # Drop the `maintenanceForce:` property: its line and the deeper-indented ones below.
  python3 - "$old/pec-operator/crds/site.yaml" <<'PY'
import sys
path = sys.argv[1]
lines, out, indent = open(path).read().split("\n"), [], None
for line in lines:
    depth = len(line) - len(line.lstrip())
    if indent is not None and line.strip() and depth > indent:
        continue
    indent = None
    if line.strip() == "maintenanceForce:":
        indent = depth
        continue
    out.append(line)
assert len(out) < len(lines), "no maintenanceForce property in the Site CRD"
open(path, "w").write("\n".join(out))
PY
  site='{"apiVersion":"pec.dev/v1alpha1","kind":"Site","metadata":{"name":"crd-upgrade-check"},
    "spec":{"nodeSelector":{"topology.kubernetes.io/zone":"crd-upgrade-check"},"maintenanceForce":true}}'
  "$bin/kubectl" get namespace "$OPERATOR_NAMESPACE" >/dev/null 2>&1 || "$bin/kubectl" create namespace "$OPERATOR_NAMESPACE" >/dev/null
  "$bin/helm" install "$OPERATOR_RELEASE" "$old/pec-operator" --namespace "$OPERATOR_NAMESPACE" --wait=false >/dev/null
  "$bin/kubectl" wait --for condition=Established --timeout=60s crd/sites.pec.dev >/dev/null
  refused() {
    local out
    if out=$("$bin/kubectl" apply -f - <<<"$site" 2>&1); then
      echo "check_crd_upgrade: $1: a Site with spec.maintenanceForce was accepted" >&2; return 1
    fi
    grep -q 'unknown field "spec.maintenanceForce"' <<<"$out" ||
      { echo "check_crd_upgrade: $1: refused for another reason: $out" >&2; return 1; }
  }
  refused "older CRDs installed"
  "$bin/helm" upgrade "$OPERATOR_RELEASE" "$repo/charts/pec-operator" --namespace "$OPERATOR_NAMESPACE" --wait=false >/dev/null
  refused "after helm upgrade alone"
  (cd "$repo" && "$bin/kubectl" apply --server-side --force-conflicts -f charts/pec-operator/crds/ >/dev/null)
  "$bin/kubectl" wait --for condition=Established --timeout=60s \
    crd/sites.pec.dev crd/maildomains.pec.dev crd/signingkeys.pec.dev crd/slatargets.pec.dev >/dev/null
  "$bin/kubectl" apply -f - <<<"$site" >/dev/null
  "$bin/kubectl" delete site crd-upgrade-check --wait=true >/dev/null
  rm -rf "$old"
}

# install_chart_on_real_nodes TOKEN_DIR CLAMD: helm install the chart with
# the operator image imported into the real nodes (nothing is pulled), its
# pods on those nodes, and the SoftHSM2 token directory TOKEN_DIR (on this
# host, which every real node shares) as a volume: a hostPath
# PersistentVolume, since restricted Pod Security allows claims but no
# hostPath in pods. CLAMD is the platform's clamd for every gateway.
install_chart_on_real_nodes() {
  local tokens=$1 clamd=$2
  chown -R 65532:65532 "$tokens"
  "$bin/kubectl" create namespace "$OPERATOR_NAMESPACE" --dry-run=client -o yaml | "$bin/kubectl" apply -f - >/dev/null
  "$bin/kubectl" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: pec-hsm-tokens}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteMany]
  storageClassName: ""
  persistentVolumeReclaimPolicy: Retain
  hostPath: {path: "$tokens", type: Directory}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: hsm-tokens, namespace: $OPERATOR_NAMESPACE}
spec:
  accessModes: [ReadWriteMany]
  storageClassName: ""
  volumeName: pec-hsm-tokens
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: softhsm, namespace: $OPERATOR_NAMESPACE}
data:
  softhsm2.conf: |
    directories.tokendir = /var/lib/softhsm/tokens
    objectstore.backend = file
    log.level = ERROR
YAML
  "$bin/helm" upgrade --install "$OPERATOR_RELEASE" "$repo/charts/pec-operator" \
    --namespace "$OPERATOR_NAMESPACE" --wait=false -f - >/dev/null <<YAML
image: {pullPolicy: Never}
nodeSelector: {pec.dev/node: real}
topologySpreadConstraints:
  - {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule}
gateway:
  # Gateways mount the same token through a claim of this name in their
  # MailDomain's namespace.
  hsmTokenClaim: hsm-tokens
  clamd: "$clamd"
hsm:
  env:
    - {name: SOFTHSM2_CONF, value: /etc/softhsm/softhsm2.conf}
  volumes:
    - {name: tokens, persistentVolumeClaim: {claimName: hsm-tokens}}
    - {name: softhsm, configMap: {name: softhsm}}
  volumeMounts:
    - {name: tokens, mountPath: /var/lib/softhsm/tokens}
    - {name: softhsm, mountPath: /etc/softhsm, readOnly: true}
YAML
}

# sa_kubeconfig FILE: a kubeconfig that authenticates as the chart's ServiceAccount.
sa_kubeconfig() {
  local out=$1 token server ca
  token=$("$bin/kubectl" create token "$OPERATOR_RELEASE" -n "$OPERATOR_NAMESPACE" --duration=12h)
  server=$("$bin/kubectl" config view --minify -o jsonpath='{.clusters[0].cluster.server}')
  ca=$("$bin/kubectl" config view --minify -o jsonpath='{.clusters[0].cluster.certificate-authority}')
  cat >"$out" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "$server", certificate-authority: "$ca"}
users:
- name: pec-operator
  user: {token: "$token"}
contexts:
- name: pec-operator
  context: {cluster: local, user: pec-operator, namespace: $OPERATOR_NAMESPACE}
current-context: pec-operator
KC
  chmod 600 "$out"
}

# start_operator BINARY KUBECONFIG IDENTITY METRICS_PORT LOGFILE: prints the pid.
start_operator() {
  KUBECONFIG=$2 POD_NAMESPACE=$OPERATOR_NAMESPACE POD_NAME=$3 \
    PEC_METRICS_ADDR=127.0.0.1:$4 PEC_LOG_FORMAT=json RUST_LOG=${RUST_LOG:-info} \
    "$1" run >"$5" 2>&1 &
  echo $!
}

# wait_leader PORT...: until one of the replicas reports pec_leader 1.
wait_leader() {
  local deadline=$((SECONDS + 60)) port
  while [ $SECONDS -lt $deadline ]; do
    for port in "$@"; do
      if curl -fsS "http://127.0.0.1:$port/metrics" 2>/dev/null | grep -q '^pec_leader 1'; then
        return 0
      fi
    done
    sleep 0.2
  done
  echo "no operator replica became leader within 60s" >&2
  return 1
}
