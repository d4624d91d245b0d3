#!/usr/bin/env bash
# Every test of the project: formatting and lints, unit tests, the chart, then
# the end-to-end tests against a local two-site cluster this script starts and
# stops. The one command CI runs (.ci/run).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/.."

step() { echo; echo "== $*"; }

step "prerequisites"
# shellcheck source=lib/prereqs.sh
. "$here/lib/prereqs.sh"
ensure_prereqs

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --features e2e --quiet -- -D warnings

step "unit tests (operator, pec-core, pec-gateway)"
cargo test --workspace --lib --bins

step "SoftHSM2 token"
# shellcheck source=lib/hsm.sh
. "$here/lib/hsm.sh"
hsm_dir=$(mktemp -d "${TMPDIR:-/tmp}/pec-e2e-hsm.XXXXXX")
init_hsm "$hsm_dir"

step "gateway: two real gateways, SMTP, signatures in the token, clamd"
# A token of their own: SoftHSM2's file store is shared by every process that
# opens it, and the gateway tests write many keys.
gateway_hsm_dir=$(mktemp -d "${TMPDIR:-/tmp}/pec-gateway-hsm.XXXXXX")
(init_hsm "$gateway_hsm_dir" && cargo test -p pec-gateway --test gateway -- --test-threads 4)
rm -rf "$gateway_hsm_dir"

step "images: built twice without a daemon, same digest, complete"
"$here/images/check.sh" --profile debug all

