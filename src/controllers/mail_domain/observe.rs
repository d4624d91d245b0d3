//! What a MailDomain reconcile makes of the cluster state it read, purely:
//! which listed Sites exist, which gateways are ready, which sites are
//! failover candidates and since when one could not serve, and which
//! Deployments stand after the apply.
//!
//! The CRD schema and CEL rules refuse malformed specs at apply time; what is
//! left here is what only the cluster can tell.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::ResourceExt;

use super::build::{ReadyGateway, SITE_LABEL};
use crate::{
    api::{MailDomain, Site, SitePhase},
    failover::serving::Candidate,
    time::from_k8s,
};

/// The listed sites, split by whether their Site object exists.
#[derive(Debug, Default, PartialEq)]
pub struct Resolution {
    /// Listed sites that exist, in `spec.sites` order, with their node selectors.
    pub present: Vec<ResolvedSite>,
    /// Listed sites that have no Site object.
    pub missing: Vec<String>,
}

/// A listed site that exists.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSite {
    /// The Site's name.
    pub name: String,
    /// Labels of the site's nodes.
    pub node_selector: BTreeMap<String, String>,
    /// How many of the site's nodes take new pods (its status; 0 before
    /// the first look).
    pub nodes: i32,
}

/// Splits `md.spec.sites` into existing and missing sites, given what was fetched.
pub fn resolve_sites(md: &MailDomain, fetched: &BTreeMap<String, Option<Site>>) -> Resolution {
    let mut resolution = Resolution::default();
    for name in &md.spec.sites {
        match fetched.get(name).and_then(Option::as_ref) {
            Some(site) => resolution.present.push(ResolvedSite {
                name: name.clone(),
                node_selector: site.spec.node_selector.clone(),
                nodes: site.status.as_ref().map_or(0, |s| s.nodes_schedulable),
            }),
            None => resolution.missing.push(name.clone()),
        }
    }
    resolution
}

/// The gateway pods that are Ready, have an IP and are not terminating, by
/// site and name whatever order `pods` come in: the endpoints written from
/// them must not change while the pods do not (a slice whose two gateways
/// swapped places would be rewritten).
pub fn ready_gateways(pods: &[Pod]) -> Vec<ReadyGateway> {
    let mut ready: Vec<ReadyGateway> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            let ready = status
                .conditions
                .as_ref()?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Some(ReadyGateway {
                site: p.labels().get(SITE_LABEL)?.clone(),
                pod: p.name_any(),
                ip: status.pod_ip.clone()?,
                node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
            })
            .filter(|_| ready)
        })
        .collect();
    ready.sort_by(|a, b| (&a.site, &a.pod).cmp(&(&b.site, &b.pod)));
    ready
}

/// When the operator learned that `site` could not serve: when the Site was
/// declared Down or fenced, else when the last of its gateway pods (`pods`
/// of the domain) stopped being Ready. `None` if it can still serve.
pub fn unavailable_since(site: Option<&Site>, name: &str, pods: &[Pod]) -> Option<DateTime<Utc>> {
    let status = site.and_then(|s| s.status.as_ref());
    if let Some(st) =
        status.filter(|s| matches!(s.phase, Some(SitePhase::Down | SitePhase::Fenced)))
    {
        return st.last_transition_time.as_ref().map(from_k8s);
    }
    let in_site: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.labels().get(SITE_LABEL).map(String::as_str) == Some(name))
        .collect();
    let readiness: Vec<(bool, Option<DateTime<Utc>>)> = in_site
        .iter()
        .filter_map(|p| {
            let ready = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "Ready")?;
            Some((
                ready.status == "True",
                ready.last_transition_time.as_ref().map(from_k8s),
            ))
        })
        .collect();
    if readiness.is_empty() || readiness.iter().any(|(ready, _)| *ready) {
        return None;
    }
    readiness.into_iter().filter_map(|(_, at)| at).max()
}

