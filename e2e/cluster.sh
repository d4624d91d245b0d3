#!/usr/bin/env bash
# A real local two-data-center Kubernetes control plane for the demo and the tests.
#
#   e2e/cluster.sh up [NAME] [--real-nodes] [--three-sites] [--audit-operator]
#                                start etcd, kube-apiserver, kube-controller-manager,
#                                kube-scheduler and kwok; create six fake nodes,
#                                three in zone dc-it1 and three in dc-it2; print
#                                `export KUBECONFIG=...`. With --real-nodes also
#                                two real nodes per zone (dc-it1-real-1, -2,
#                                dc-it2-real-1, -2: kubelet, containerd, CNI
#                                bridge, labelled pec.dev/node=real),
#                                kube-proxy and CoreDNS; see lib/nodes.sh
#                                for what the host needs. With --three-sites
#                                the control plane spans three failure
#                                domains: etcd as three members (dc-it1,
#                                dc-it2, witness) and one API server per data
#                                center, each talking to its own data center's
#                                member; `kubeconfig-dc-it1` and
#                                `kubeconfig-dc-it2` reach each, `kubeconfig`
#                                (and the controller manager, scheduler and
#                                kwok) dc-it2's. Components are named in
#                                `pids` (etcd-dc-it1, kube-apiserver-dc-it1...)
#                                so chaos tests can stop them. With
#                                --audit-operator the API server logs every
#                                request of the operator's ServiceAccount,
#                                reads included, to logs/kube-apiserver-audit.log
#                                (the scale benchmark counts them).
#   e2e/cluster.sh down [NAME]   stop what `up` started, by pid, and remove its files
#   e2e/cluster.sh import [NAME] ARCHIVE...
#                                import OCI archives into every real node
#
# NAME (default: pec) lets several clusters run at once; each takes free
# loopback ports. Nodes and pods are simulated by kwok: pods schedule and go
# Running, no container runs. Node status can be driven by hand on nodes
# annotated kwok.x-k8s.io/status=custom (used by the failover tests).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cmd=${1:-}
shift || true
real_nodes=false
three_sites=false
audit_operator=false
args=()
for arg in "$@"; do
  case $arg in
    --real-nodes) real_nodes=true ;;
    --three-sites) three_sites=true ;;
    --audit-operator) audit_operator=true ;;
    *) args+=("$arg") ;;
  esac
done
name=${args[0]:-${PEC_CLUSTER:-pec}}
root=${PEC_CLUSTER_ROOT:-${TMPDIR:-/tmp}/pec-clusters}
dir=$root/$name
shm=/dev/shm/pec-etcd-$name
[ -d /dev/shm ] && [ -w /dev/shm ] || shm=$dir/etcd-data

log() { echo "cluster.sh[$name]: $*" >&2; }