step "local cluster"
bin=$("$here/lib/tools.sh")
export PATH="$bin:$PATH"
# The Prometheus 3 and promtool the rules, scrape and alert tests run.
# shellcheck source=versions.env
. "$here/versions.env"
export PEC_E2E_PROMETHEUS="$bin/prometheus-$PROMETHEUS_VERSION" PEC_E2E_PROMTOOL="$bin/promtool-$PROMETHEUS_VERSION"
# shellcheck source=lib/operator.sh
. "$here/lib/operator.sh"
cluster=test-$$
pids=()
cleanup() {
  local code=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  # Replicas the disruptive tests restarted.
  if [ -n "${logs:-}" ] && [ -f "$logs/extra-pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$logs/extra-pids"
  fi
  if [ $code -ne 0 ] && [ -n "${logs:-}" ]; then
    echo "== operator logs (last lines)"; tail -n 30 "$logs"/operator-*.log 2>/dev/null || true
  fi
  "$here/cluster.sh" down "$cluster" || true
  [ -z "${cp_cluster:-}" ] || "$here/cluster.sh" down "$cp_cluster" || true
  rm -rf "${hsm_dir:-/nonexistent}" "${gateway_hsm_dir:-/nonexistent}" "${real_hsm:-/nonexistent}"
  exit $code
}
trap cleanup EXIT
eval "$("$here/cluster.sh" up "$cluster")"
logs=$(mktemp -d "${TMPDIR:-/tmp}/pec-e2e-logs.XXXXXX")

step "chart: helm lint, rendered chart accepted by the API server"
helm lint --strict charts/pec-operator
# Every optional template rendered: the PrometheusRules (with this release's
# runbook base and severities), the ServiceMonitor, the dashboard.
all_on=(--set metrics.serviceMonitor.enabled=true --set sla.prometheusRule.enabled=true
  --set alerts.prometheusRule.enabled=true --set dashboard.enabled=true
  --set alerts.runbookBaseUrl=https://runbooks.provider.example/pec --set alerts.severities.critical=page)
helm lint --strict charts/pec-operator "${all_on[@]}"
# Offline rendering needs the cluster's version (the chart's kubeVersion).
kube_version=$(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')
rendered=$(helm template "$OPERATOR_RELEASE" charts/pec-operator --kube-version "$kube_version" \
  --namespace "$OPERATOR_NAMESPACE" "${all_on[@]}")
for want in "kind: ServiceMonitor" "honorLabels: true" "name: $OPERATOR_RELEASE-operational" "kind: PodDisruptionBudget" \
    "runbook_url: https://runbooks.provider.example/pec#pecsitedown" "severity: page"; do
  grep -qF "$want" <<<"$rendered" || { echo "helm template with every toggle on: no '$want'" >&2; exit 1; }
done
if grep -qF "pec-operator.example" <<<"$rendered"; then
  echo "helm template: the default runbook base is left in the rules" >&2; exit 1
fi
kubectl create namespace "$OPERATOR_NAMESPACE" >/dev/null
helm template "$OPERATOR_RELEASE" charts/pec-operator --kube-version "$kube_version" --namespace "$OPERATOR_NAMESPACE" --include-crds \
  | kubectl apply --dry-run=server -f - >/dev/null
# The optional templates against the Prometheus Operator's own CRDs: every
# toggle on, checked by the API server's schema validation.
kubectl apply --server-side -f "$bin/../crds/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/" >/dev/null
kubectl wait --for condition=Established --timeout=60s \
  crd/servicemonitors.monitoring.coreos.com crd/prometheusrules.monitoring.coreos.com >/dev/null
kubectl apply --dry-run=server --validate=strict -f - <<<"$rendered" >/dev/null

step "chart: helm upgrade leaves crds/ alone; the README's CRD step upgrades them"
check_crd_upgrade
install_chart

step "operator: two replicas under the chart's ServiceAccount"
operator=$(build_operator)
sa_kubeconfig "$logs/operator.kubeconfig"
port_a=$(free_port); port_b=$(free_port)
pids+=("$(start_operator "$operator" "$logs/operator.kubeconfig" replica-a "$port_a" "$logs/operator-a.log")")
wait_leader "$port_a"
pids+=("$(start_operator "$operator" "$logs/operator.kubeconfig" replica-b "$port_b" "$logs/operator-b.log")")
curl -fsS --retry 50 --retry-delay 0 --retry-connrefused -o /dev/null "http://127.0.0.1:$port_b/healthz"

step "a gateway binary and a clamd for the tests that carry PEC mail"
(cd "$here/.." && cargo build --quiet -p pec-gateway --bin pec-gateway)
export PEC_E2E_GATEWAY="${CARGO_TARGET_DIR:-$here/../target}/debug/pec-gateway"
# shellcheck source=lib/clamd.sh
. "$here/lib/clamd.sh"
start_clamd "$logs/clamd"
pids+=("$CLAMD_PID")

step "end-to-end tests"
export PEC_E2E_METRICS_PORTS="$port_a,$port_b" PEC_E2E_LOGS="$logs"
export PEC_E2E_OPERATOR="$operator" PEC_E2E_OPERATOR_KUBECONFIG="$logs/operator.kubeconfig"
# E2E_FILTER=NAME runs only the end-to-end tests whose names contain NAME
# (a quicker loop while working on one area; CI runs everything).
filter=${E2E_FILTER:-}
cargo test --features e2e --test e2e -- --test-threads 4 --skip disruptive:: --skip real_nodes:: --skip real_loss:: --skip control_plane:: $filter

step "end-to-end tests that stop an operator replica (alone, last)"
cargo test --features e2e --test e2e -- --test-threads 1 --skip real_nodes:: --skip real_loss:: --skip control_plane:: "disruptive::$filter"

step "three failure domains: a data center's control plane partitioned, stalled, lost (alone)"
# The two-site cluster is done: its replicas and processes go first.
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
"$here/cluster.sh" down "$cluster"
cp_cluster=cp-$$
eval "$("$here/cluster.sh" up "$cp_cluster" --three-sites)"
cp_dir=$(dirname "$KUBECONFIG")
install_chart
for site in dc-it1 dc-it2; do
  KUBECONFIG="$cp_dir/kubeconfig-$site" sa_kubeconfig "$logs/operator-$site.kubeconfig"
done
export PEC_E2E_CP_DIR="$cp_dir"
cargo test --features e2e --test e2e -- --test-threads 1 control_plane:: --skip control_plane::losing_dc_it1
# Last: it leaves dc-it1's etcd member and API server dead.
cargo test --features e2e --test e2e -- --test-threads 1 control_plane::losing_dc_it1
"$here/cluster.sh" down "$cp_cluster"

step "real nodes: helm install runs the operator image on kubelet and containerd"
# shellcheck source=lib/nodes.sh
. "$here/lib/nodes.sh"
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
"$here/cluster.sh" down "$cluster"
cluster=real-$$
eval "$("$here/cluster.sh" up "$cluster" --real-nodes)"
images="$logs/images"
"$here/images/build.sh" --profile debug --out "$images" all >/dev/null
"$here/cluster.sh" import "$cluster" "$images"/pec-operator-*.oci.tar "$images"/pec-gateway-*.oci.tar
# The pods' token (operator and gateways): a SoftHSM2 directory of its own,
# on a volume, its token labelled as the examples' SigningKeys say; the
# platform's clamd on the first node's bridge address.
real_hsm=$(mktemp -d "${TMPDIR:-/tmp}/pec-real-hsm.XXXXXX")
export PEC_E2E_HSM_TOKEN=pec-hsm-1
init_hsm "$real_hsm"
start_clamd "$logs/clamd-real" "$REAL_API_ADDRESS"
pids+=("$CLAMD_PID")
install_chart_on_real_nodes "$real_hsm/tokens" "$PEC_E2E_CLAMD"
export PEC_E2E_REAL_TOKENS="$real_hsm/tokens" PEC_E2E_REAL_NODES=1
export PEC_E2E_CLUSTER_DIR="${PEC_CLUSTER_ROOT:-${TMPDIR:-/tmp}/pec-clusters}/$cluster"
# --nocapture: the rotation test's session figures belong in every log.
cargo test --features e2e --test e2e -- --test-threads 1 --nocapture "real_nodes::$filter"

step "real nodes: a data center loses power under PEC traffic (last: it leaves dc-it1 dead)"
cargo test --features e2e --test e2e -- --test-threads 1 --nocapture "real_loss::$filter"
