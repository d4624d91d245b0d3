#!/usr/bin/env bash
# The demo: build, start a local two-data-center cluster, install the chart,
# run the operator under the chart's ServiceAccount with a SoftHSM2 token,
# apply examples/, wait until every SigningKey and MailDomain is Ready, and
# show what runs where.
#
#   ./e2e/demo.sh          start (or restart) the demo
#   ./e2e/demo.sh down     stop the operator and the cluster
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/.."
cluster=demo
state=${TMPDIR:-/tmp}/pec-demo

if [ "${1:-}" = "down" ]; then
  if [ -f "$state/operator.pid" ]; then kill "$(cat "$state/operator.pid")" 2>/dev/null || true; fi
  "$here/cluster.sh" down "$cluster"
  rm -rf "$state"
  exit 0
fi

# shellcheck source=lib/prereqs.sh
. "$here/lib/prereqs.sh"
ensure_prereqs
bin=$("$here/lib/tools.sh")
export PATH="$bin:$PATH"
# shellcheck source=lib/operator.sh
. "$here/lib/operator.sh"
echo "== building the operator"
operator=$(build_operator)

echo "== initialising a SoftHSM2 token (the HSM the signing keys live in)"
# shellcheck source=lib/hsm.sh
. "$here/lib/hsm.sh"
rm -rf "$state/hsm"
PEC_E2E_HSM_TOKEN=pec-hsm-1 init_hsm "$state/hsm"

echo "== starting the local cluster (two sites, three kwok nodes each)"
if [ -f "$state/operator.pid" ]; then kill "$(cat "$state/operator.pid")" 2>/dev/null || true; fi
"$here/cluster.sh" down "$cluster" >/dev/null 2>&1 || true
eval "$("$here/cluster.sh" up "$cluster")"
mkdir -p "$state"

echo "== installing the chart (CRDs, ServiceAccount, least-privilege RBAC)"
install_chart
sa_kubeconfig "$state/operator.kubeconfig"
port=$(free_port)
start_operator "$operator" "$state/operator.kubeconfig" demo-operator "$port" "$state/operator.log" >"$state/operator.pid"
wait_leader "$port"

echo "== applying examples/"
kubectl apply -f examples/00-namespace.yaml >/dev/null
# The PIN goes from the shell into a Secret; it is never printed.
kubectl -n pec-mail create secret generic hsm-pin --from-literal=pin="$PEC_E2E_HSM_PIN" >/dev/null
# The domains' ReadWriteMany stores: here a directory of this machine each,
# standing in for the network storage a platform provides.
for claim in example-standard-mail example-ufficio-mail; do
  mkdir -p "$state/stores/$claim"
  kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: pec-demo-$claim}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteMany]
  storageClassName: ""
  hostPath: {path: "$state/stores/$claim", type: Directory}
  claimRef: {namespace: pec-mail, name: $claim}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $claim, namespace: pec-mail}
spec:
  accessModes: [ReadWriteMany]
  storageClassName: ""
  volumeName: pec-demo-$claim
  resources: {requests: {storage: 1Gi}}
YAML
done
# The TLS certificate both example domains present (self-signed here), and
# their mailboxes (in the demo nobody logs in: `!` instead of a hash).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj /CN=pec.example.it -addext subjectAltName=DNS:pec.example.it,DNS:ufficio.pec.example.it \
  -keyout "$state/tls.key" -out "$state/tls.crt" 2>/dev/null
kubectl -n pec-mail create secret tls pec-example-tls --cert="$state/tls.crt" --key="$state/tls.key" >/dev/null
kubectl -n pec-mail create secret generic example-standard-mailboxes --from-literal=mailboxes=$'mario:!\n' >/dev/null
kubectl -n pec-mail create secret generic example-ufficio-mailboxes --from-literal=mailboxes=$'protocollo:!\n' >/dev/null
kubectl apply -f examples/ >/dev/null
kubectl wait --for=condition=Ready --timeout=120s -n pec-mail signingkey --all >/dev/null
kubectl wait --for=condition=Ready --timeout=120s -n pec-mail maildomain --all >/dev/null
kubectl wait --for=condition=NoHealthySite=false --timeout=60s -n pec-mail maildomain --all >/dev/null
kubectl wait --for=jsonpath='{.status.state}'=Met --timeout=60s -n pec-mail slatarget --all >/dev/null

echo
echo "== kubectl get pec -A"
kubectl get pec -A
echo
echo "== signing keys (in the token, never outside it) and their published certificates"
kubectl get signingkeys -n pec-mail
kubectl get secret,configmap -n pec-mail -l pec.dev/signingkey
echo
echo "== pec-operator sla report -n pec-mail"
"$operator" sla report -n pec-mail
echo
echo "== gateway pods per node"
kubectl get pods -n pec-mail -o custom-columns='POD:.metadata.name,DOMAIN:.metadata.labels.pec\.dev/maildomain,SITE:.metadata.labels.pec\.dev/site,NODE:.spec.nodeName,PHASE:.status.phase' --sort-by=.spec.nodeName
echo
cat <<MSG
The demo is running: operator metrics on http://127.0.0.1:$port/metrics,
operator log in $state/operator.log. To look around:
  export KUBECONFIG=$KUBECONFIG PATH=$bin:\$PATH
  kubectl describe maildomain -n pec-mail example-standard
To stop it:
  ./e2e/demo.sh down
MSG
