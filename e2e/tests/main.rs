//! End-to-end tests against a real local control plane.
//!
//! `e2e/test.sh` starts the cluster (e2e/cluster.sh), installs the chart and
//! runs two operator replicas under the chart's ServiceAccount, then runs
//! these tests with `KUBECONFIG` pointing at the cluster as admin. Each test
//! works in its own namespace and waits on conditions, never on sleeps.

mod control_plane;
#[path = "../support/datacenter.rs"]
mod datacenter;
mod disruptive;
mod failover;
mod harness;
mod hsm;
mod maildomain;
mod operator;
mod prometheus;
mod real_loss;
mod real_nodes;
mod round_trip;
mod signing;
mod sla;
#[path = "../support/stats.rs"]
mod stats;
mod validation;
