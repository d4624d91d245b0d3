#!/usr/bin/env bash
# Benchmark: how long from losing a whole data center, control plane and
# leading operator replica included, to its domain's traffic leaving it.
# Each run starts a fresh three-failure-domain cluster (the loss leaves
# dc-it1's etcd member and API server dead), runs the data-center-loss test
# of e2e/tests/control_plane.rs, and reads the figure it prints; the end
# prints p50, p90, p99 (nearest rank) and the maximum against the bound.
#
#   ./e2e/bench-dc-loss.sh [RUNS]      (default 10; about 50 s a run)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/.."
runs=${1:-10}
# shellcheck source=lib/prereqs.sh
. "$here/lib/prereqs.sh"
ensure_prereqs
bin=$("$here/lib/tools.sh")
export PATH="$bin:$PATH"
# shellcheck source=lib/operator.sh
. "$here/lib/operator.sh"
# shellcheck source=lib/hsm.sh
. "$here/lib/hsm.sh"
state=$(mktemp -d "${TMPDIR:-/tmp}/pec-bench-dc-loss.XXXXXX")
cluster=bench-dc-loss-$$
trap '"$here/cluster.sh" down "$cluster" >/dev/null 2>&1 || true' EXIT
init_hsm "$state/hsm"
export PEC_E2E_OPERATOR
PEC_E2E_OPERATOR=$(build_operator)
cargo test --features e2e --test e2e --no-run --quiet 2>/dev/null
# A cluster that fails to start is no measurement: its log is shown and it
# is started once more; a second failure ends the benchmark.
cluster_up() {
  local env attempt
  for attempt in 1 2; do
    if env=$("$here/cluster.sh" up "$cluster" --three-sites 2>"$state/cluster-up.log"); then
      eval "$env"
      return 0
    fi
    echo "run $run: the cluster did not start (attempt $attempt):" >&2
    tail -n 20 "$state/cluster-up.log" >&2
    "$here/cluster.sh" down "$cluster" >/dev/null 2>&1 || true
  done
  return 1
}
figures=()
for run in $(seq 1 "$runs"); do
  cluster_up || exit 1
  cp_dir=$(dirname "$KUBECONFIG")
  install_chart
  logs="$state/run-$run"
  mkdir -p "$logs"
  for site in dc-it1 dc-it2; do
    KUBECONFIG="$cp_dir/kubeconfig-$site" sa_kubeconfig "$logs/operator-$site.kubeconfig"
  done
  out=$(PEC_E2E_LOGS=$logs PEC_E2E_CP_DIR=$cp_dir cargo test --features e2e --test e2e --quiet -- \
    --test-threads 1 --nocapture control_plane::losing_dc_it1 2>&1) || { echo "$out" >&2; exit 1; }
  figure=$(sed -n 's/.*endpoints switched after \([0-9.]*\)s (bound \([0-9]*\)s).*/\1 \2/p' <<<"$out")
  [ -n "$figure" ] || { echo "$out" >&2; echo "no figure in run $run" >&2; exit 1; }
  echo "run $run: endpoints switched after ${figure% *} s (bound ${figure#* } s)"
  figures+=("$figure")
  "$here/cluster.sh" down "$cluster" >/dev/null 2>&1
done
printf '%s\n' "${figures[@]}" | python3 -c '
import sys
rows = [line.split() for line in sys.stdin if line.strip()]
xs = sorted(float(r[0]) for r in rows)
bound = float(rows[0][1])
def q(p):
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]
# Nearest rank: with fewer than 100 runs p99 is the slowest run.
print(f"data-center loss with its control plane, {len(xs)} runs: p50 {q(0.5):.1f} s, "
      f"p90 {q(0.9):.1f} s, p99 {q(0.99):.1f} s, max {xs[-1]:.1f} s; bound {bound:.0f} s "
      f"(lease 15 s + retry 2 s + health 2 s x 3 + 1 s)")
'
