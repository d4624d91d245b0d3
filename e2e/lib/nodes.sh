# Real nodes for the local cluster: two per data center (zones dc-it1 and
# dc-it2, as PEC wants every service on two machines in each), each a
# kubelet with a containerd of its own, pods on a bridge of their own, and
# one kube-proxy and one cluster DNS (CoreDNS, on the first bridge's
# address) for the host they share. Sourced by cluster.sh, which sets
# `dir`, `bin`, `name` and defines `start`, `log` and `wait_for`.
#
# What the host needs (Linux, root, as in a CI container):
#   containerd and runc, the CNI plugins in /usr/lib/cni (Debian's
#   containerd, runc and containernetworking-plugins), iptables with a
#   working nat table, ip_forward on, and writable cgroup v1 or v2 mounts.
# This machine runs cgroup v1, which kubelet refuses unless its
# configuration says `failCgroupV1: false`; it also cannot give processes a
# negative oom_score_adj, so containerd clamps what kubelet asks for
# (`restrict_oom_score_adj`). No registry is reachable: every image, the
# sandbox (`pause`) included, is imported into each node's containerd.

REAL_NODES=(dc-it1-real-1 dc-it1-real-2 dc-it2-real-1 dc-it2-real-2)
zone_of() { echo "${1%-real-*}"; }
# The sandbox image every node runs pods in (built by tools.sh, imported by
# real_nodes_up under exactly this name).
PAUSE_IMAGE=docker.io/pec/pause:1
# The host address pods reach the API server on: the gateway address of the
# first node's bridge, which exists before any pod does. Each node's kubelet
# listens on (and reports as its InternalIP) its own bridge's address.
REAL_API_ADDRESS=10.244.1.1

node_dir() { echo "$dir/nodes/$1"; }
node_socket() { echo "$(node_dir "$1")/containerd.sock"; }

# real_bridges_up: a bridge per node, made before the API server starts so it
# can advertise an address pods reach.
real_bridges_up() {
  local i=0 node bridge
  for node in "${REAL_NODES[@]}"; do
    i=$((i + 1))
    bridge=pecbr$i
    ip link show "$bridge" >/dev/null 2>&1 || ip link add "$bridge" type bridge
    ip addr replace "10.244.$i.1/24" dev "$bridge"
    ip link set "$bridge" up
    echo "$bridge" >>"$dir/bridges"
  done
}

write_containerd_config() { # write_containerd_config NODE
  local nd
  nd=$(node_dir "$1")
  cat >"$nd/containerd.toml" <<TOML
version = 2
root = "$nd/containerd/root"
state = "$nd/containerd/state"
[grpc]
  address = "$nd/containerd.sock"
[ttrpc]
  address = "$nd/containerd.ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$nd/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nd/cni"
TOML
}

