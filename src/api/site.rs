//! `Site`: a data center, the nodes that belong to it, and its health.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A data center of the PEC platform: which nodes belong to it, its failover
/// preference, and whether it is in maintenance.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pec.dev",
    version = "v1alpha1",
    kind = "Site",
    status = "SiteStatus",
    shortname = "pecsite",
    category = "pec",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Nodes-Ready","type":"integer","jsonPath":".status.nodesReady"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.nodesTotal"}"#,
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Maintenance","type":"boolean","jsonPath":".spec.maintenance"}"#,
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

    /// Planned maintenance: the site is taken out of serving while its pods keep running.
    #[serde(default)]
    pub maintenance: bool,
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
    /// `Ready`: the site has at least one Ready node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
