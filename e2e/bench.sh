#!/usr/bin/env bash
# Benchmarks that need a cluster: starts a local cluster and the operator
# (release build, under the chart's ServiceAccount), runs the benchmark
# programs, prints their figures, and tears everything down.
#
#   ./e2e/bench.sh                      (PEC_BENCH_DOMAINS=200 by default)
#   PEC_BENCH_DOMAINS=200,1000 PEC_BENCH_ONLY=rollout ./e2e/bench.sh
#
# The rollout benchmark also counts the operator's requests (the API server
# audits them) and the writes of one resync period (the operator runs with
# --resync-seconds $PEC_BENCH_RESYNC_SECONDS, 60 by default), and reads its
# memory, then measures what its caches hold of those domains, kind by
# kind (cache_memory). PEC_BENCH_ONLY=rollout skips the other benchmarks.
# PEC_BENCH_OPERATOR_WRAPPER runs the operator under a command, for example
# a profiler: PEC_BENCH_OPERATOR_WRAPPER="perf record -g -o /tmp/op.data" (its
# figures are then the profiler's, not the operator's alone).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/.."
# shellcheck source=lib/prereqs.sh
. "$here/lib/prereqs.sh"
ensure_prereqs
bin=$("$here/lib/tools.sh")
export PATH="$bin:$PATH"
# shellcheck source=lib/operator.sh
. "$here/lib/operator.sh"
cluster=bench-$$
pid=
cleanup() {
  if [ -n "$pid" ]; then
    kill -STOP "$pid" 2>/dev/null || true
    pkill -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  fi
  "$here/cluster.sh" down "$cluster" >/dev/null 2>&1 || true
}
trap cleanup EXIT
cargo build --release --quiet --bin pec-operator
cargo bench --no-run --quiet --bench rollout --bench cache_memory --bench failover --bench hsm --bench sla 2>/dev/null
eval "$("$here/cluster.sh" up "$cluster" --audit-operator)"
install_chart
state=$(mktemp -d "${TMPDIR:-/tmp}/pec-bench.XXXXXX")
sa_kubeconfig "$state/operator.kubeconfig"
port=$(free_port)
export PEC_BENCH_RESYNC_SECONDS=${PEC_BENCH_RESYNC_SECONDS:-60}
# Restarted whenever it exits, as its Deployment's pod would be: under an
# overloaded API server a leader that cannot renew in time exits by design.
operator_binary="${CARGO_TARGET_DIR:-target}/release/pec-operator"
(
  while true; do
    # shellcheck disable=SC2086 # the wrapper is a command and its arguments
    KUBECONFIG=$state/operator.kubeconfig POD_NAMESPACE=$OPERATOR_NAMESPACE POD_NAME=bench \
      PEC_METRICS_ADDR=127.0.0.1:$port PEC_LOG_FORMAT=json RUST_LOG=warn \
      PEC_RESYNC_SECONDS=$PEC_BENCH_RESYNC_SECONDS ${PEC_BENCH_OPERATOR_WRAPPER:-} "$operator_binary" run >>"$state/operator.log" 2>&1 || true
    echo "bench.sh: the operator exited; restarting it" >>"$state/operator.log"
    sleep 1
  done
) &
pid=$!
wait_leader "$port"
PEC_BENCH_AUDIT_LOG=$(dirname "$KUBECONFIG")/logs/kube-apiserver-audit.log
export PEC_BENCH_AUDIT_LOG PEC_BENCH_OPERATOR_PORT=$port
if [ "${PEC_BENCH_ONLY:-}" != rollout ]; then
  # shellcheck source=lib/hsm.sh
  . "$here/lib/hsm.sh"
  init_hsm "$state/hsm"
  cargo bench --quiet --bench hsm
  # The gateway end to end (needs the token, clamd and, for its second
  # floor, postfix; not the cluster).
  install_missing /usr/sbin/postfix:postfix
  cargo bench --quiet -p pec-gateway --bench pec_e2e
  cargo bench --quiet --bench sla
  cargo bench --quiet --bench failover
fi
cargo bench --quiet --bench rollout
# What the operator's caches hold of the domains the rollout left.
cargo bench --quiet --bench cache_memory
echo "operator restarts during the run: $(grep -c 'the operator exited' "$state/operator.log" || true)"
