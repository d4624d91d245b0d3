//! Pure status computation for a Site.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Node;

use crate::{
    api::{Site, SiteStatus},
    conditions::{self, Verdict},
};

/// The `Ready` condition type.
pub const READY: &str = "Ready";
/// Reason: at least one node is Ready.
pub const NODES_READY: &str = "NodesReady";
/// Reason: nodes match but none is Ready.
pub const NO_READY_NODES: &str = "NoReadyNodes";
/// Reason: no node matches the selector.
pub const NO_MATCHING_NODES: &str = "NoMatchingNodes";

/// The label selector string for `selector` (`k=v,k2=v2`).
pub fn label_selector(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether a node's `Ready` condition is `True`.
pub fn node_is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The status of `site` given the nodes matching its selector.
pub fn compute(site: &Site, nodes: &[Node], now: DateTime<Utc>) -> SiteStatus {
    let total = nodes.len() as i32;
    let ready = nodes.iter().filter(|n| node_is_ready(n)).count() as i32;
    let verdict = if total == 0 {
        Verdict::new(
            READY,
            false,
            NO_MATCHING_NODES,
            format!(
                "no node has the labels {}; label this data center's nodes or fix spec.nodeSelector",
                label_selector(&site.spec.node_selector)
            ),
        )
    } else if ready == 0 {
        Verdict::new(
            READY,
            false,
            NO_READY_NODES,
            format!("none of {total} nodes is Ready"),
        )
    } else {
        Verdict::new(
            READY,
            true,
            NODES_READY,
            format!("{ready} of {total} nodes Ready"),
        )
    };
    let previous = site
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = site.metadata.generation;
    SiteStatus {
        observed_generation: generation,
        nodes_total: total,
        nodes_ready: ready,
        conditions: conditions::merge(previous, &[verdict], generation, now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SiteSpec;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};

    fn site() -> Site {
        Site::new(
            "dc-it1",
            SiteSpec {
                node_selector: [("topology.kubernetes.io/zone".into(), "dc-it1".into())].into(),
                priority: 0,
                maintenance: false,
            },
        )
    }

    fn node(ready: bool) -> Node {
        Node {
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("valid")
    }

    #[test]
    fn counts_ready_nodes() {
        let s = compute(&site(), &[node(true), node(false), node(true)], now());
        assert_eq!((s.nodes_total, s.nodes_ready), (3, 2));
        assert!(conditions::is_true(&s.conditions, READY));
    }

    #[test]
    fn is_not_ready_without_ready_nodes() {
        let s = compute(&site(), &[node(false)], now());
        assert_eq!(
            conditions::find(&s.conditions, READY).map(|c| c.reason.as_str()),
            Some(NO_READY_NODES)
        );
    }

    #[test]
    fn says_which_labels_matched_nothing() {
        let s = compute(&site(), &[], now());
        let c = conditions::find(&s.conditions, READY).expect("Ready present");
        assert_eq!(c.reason, NO_MATCHING_NODES);
        assert!(c.message.contains("topology.kubernetes.io/zone=dc-it1"));
    }
}
