#!/usr/bin/env bash
# Builds (once per machine and version set) the real Kubernetes components the
# local test cluster runs, and prints the directory that holds them.
#
#   e2e/lib/tools.sh            build if needed, print the bin directory
#
# Everything comes from the Go module proxy through the pinned wrapper module
# in e2e/tools; binaries go to $HOME/.cache/pec-operator/k8s-<key>/bin, where
# the key hashes versions.env, go.mod and go.sum, so a version bump rebuilds
# and nothing built is ever committed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=../versions.env
. "$here/versions.env"

# The key covers what goes into this build only (the tools cached on their
# own below have their version in their file name).
key=$(grep -E '^(K8S|ETCD|KWOK|HELM)_VERSION=' "$here/versions.env" | cat - "$here/tools/go.mod" "$here/tools/go.sum" | sha256sum | cut -c1-16)
cache="${PEC_CACHE_DIR:-$HOME/.cache/pec-operator}/k8s-$key"
bin="$cache/bin"
# kubelet, kube-proxy and pause serve the real nodes (cluster.sh up --real-nodes).
want=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy pause kwok helm)

have_all() {
  local b
  for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done
}

if ! have_all; then
  mkdir -p "$bin"
  log="$cache/build.log"
  echo "building Kubernetes v$K8S_VERSION, etcd v$ETCD_VERSION, kwok v$KWOK_VERSION, helm v$HELM_VERSION into $bin (cold: 10-20 min)" >&2
  major=${K8S_VERSION%%.*}
  minor=${K8S_VERSION#*.}; minor=${minor%%.*}
  stamp=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  (
    cd "$here/tools"
    export CGO_ENABLED=0 GOFLAGS=-mod=mod
    go build -trimpath -ldflags "-s -w$stamp" -o "$bin/" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler \
      k8s.io/kubernetes/cmd/kubectl \
      k8s.io/kubernetes/cmd/kubelet \
      k8s.io/kubernetes/cmd/kube-proxy
    go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
    go build -trimpath -ldflags "-s -w" -o "$bin/pause" ./pause
  ) >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
  # kwok and helm have their own dependency graphs: installed outside the wrapper.
  (
    cd "$cache"
    export CGO_ENABLED=0 GOBIN="$bin"
    go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION"
    go install -trimpath -ldflags "-s -w" "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
  ) >>"$log" 2>&1 || { cat "$log" >&2; exit 1; }
  have_all || { echo "tools.sh: build finished but binaries are missing in $bin" >&2; exit 1; }
fi
# own_build VERSION MODULE@VERSION-SUFFIX CMD...: `go install` the commands
# CMD (packages of one module at one version) and keep each as
# bin/<name>-<VERSION>; each has its own module graph.
own_build() {
  local version=$1 what=$2; shift 2
  local name missing=false
  for name in "$@"; do [ -x "$bin/${name##*/}-$version" ] || missing=true; done
  $missing || return 0
  echo "building $what v$version into $bin (cold: 3-10 min)" >&2
  local log="$cache/build-${what}.log"
  (
    dir=$(mktemp -d)
    trap 'rm -rf "$dir"' EXIT
    export CGO_ENABLED=0 GOBIN="$dir" GOFLAGS=-mod=mod
    local pkgs=()
    for name in "$@"; do pkgs+=("$name@v$version"); done
    go install -trimpath -ldflags "-s -w" "${pkgs[@]}"
    for name in "$@"; do mv "$dir/${name##*/}" "$bin/${name##*/}-$version"; done
  ) >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
}
own_build "$COREDNS_VERSION" coredns github.com/coredns/coredns
own_build "$PROMETHEUS_VERSION" prometheus \
  github.com/prometheus/prometheus/cmd/prometheus github.com/prometheus/prometheus/cmd/promtool
# The Prometheus Operator's own ServiceMonitor and PrometheusRule CRDs, so
# that the chart's optional templates are checked by a real API server
# (test.sh): taken from its Go module, cached as crds/prometheus-operator-<v>.
monitoring="$cache/crds/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION"
if [ ! -s "$monitoring/monitoring.coreos.com_servicemonitors.yaml" ]; then
  module=$(cd "$cache" && GOFLAGS=-mod=mod go mod download -json \
    "github.com/prometheus-operator/prometheus-operator@v$PROMETHEUS_OPERATOR_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  mkdir -p "$monitoring"
  for kind in servicemonitors prometheusrules; do
    cp "$module/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$monitoring/"
  done
fi
echo "$bin"