# shellcheck source=lib/common.sh
. "$here/lib/common.sh"
# shellcheck source=lib/nodes.sh
. "$here/lib/nodes.sh"

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      log "timed out after ${limit}s waiting for $what; logs in $dir/logs"
      tail -n 20 "$dir"/logs/*.log >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

start() { # start NAME COMMAND...: run in the background, log, record the pid
  local component=$1; shift
  "$@" >"$dir/logs/$component.log" 2>&1 &
  echo "$! $component" >>"$dir/pids"
}

make_pki() {
  local pki=$dir/pki
  mkdir -p "$pki"
  (
    cd "$pki"
    ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    ec ca.key
    openssl req -x509 -new -key ca.key -subj "/CN=pec-e2e-ca" -days 3650 -out ca.crt \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    sign() { # sign NAME SUBJECT EXTENSIONS
      ec "$1.key"
      openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
      printf '%b' "$3" >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    }
    sign apiserver "/CN=kube-apiserver" \
      "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:$REAL_API_ADDRESS,IP:10.96.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
    sign admin "/O=system:masters/CN=pec-e2e-admin" \
      "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
    openssl pkey -in sa.key -pubout -out sa.pub
  )
}

write_kubeconfig() { # write_kubeconfig FILE API_PORT
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: $name
  cluster:
    server: https://127.0.0.1:$2
    certificate-authority: $dir/pki/ca.crt
users:
- name: admin
  user:
    client-certificate: $dir/pki/admin.crt
    client-key: $dir/pki/admin.key
contexts:
- name: $name
  context: {cluster: $name, user: admin}
current-context: $name
KC
}

write_admission() {
  cat >"$dir/admission.yaml" <<ADM
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: PodSecurity
  configuration:
    apiVersion: pod-security.admission.config.k8s.io/v1
    kind: PodSecurityConfiguration
    # Every namespace enforces the restricted level unless it says otherwise.
    defaults:
      enforce: restricted
      enforce-version: latest
      warn: restricted
      warn-version: latest
    exemptions:
      namespaces: [kube-system]
ADM
}

# Who wrote what, for the chaos tests' split-brain checks: writes at the
# Metadata level, reads and the noisy node, lease and event writes not at all.
write_audit_policy() {
  cat >"$dir/audit-policy.yaml" <<POLICY
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  verbs: [get, list, watch]
- level: None
  resources:
  - group: ""
    resources: [nodes, nodes/status, events]
  - group: coordination.k8s.io
    resources: [leases]
  - group: events.k8s.io
    resources: [events]
- level: Metadata
POLICY
}

# Every request of the operator's ServiceAccount, nothing else: what the
# scale benchmark counts.
write_operator_audit_policy() {
  cat >"$dir/audit-policy.yaml" <<POLICY
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: ["system:serviceaccount:pec-system:pec-operator"]
- level: None
POLICY
}

# Six simulated nodes, each with room for 10,000 small pods: the scale
# benchmark runs 10,000 domains' gateways (two per site) on them.
nodes_yaml() {
  local zone i
  for zone in dc-it1 dc-it2; do
    for i in 1 2 3; do
      cat <<NODE
---
apiVersion: v1
kind: Node
metadata:
  name: $zone-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: $zone-node-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    topology.kubernetes.io/zone: $zone
status:
  allocatable: {cpu: "128", memory: 512Gi, pods: "10000"}
  capacity: {cpu: "128", memory: 512Gi, pods: "10000"}
NODE
    done
  done
}

up() {
  if [ -s "$dir/pids" ]; then
    log "already up"
    echo "export KUBECONFIG=$dir/kubeconfig"
    return 0
  fi
  local bin
  bin=$("$here/lib/tools.sh")
  rm -rf "$dir" "$shm"
  mkdir -p "$dir/logs" "$shm"
  echo "$shm" >"$dir/etcd-dir"
  local etcd_port peer_port api_port kcm_port sched_port kwok_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  kcm_port=$(free_port); sched_port=$(free_port); kwok_port=$(free_port)
  make_pki
  write_admission
  local kc=$dir/kubeconfig
  write_kubeconfig "$kc" "$api_port"
  local k="$bin/kubectl --kubeconfig $kc"

  local issuer=https://kubernetes.default.svc.cluster.local
  # Real pods reach the API server through the `kubernetes` Service: it then
  # listens beyond loopback and publishes its endpoint on a bridge address.
  local bind=127.0.0.1 advertise=127.0.0.1 reconciler=none
  if $real_nodes; then
    real_bridges_up
    bind=0.0.0.0 advertise=$REAL_API_ADDRESS reconciler=lease
  fi
  # Only the three-site control plane audits writes (its chaos tests read it).
  local audit=()
  if $three_sites; then
    write_audit_policy
    audit=(--audit-policy-file "$dir/audit-policy.yaml" --audit-log-format json)
  elif $audit_operator; then
    write_operator_audit_policy
    audit=(--audit-policy-file "$dir/audit-policy.yaml" --audit-log-format json)
  fi
  # start_apiserver COMPONENT PORT ETCD_URL
  start_apiserver() {
    local audit_log=()
    [ ${#audit[@]} -eq 0 ] || audit_log=(--audit-log-path "$dir/logs/$1-audit.log")
    start "$1" "$bin/kube-apiserver" \
      --etcd-servers "$3" \
      --bind-address "$bind" --advertise-address "$advertise" --secure-port "$2" \
      --endpoint-reconciler-type "$reconciler" --kubelet-preferred-address-types InternalIP \
      --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
      --client-ca-file "$dir/pki/ca.crt" \
      --service-account-issuer "$issuer" --api-audiences "$issuer" \
      --service-account-key-file "$dir/pki/sa.pub" --service-account-signing-key-file "$dir/pki/sa.key" \
      --authorization-mode RBAC \
      --admission-control-config-file "$dir/admission.yaml" \
      "${audit[@]}" "${audit_log[@]}" \
      --service-cluster-ip-range 10.96.0.0/16 \
      --allow-privileged=false --profiling=false
  }
  if $three_sites; then
    # One etcd member per failure domain; each data center's API server
    # talks to its own member only, as it would across a real WAN.
    local member entry members=() cluster_urls=()
    declare -A client_port
    for member in dc-it1 dc-it2 witness; do
      client_port[$member]=$(free_port)
      local peer
      peer=$(free_port)
      members+=("$member:$peer")
      cluster_urls+=("$member=http://127.0.0.1:$peer")
    done
    local initial
    initial=$(IFS=,; echo "${cluster_urls[*]}")
    for entry in "${members[@]}"; do
      member=${entry%%:*}
      mkdir -p "$shm/$member"
      start "etcd-$member" "$bin/etcd" --name "$member" --data-dir "$shm/$member" --unsafe-no-fsync \
        --listen-client-urls "http://127.0.0.1:${client_port[$member]}" \
        --advertise-client-urls "http://127.0.0.1:${client_port[$member]}" \
        --listen-peer-urls "http://127.0.0.1:${entry#*:}" --initial-advertise-peer-urls "http://127.0.0.1:${entry#*:}" \
        --initial-cluster "$initial" --initial-cluster-state new --log-level warn
    done
    for member in dc-it1 dc-it2 witness; do
      wait_for 30 "etcd $member" curl -fsS "http://127.0.0.1:${client_port[$member]}/health"
    done
    local site port
    for site in dc-it1 dc-it2; do
      port=$(free_port)
      start_apiserver "kube-apiserver-$site" "$port" "http://127.0.0.1:${client_port[$site]}"
      write_kubeconfig "$dir/kubeconfig-$site" "$port"
      wait_for 90 "kube-apiserver of $site" "$bin/kubectl" --kubeconfig "$dir/kubeconfig-$site" get --raw /readyz
    done
    cp "$dir/kubeconfig-dc-it2" "$kc"
  else
    # An 8 GiB quota, not the default 2 GiB: the scale benchmark's 10,000
    # domains, their pods and Events outgrow 2 GiB between compactions.
    start etcd "$bin/etcd" --name default --data-dir "$shm" --unsafe-no-fsync \
      --quota-backend-bytes 8589934592 \
      --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
      --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
      --initial-cluster "default=http://127.0.0.1:$peer_port" --log-level warn
    wait_for 30 etcd curl -fsS "http://127.0.0.1:$etcd_port/health"
    start_apiserver kube-apiserver "$api_port" "http://127.0.0.1:$etcd_port"
    wait_for 90 kube-apiserver $k get --raw /readyz
  fi

  # Real nodes that lose power go NotReady after 16 s (their kubelets renew
  # every 3 s), not the default 50 s: a data-center loss test stays short.
  local node_monitor=()
  $real_nodes && node_monitor=(--node-monitor-grace-period 16s --node-monitor-period 2s)
  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$kc" --authentication-kubeconfig "$kc" --authorization-kubeconfig "$kc" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --leader-elect=false \
    --root-ca-file "$dir/pki/ca.crt" --service-account-private-key-file "$dir/pki/sa.key" \
    --use-service-account-credentials=false --cluster-name "$name" \
    "${node_monitor[@]}" \
    --kube-api-qps 200 --kube-api-burst 400 --concurrent-deployment-syncs 10 --concurrent-replicaset-syncs 10 \
    --profiling=false
  start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$kc" --authentication-kubeconfig "$kc" --authorization-kubeconfig "$kc" \
    --bind-address 127.0.0.1 --secure-port "$sched_port" --leader-elect=false --profiling=false \
    --kube-api-qps 200 --kube-api-burst 400
  start kwok "$bin/kwok" --kubeconfig "$kc" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --config "$here/kwok-stages.yaml" \
    --cidr 10.0.0.1/24 --node-ip 10.0.0.1 --node-lease-duration-seconds 40 \
    --server-address "127.0.0.1:$kwok_port"

  nodes_yaml | $k apply -f - >/dev/null
  wait_for 60 "six Ready nodes" $k wait --for=condition=Ready node --all --timeout=2s
  wait_for 60 "the default ServiceAccount" $k get serviceaccount default -n default
  if $real_nodes; then
    real_nodes_up "$kc"
  fi
  log "up: apiserver https://127.0.0.1:$api_port, logs in $dir/logs"
  echo "export KUBECONFIG=$kc"
}

down() {
  if [ -f "$dir/pids" ]; then
    local pid component
    # Reverse start order: kwok and controllers first, etcd last.
    tac "$dir/pids" | while read -r pid component; do
      kill "$pid" 2>/dev/null || true
    done
    local deadline=$((SECONDS + 15))
    while read -r pid component; do
      while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    done <"$dir/pids"
  fi
  if [ -d "$dir/nodes" ]; then
    local bin
    bin=$("$here/lib/tools.sh")
    real_nodes_down
  fi
  if [ -f "$dir/etcd-dir" ]; then rm -rf "$(cat "$dir/etcd-dir")"; fi
  rm -rf "$dir"
  log "down"
}

import_archives() {
  [ -d "$dir/nodes" ] || { log "no real nodes (start with: up $name --real-nodes)"; return 1; }
  local archive
  for archive in "${args[@]:1}"; do import_image "$archive"; done
}

case "$cmd" in
  up) up ;;
  down) down ;;
  import) import_archives ;;
  *) echo "usage: $0 up [NAME] [--real-nodes] [--three-sites] | down [NAME] | import NAME ARCHIVE..." >&2; exit 2 ;;
esac
