//go:build tools

// Package tools pins the Kubernetes commands the local test cluster is built
// from. It is never compiled into anything; `go build` is pointed at the
// imported command packages by e2e/lib/tools.sh.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"

	_ "go.etcd.io/etcd/server/v3"
)
