//! Pure status computation for a Site.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Node;

use crate::{
    api::{MailDomain, Site, SitePhase, SiteStatus},
    conditions::{self, Verdict},
    failover::health::{Decision, Observation},
};

/// The MailDomains that maintenance of `site` would leave with no serving
/// site: those that list it and serve from no other site.
pub fn blocking_domains(site: &str, domains: &[MailDomain]) -> Vec<String> {
    domains
        .iter()
        .filter(|md| md.spec.sites.iter().any(|s| s == site))
        .filter(|md| {
            let serving = md
                .status
                .as_ref()
                .map(|s| s.serving_sites.as_slice())
                .unwrap_or_default();
            !serving.iter().any(|s| s != site)
        })
        .map(|md| {
            format!(
                "{}/{}",
                md.metadata.namespace.clone().unwrap_or_default(),
                md.spec.domain
            )
        })
        .collect()
}

/// The MailDomains (`namespace/name`) that list `site` and are not being
/// deleted: while there are any, the Site's deletion is refused.
pub fn users(site: &str, domains: &[MailDomain]) -> Vec<String> {
    domains
        .iter()
        .filter(|md| md.metadata.deletion_timestamp.is_none())
        .filter(|md| md.spec.sites.iter().any(|s| s == site))
        .map(|md| {
            format!(
                "{}/{}",
                md.metadata.namespace.clone().unwrap_or_default(),
                md.metadata.name.clone().unwrap_or_default()
            )
        })
        .collect()
}

/// The `Ready` condition type.
pub const READY: &str = "Ready";
/// Reason: at least one node is Ready.
pub const NODES_READY: &str = "NodesReady";
/// Reason: nodes match but none is Ready.
pub const NO_READY_NODES: &str = "NoReadyNodes";
/// Reason: no node matches the selector.
pub const NO_MATCHING_NODES: &str = "NoMatchingNodes";
/// Reason: the site is in maintenance.
pub const IN_MAINTENANCE: &str = "InMaintenance";
/// Reason: the site is fenced.
pub const FENCED: &str = "Fenced";
/// The condition set when requested maintenance is refused.
pub const MAINTENANCE_REFUSED: &str = "MaintenanceRefused";
/// Reason: maintenance would leave domains with no serving site.
pub const WOULD_STRAND_DOMAINS: &str = "WouldLeaveDomainWithoutSite";
/// Reason: nothing refused.
pub const NOT_REFUSED: &str = "NotRefused";
/// Condition: the Site is being deleted but MailDomains still list it.
pub const DELETION_REFUSED: &str = "DeletionRefused";
/// Reason of `DeletionRefused`.
pub const IN_USE: &str = "InUse";