/// The domain's Deployments after an apply: those just applied, plus the
/// ones kept for listed sites whose Site is missing (`before` is the list
/// read at the start of the reconcile). Pruned ones are in neither.
pub fn current_deployments(
    applied: Vec<Deployment>,
    before: &[Deployment],
    missing: &[String],
) -> Vec<Deployment> {
    let kept = before
        .iter()
        .filter(|d| {
            d.labels()
                .get(SITE_LABEL)
                .is_some_and(|s| missing.contains(s))
        })
        .cloned();
    applied.into_iter().chain(kept).collect()
}

/// The listed sites as failover candidates, in `spec.sites` order.
pub fn candidates(
    md: &MailDomain,
    fetched: &BTreeMap<String, Option<Site>>,
    gateways: &[ReadyGateway],
) -> Vec<Candidate> {
    md.spec
        .sites
        .iter()
        .map(|name| {
            let site = fetched.get(name).and_then(Option::as_ref);
            let status = site.and_then(|s| s.status.as_ref());
            Candidate {
                site: name.clone(),
                priority: site.map_or(i32::MAX, |s| s.spec.priority),
                phase: status.and_then(|s| s.phase),
                healthy_since: status.and_then(|s| s.healthy_since.as_ref()).map(from_k8s),
                ready_gateways: gateways.iter().filter(|g| g.site == *name).count() as u32,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::mail_domain::build::tests::{domain, site};

    fn pod(site: &str, ready: bool, changed: i64) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{site}-{changed}"), "labels": {SITE_LABEL: site}},
            "status": {"conditions": [{
                "type": "Ready", "status": if ready { "True" } else { "False" },
                "lastTransitionTime": crate::time::to_k8s(DateTime::from_timestamp(1_800_000_000 + changed, 0).expect("valid")),
            }]},
        }))
        .expect("pod")
    }

    #[test]
    fn ready_gateways_come_in_the_same_order_whatever_order_the_pods_come_in() {
        let mut pods: Vec<Pod> = [("b", 1), ("a", 2), ("b", 3), ("a", 4)]
            .into_iter()
            .map(|(site, n)| {
                let mut pod = pod(site, true, n);
                pod.status.get_or_insert_default().pod_ip = Some(format!("10.0.0.{n}"));
                pod
            })
            .collect();
        let first = ready_gateways(&pods);
        pods.reverse();
        assert_eq!(ready_gateways(&pods), first);
        let order: Vec<_> = first.iter().map(|g| g.pod.as_str()).collect();
        assert_eq!(order, ["a-2", "a-4", "b-1", "b-3"]);
    }

    #[test]
    fn a_site_is_unavailable_since_its_last_gateway_went_unready_or_it_was_declared_down() {
        let at = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0);
        let pods = [pod("a", false, 10), pod("a", false, 20), pod("b", true, 5)];
        assert_eq!(unavailable_since(None, "a", &pods), at(20));
        assert_eq!(unavailable_since(None, "b", &pods), None);
        let mut down = site("a");
        down.status = Some(crate::api::SiteStatus {
            phase: Some(SitePhase::Down),
            last_transition_time: at(15).map(crate::time::to_k8s),
            ..Default::default()
        });
        assert_eq!(unavailable_since(Some(&down), "a", &pods), at(15));
    }

    #[test]
    fn current_deployments_are_the_applied_ones_and_those_of_missing_sites() {
        let deployment = |site: &str| -> Deployment {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": site, "labels": {SITE_LABEL: site}},
                "spec": {"selector": {}, "template": {}},
            }))
            .expect("deployment")
        };
        let before = [deployment("a"), deployment("gone"), deployment("missing")];
        let now = current_deployments(vec![deployment("a")], &before, &["missing".to_string()]);
        let names: Vec<String> = now.iter().map(|d| d.name_any()).collect();
        assert_eq!(names, ["a", "missing"]);
    }

    #[test]
    fn reports_missing_sites_in_spec_order() {
        let md = domain(&["dc-it1", "dc-it9", "dc-it2"]);
        let fetched = [
            ("dc-it1".to_string(), Some(site("dc-it1"))),
            ("dc-it9".to_string(), None),
            ("dc-it2".to_string(), Some(site("dc-it2"))),
        ]
        .into();
        let r = resolve_sites(&md, &fetched);
        assert_eq!(
            r.present
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["dc-it1", "dc-it2"]
        );
        assert_eq!(r.missing, ["dc-it9"]);
    }
}
