//! `Site`: a data center, the nodes that belong to it, and its health.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A data center of the PEC platform: which nodes belong to it, its failover
/// preference, and whether it is in maintenance.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "pec.dev",
    version = "v1alpha1",
    kind = "Site",
    status = "SiteStatus",
    shortname = "pecsite",
    category = "pec",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Nodes-Ready","type":"integer","jsonPath":".status.nodesReady"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.nodesTotal"}"#,
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Maintenance","type":"boolean","jsonPath":".spec.maintenance"}"#,
    printcolumn = r#"{"name":"Fenced","type":"boolean","jsonPath":".spec.fenced"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SiteSpec {
    /// Node labels that select this data center's nodes, for example
    /// `topology.kubernetes.io/zone: dc-it1`. Gateway pods of this site are
    /// scheduled only on matching nodes. Must name at least one label.
    #[x_kube(validation = kube::core::Rule::new("size(self) > 0").message(
        "nodeSelector must name at least one label, otherwise the site would claim every node"
    ))]
    pub node_selector: BTreeMap<String, String>,

    /// Failover preference: in active-passive mode the healthy site with the
    /// lowest priority serves. 0 to 1000, default 0.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: i32,

    /// Planned maintenance: the site is taken out of serving (drained) while
    /// its pods keep running. Refused, with the condition `MaintenanceRefused`,
    /// when it would leave a MailDomain with no serving site, unless
    /// `maintenanceForce` is set.
    #[serde(default)]
    pub maintenance: bool,

    /// Allow maintenance even when it leaves a MailDomain with no serving site.
    #[serde(default)]
    pub maintenance_force: bool,

    /// A fenced site serves nothing until a person sets this back to `false`.
    /// Set it by hand to fence; the operator sets it when the site flaps
    /// (`health.fenceAfterFlaps`). To clear:
    /// `kubectl patch site NAME --type merge -p '{"spec":{"fenced":false}}'`.
    #[serde(default)]
    pub fenced: bool,

    /// Health checking and flap protection.
    #[serde(default)]
    pub health: HealthSpec,

    /// Addresses of this data center's load balancers, published as DNS
    /// records (external-dns `DNSEndpoint`) for the domains it serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub load_balancer_addresses: Vec<String>,
}

/// How a Site's health is checked.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HealthSpec {
    /// Seconds between health checks. 1 to 60, default 2.
    #[serde(default = "default_period")]
    #[schemars(range(min = 1, max = 60))]
    pub period_seconds: i32,
    /// Consecutive failed checks after which the site is declared down. 1 to 10, default 3.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 10))]
    pub failure_threshold: i32,
    /// Ready nodes the site needs to be healthy. At least 1, default 1.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 10000))]
    pub min_ready_nodes: i32,
    /// Times the site may go down within `flapWindowSeconds` before it is
    /// fenced. 0 disables fencing; default 3.
    #[serde(default = "default_fence_after_flaps")]
    #[schemars(range(min = 0, max = 100))]
    pub fence_after_flaps: i32,
    /// The window over which flaps are counted, in seconds. Default 900.
    #[serde(default = "default_flap_window")]
    #[schemars(range(min = 1, max = 86400))]
    pub flap_window_seconds: i32,
}

impl Default for HealthSpec {
    fn default() -> Self {
        Self {
            period_seconds: default_period(),
            failure_threshold: default_failure_threshold(),
            min_ready_nodes: one(),
            fence_after_flaps: default_fence_after_flaps(),
            flap_window_seconds: default_flap_window(),
        }
    }
}

fn default_period() -> i32 {
    2
}
fn default_failure_threshold() -> i32 {
    3
}
fn one() -> i32 {
    1
}
fn default_fence_after_flaps() -> i32 {
    3
}
fn default_flap_window() -> i32 {
    900
}

/// Where a Site stands.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SitePhase {
    /// Healthy, every node Ready.
    Serving,
    /// Healthy, some nodes not Ready.
    Degraded,
    /// Declared down after `failureThreshold` failed checks.
    Down,
    /// In maintenance: drained, pods kept.
    Maintenance,
    /// Fenced: serves nothing until cleared.
    Fenced,
}

impl SitePhase {
    /// Whether a site in this phase may serve traffic.
    pub fn is_healthy(self) -> bool {
        matches!(self, SitePhase::Serving | SitePhase::Degraded)
    }
}

/// Observed state of a Site.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SiteStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes matching `spec.nodeSelector`.
    #[serde(default)]
    pub nodes_total: i32,
    /// Matching nodes whose `Ready` condition is `True`.
    #[serde(default)]
    pub nodes_ready: i32,
    /// Of the ready nodes, those that take new pods (not cordoned): what a
    /// rolling update of a gateway may surge onto.
    #[serde(default)]
    pub nodes_schedulable: i32,
    /// `Serving`, `Degraded`, `Down`, `Maintenance` or `Fenced`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SitePhase>,
    /// Why the site is in its phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_reason: Option<String>,
    /// When the phase last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// Since when the site has been healthy without interruption (absent while it is not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since: Option<Time>,
    /// When the site recently went down, within the flap window (for fencing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down_events: Vec<Time>,
    /// `Ready`: the site is healthy and may serve. `MaintenanceRefused`:
    /// requested maintenance was refused because a domain would be left with no site.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