/// The label selector string for `selector` (`k=v,k2=v2`).
pub fn label_selector(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether a node with `labels` matches `selector` (every label given; an
/// empty selector selects every node).
pub fn selected(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a node's `Ready` condition is `True`.
pub fn node_is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Node counts of the nodes matching a site's selector.
pub fn observe(nodes: &[Node]) -> Observation {
    Observation {
        nodes_total: nodes.len() as u32,
        nodes_ready: nodes.iter().filter(|n| node_is_ready(n)).count() as u32,
    }
}

/// How many of `nodes` are ready and take new pods (not cordoned).
pub fn nodes_taking_pods(nodes: &[Node]) -> i32 {
    let cordoned = |n: &Node| n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
    nodes
        .iter()
        .filter(|n| node_is_ready(n) && !cordoned(n))
        .count() as i32
}

/// The status of `site` after a health check that saw `seen` and decided
/// `decision`; `blocking` names the domains that refuse its maintenance.
pub fn compute(
    site: &Site,
    seen: Observation,
    decision: &Decision,
    blocking: &[String],
    users: &[String],
    now: DateTime<Utc>,
) -> SiteStatus {
    let ready = if decision.phase.is_healthy() {
        Verdict::new(READY, true, NODES_READY, decision.reason.clone())
    } else if seen.nodes_total == 0 {
        Verdict::new(
            READY,
            false,
            NO_MATCHING_NODES,
            format!(
                "no node has the labels {}; label this data center's nodes or fix spec.nodeSelector",
                label_selector(&site.spec.node_selector)
            ),
        )
    } else {
        let reason = match decision.phase {
            SitePhase::Maintenance => IN_MAINTENANCE,
            SitePhase::Fenced => FENCED,
            _ => NO_READY_NODES,
        };
        Verdict::new(READY, false, reason, decision.reason.clone())
    };
    let maintenance = if blocking.is_empty() {
        Verdict::new(
            MAINTENANCE_REFUSED,
            false,
            NOT_REFUSED,
            "no maintenance refused",
        )
    } else {
        Verdict::new(
            MAINTENANCE_REFUSED,
            true,
            WOULD_STRAND_DOMAINS,
            format!(
                "maintenance would leave {} with no serving site; bring another site up first, or set spec.maintenanceForce",
                blocking.join(", ")
            ),
        )
    };
    let mut verdicts = vec![ready, maintenance];
    if !users.is_empty() {
        verdicts.push(Verdict::new(
            DELETION_REFUSED,
            true,
            IN_USE,
            format!(
                "deletion waits: MailDomain {} still lists this site; remove it from their spec.sites (their gateways here keep running until then)",
                users.join(", ")
            ),
        ));
    }
    let previous = site.status.clone().unwrap_or_default();
    let generation = site.metadata.generation;
    let mut status = SiteStatus {
        observed_generation: generation,
        nodes_total: seen.nodes_total as i32,
        nodes_ready: seen.nodes_ready as i32,
        conditions: conditions::merge(&previous.conditions, &verdicts, generation, now),
        ..SiteStatus::default()
    };
    decision.apply_to(&mut status);
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::MailDomainStatus,
        controllers::mail_domain::build::tests::domain,
        failover::health::{ProbeState, decide},
    };
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};

    fn site() -> Site {
        crate::controllers::mail_domain::build::tests::site("dc-it1")
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

    fn status_for(site: &Site, nodes: &[Node], blocking: &[String]) -> SiteStatus {
        let seen = observe(nodes);
        let d = decide(
            &site.spec,
            &SiteStatus::default(),
            ProbeState::default(),
            seen,
            !blocking.is_empty(),
            now(),
        );
        compute(site, seen, &d, blocking, &[], now())
    }

    #[test]
    fn a_node_is_selected_when_it_has_every_label_of_the_selector() {
        let labels: BTreeMap<String, String> = [
            (
                "topology.kubernetes.io/zone".to_string(),
                "dc-it1".to_string(),
            ),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
        ]
        .into();
        let zone =
            |v: &str| BTreeMap::from([("topology.kubernetes.io/zone".to_string(), v.to_string())]);
        assert!(selected(&zone("dc-it1"), &labels));
        assert!(!selected(&zone("dc-it2"), &labels));
        assert!(
            selected(&BTreeMap::new(), &labels),
            "an empty selector selects all"
        );
        let mut both = zone("dc-it1");
        both.insert("pec.dev/gateway".into(), "true".into());
        assert!(!selected(&both, &labels), "every label must match");
    }

    #[test]
    fn counts_ready_nodes() {
        let s = status_for(&site(), &[node(true), node(false), node(true)], &[]);
        assert_eq!((s.nodes_total, s.nodes_ready), (3, 2));
        assert_eq!(s.phase, Some(SitePhase::Degraded));
        assert!(conditions::is_true(&s.conditions, READY));
    }

    #[test]
    fn cordoned_and_unready_nodes_take_no_new_pods() {
        let mut cordoned = node(true);
        cordoned.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        assert_eq!(
            nodes_taking_pods(&[node(true), node(false), cordoned, node(true)]),
            2
        );
    }

    #[test]
    fn says_which_labels_matched_nothing() {
        let s = status_for(&site(), &[], &[]);
        let c = conditions::find(&s.conditions, READY).expect("Ready present");
        assert_eq!(c.reason, NO_MATCHING_NODES);
        assert!(c.message.contains("topology.kubernetes.io/zone=dc-it1"));
    }

    #[test]
    fn refused_maintenance_names_the_domains_and_the_way_out() {
        let mut s = site();
        s.spec.maintenance = true;
        let status = status_for(&s, &[node(true)], &["mail/pec.acme.it".to_string()]);
        assert_eq!(status.phase, Some(SitePhase::Serving));
        let c = conditions::find(&status.conditions, MAINTENANCE_REFUSED).expect("condition");
        assert_eq!(c.status, "True");
        assert!(c.message.contains("pec.acme.it") && c.message.contains("maintenanceForce"));
    }

    #[test]
    fn maintenance_is_blocked_only_by_domains_served_from_this_site_alone() {
        let mut alone = domain(&["dc-it1", "dc-it2"]);
        alone.status = Some(MailDomainStatus {
            serving_sites: vec!["dc-it1".into()],
            ..MailDomainStatus::default()
        });
        let mut shared = domain(&["dc-it1", "dc-it2"]);
        shared.status = Some(MailDomainStatus {
            serving_sites: vec!["dc-it1".into(), "dc-it2".into()],
            ..MailDomainStatus::default()
        });
        let elsewhere = domain(&["dc-it2"]);
        assert_eq!(
            blocking_domains("dc-it1", &[alone, shared, elsewhere]),
            ["mail/pec.acme.it"]
        );
    }

    #[test]
    fn deletion_waits_for_the_domains_that_list_the_site_and_are_not_going() {
        let mut listing = domain(&["dc-it1", "dc-it2"]);
        listing.metadata.name = Some("acme".into());
        let mut going = domain(&["dc-it1"]);
        going.metadata.name = Some("old".into());
        going.metadata.deletion_timestamp = Some(crate::time::to_k8s(now()));
        let elsewhere = domain(&["dc-it2"]);
        assert_eq!(users("dc-it1", &[listing, going, elsewhere]), ["mail/acme"]);
    }

    #[test]
    fn a_refused_deletion_names_the_domains_and_the_way_out() {
        let s = site();
        let seen = observe(&[node(true)]);
        let d = decide(
            &s.spec,
            &SiteStatus::default(),
            ProbeState::default(),
            seen,
            false,
            now(),
        );
        let status = compute(&s, seen, &d, &[], &["mail/acme".to_string()], now());
        let c = conditions::find(&status.conditions, DELETION_REFUSED).expect("condition");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", IN_USE));
        assert!(c.message.contains("mail/acme") && c.message.contains("spec.sites"));
        assert!(
            conditions::find(
                &status_for(&s, &[node(true)], &[]).conditions,
                DELETION_REFUSED
            )
            .is_none(),
            "no DeletionRefused condition on a Site not being deleted"
        );
    }
}