write_cni_config() { # write_cni_config NODE INDEX
  local nd
  nd=$(node_dir "$1")
  mkdir -p "$nd/cni"
  cat >"$nd/cni/10-pec.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "pec-$1",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "pecbr$2",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$nd/ipam",
        "ranges": [[{"subnet": "10.244.$2.0/24", "gateway": "10.244.$2.1"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
}

write_kubelet_config() { # write_kubelet_config NODE INDEX PORT HEALTHZ_PORT
  local nd
  nd=$(node_dir "$1")
  cat >"$nd/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /pec-$name-$1
podLogsDir: $nd/pod-logs
containerRuntimeEndpoint: unix://$nd/containerd.sock
address: 10.244.$2.1
port: $3
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $4
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
failSwapOn: false
nodeLeaseDurationSeconds: 12
nodeStatusUpdateFrequency: 4s
resolvConf: ""
clusterDNS: [$REAL_API_ADDRESS]
clusterDomain: cluster.local
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard: {}
enforceNodeAllocatable: []
localStorageCapacityIsolation: false
YAML
}

# cgroup_root_up NODE: the node's own cgroup root in every v1 hierarchy (or
# the unified one), so two kubelets on one host never share pods' cgroups.
cgroup_root_up() {
  local controller
  for controller in /sys/fs/cgroup/*/; do
    [ -d "$controller" ] && mkdir -p "$controller/pec-$name-$1" 2>/dev/null || true
  done
  [ -f /sys/fs/cgroup/cgroup.controllers ] && mkdir -p "/sys/fs/cgroup/pec-$name-$1" || true
}

# import_image_into NODE ARCHIVE: into the node's containerd (namespace k8s.io).
import_image_into() {
  ctr --address "$(node_socket "$1")" -n k8s.io images import "$2" >/dev/null
}

# import_image ARCHIVE: into every real node.
import_image() {
  local node
  for node in "${REAL_NODES[@]}"; do import_image_into "$node" "$1"; done
}

# real_nodes_up KUBECONFIG: containerd, CNI and kubelet for every node, the
# pause image in each, one kube-proxy; waits until the nodes are Ready.
real_nodes_up() {
  local kc=$1 i=0 node nd
  local pause_dir="$dir/images"
  mkdir -p "$pause_dir"
  python3 "$here/images/oci.py" --name pause --version 1 --binary "$bin/pause" \
    --out "$pause_dir" --epoch 0 --repo docker.io/pec >/dev/null
  for node in "${REAL_NODES[@]}"; do
    i=$((i + 1))
    nd=$(node_dir "$node")
    mkdir -p "$nd/containerd" "$nd/kubelet" "$nd/pod-logs"
    write_containerd_config "$node"
    write_cni_config "$node" "$i"
    write_kubelet_config "$node" "$i" "$(free_port)" "$(free_port)"
    cgroup_root_up "$node"
    start "containerd-$node" containerd --config "$nd/containerd.toml"
    wait_for 30 "containerd of $node" ctr --address "$nd/containerd.sock" version
    import_image_into "$node" "$pause_dir/pause-1.oci.tar"
    start "kubelet-$node" "$bin/kubelet" --config "$nd/kubelet.yaml" --kubeconfig "$kc" \
      --hostname-override "$node" --node-ip "10.244.$i.1" --root-dir "$nd/kubelet" \
      --cert-dir "$nd/kubelet/pki" \
      --node-labels "topology.kubernetes.io/zone=$(zone_of "$node"),pec.dev/node=real"
  done
  cat >"$dir/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$kc"}
mode: iptables
hostnameOverride: ${REAL_NODES[0]}
clusterCIDR: 10.244.0.0/16
iptables: {masqueradeAll: true}
conntrack: {maxPerCore: 0}
metricsBindAddress: 127.0.0.1:$(free_port)
healthzBindAddress: 127.0.0.1:$(free_port)
YAML
  start kube-proxy "$bin/kube-proxy" --config "$dir/kube-proxy.yaml"
  # The cluster DNS every pod asks (kubelet's clusterDNS): Services and pods
  # under cluster.local, served from the API server's watch; nothing else
  # (this host has no upstream to forward to).
  cat >"$dir/Corefile" <<COREFILE
.:53 {
    bind $REAL_API_ADDRESS
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $kc
        pods insecure
    }
}
COREFILE
  # shellcheck source=../versions.env
  . "$here/versions.env"
  start coredns "$bin/coredns-$COREDNS_VERSION" -conf "$dir/Corefile"
  local k="$bin/kubectl --kubeconfig $kc"
  for node in "${REAL_NODES[@]}"; do
    wait_for 120 "real node $node Ready" $k wait --for=condition=Ready "node/$node" --timeout=2s
  done
}

# real_node_processes NODE: the processes in NODE's cgroups, pods' and
# containers' included.
real_node_processes() {
  local controller
  for controller in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    [ -d "$controller/pec-$name-$1" ] || continue
    find "$controller/pec-$name-$1" -name cgroup.procs -exec cat {} + 2>/dev/null || true
  done | sort -u
}

# real_nodes_down: what containerd left behind (shims, the containers
# themselves, mounts, bridges, the kube-proxy rules), after cluster.sh
# stopped the processes by pid.
real_nodes_down() {
  pkill -f "containerd-shim.*$dir/nodes" 2>/dev/null || true
  # A shim's death does not end its container: its processes, reparented,
  # are found by their node's cgroups.
  local node pids
  for node in "${REAL_NODES[@]}"; do
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      pids=$(real_node_processes "$node")
      [ -n "$pids" ] || break
      # shellcheck disable=SC2086 # one pid per word
      kill -KILL $pids 2>/dev/null || true
      sleep 0.5
    done
  done
  "$bin/kube-proxy" --cleanup >/dev/null 2>&1 || true
  local mount
  for mount in $(awk -v d="$dir/nodes" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$mount" 2>/dev/null || true
  done
  if [ -f "$dir/bridges" ]; then
    while read -r bridge; do ip link delete "$bridge" 2>/dev/null || true; done <"$dir/bridges"
  fi
  local controller
  for node in "${REAL_NODES[@]}"; do
    for controller in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
      find "$controller/pec-$name-$node" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
  done
}
