//! Simulated data centers on the local cluster, shared by the e2e tests and
//! the failover benchmark (both include this file with `#[path]`).
//!
//! Each [`TestSites`] makes two Sites on kwok nodes of their own, so failing
//! them disturbs nothing else. A failed data center is simulated as kubelets
//! would see it: every node's Ready condition goes False (kwok leaves nodes
//! annotated `kwok.x-k8s.io/status=custom` alone), and on recovery this code,
//! playing the kubelet, marks the nodes and their pods Ready again.
#![allow(dead_code)] // each includer uses a different part

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        core::v1::{Node, Pod},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use pec_operator::{
    api::{HealthSpec, Site, SitePhase, SiteSpec},
    controllers::mail_domain::build::{SITE_LABEL, domain_service_name},
};
use serde_json::json;

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// How long any single wait may take before it fails.
pub const WAIT: Duration = Duration::from_secs(90);

/// Polls `check` until it returns `Some`, or panics after [`WAIT`]. For facts
/// that span several objects (a list becoming empty), where a single-object
/// watch does not fit.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Two sites of three nodes each, private to one test.
pub struct TestSites {
    pub client: Client,
    pub names: [String; 2],
}

const NODES_PER_SITE: usize = 3;

impl TestSites {
    /// Creates the nodes and Sites `<prefix>-a` (priority 0) and `<prefix>-b` (priority 10).
    pub async fn create(client: &Client, prefix: &str, health: HealthSpec) -> Self {
        let names = [format!("{prefix}-a"), format!("{prefix}-b")];
        let nodes = Api::<Node>::all(client.clone());
        for (i, site) in names.iter().enumerate() {
            for n in 0..NODES_PER_SITE {
                let node: Node = serde_json::from_value(json!({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": format!("{site}-{n}"),
                        "annotations": {"kwok.x-k8s.io/node": "fake"},
                        "labels": {
                            "kubernetes.io/hostname": format!("{site}-{n}"),
                            "topology.kubernetes.io/zone": site,
                            "type": "kwok",
                        },
                    },
                    "status": {
                        "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "1000"},
                        "capacity": {"cpu": "64", "memory": "512Gi", "pods": "1000"},
                    },
                }))
                .expect("node");
                nodes
                    .create(&PostParams::default(), &node)
                    .await
                    .expect("create node");
            }
            let spec = SiteSpec {
                node_selector: [("topology.kubernetes.io/zone".to_string(), site.clone())].into(),
                priority: i as i32 * 10,
                maintenance: false,
                maintenance_force: false,
                fenced: false,
                health: health.clone(),
                load_balancer_addresses: vec![format!("192.0.2.{}", 10 + i)],
            };
            Api::<Site>::all(client.clone())
                .create(&PostParams::default(), &Site::new(site, spec))
                .await
                .expect("create site");
        }
        let sites = Self {
            client: client.clone(),
            names,
        };
        for site in &sites.names {
            sites.wait_phase(site, SitePhase::Serving).await;
        }
        sites
    }

    pub async fn wait_phase(&self, site: &str, phase: SitePhase) -> Site {
        let api = Api::<Site>::all(self.client.clone());
        eventually(&format!("{site} in phase {phase:?}"), || async {
            let s = api.get(site).await.ok()?;
            (s.status.as_ref().and_then(|st| st.phase) == Some(phase)).then_some(s)
        })
        .await
    }

    fn node_names(&self, site: &str) -> Vec<String> {
        (0..NODES_PER_SITE).map(|n| format!("{site}-{n}")).collect()
    }

    async fn set_ready(&self, node: &str, ready: bool) {
        let nodes = Api::<Node>::all(self.client.clone());
        let now = Time(jiff::Timestamp::now());
        let status = if ready { "True" } else { "False" };
        nodes
            .patch_status(
                node,
                &PatchParams::default(),
                &Patch::Strategic(json!({"status": {"conditions": [{
                    "type": "Ready", "status": status, "reason": "SetByTest",
                    "message": "set by the failover test", "lastHeartbeatTime": now, "lastTransitionTime": now,
                }]}})),
            )
            .await
            .expect("patch node status");
    }

    /// Every node of `site` goes NotReady, as if the data center failed.
    pub async fn fail(&self, site: &str) {
        let nodes = Api::<Node>::all(self.client.clone());
        for node in self.node_names(site) {
            nodes
                .patch(
                    &node,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"metadata": {"annotations": {"kwok.x-k8s.io/status": "custom"}}}),
                    ),
                )
                .await
                .expect("take the node from kwok");
            self.set_ready(&node, false).await;
        }
    }

    /// The nodes of `site` come back; once the node controller has seen them
    /// Ready, their pods are marked Ready again (the kubelet's job).
    pub async fn recover(&self, site: &str) {
        let nodes = Api::<Node>::all(self.client.clone());
        for node in self.node_names(site) {
            self.set_ready(&node, true).await;
        }
        for node in self.node_names(site) {
            eventually(
                "the node controller to lift the not-ready taint",
                || async {
                    let n = nodes.get(&node).await.ok()?;
                    let tainted = n
                        .spec
                        .and_then(|s| s.taints)
                        .unwrap_or_default()
                        .iter()
                        .any(|t| t.key == "node.kubernetes.io/not-ready");
                    (!tainted).then_some(())
                },
            )
            .await;
            let pods = Api::<Pod>::all(self.client.clone());
            let on_node = pods
                .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                .await
                .expect("list pods");
            let now = Time(jiff::Timestamp::now());
            for pod in on_node.items {
                let api = Api::<Pod>::namespaced(
                    self.client.clone(),
                    &pod.namespace().unwrap_or_default(),
                );
                api.patch_status(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Strategic(json!({"status": {"conditions": [
                        {"type": "Ready", "status": "True", "lastTransitionTime": now},
                        {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                    ]}})),
                )
                .await
                .expect("mark pod ready");
            }
            nodes
                .patch(
                    &node,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"metadata": {"annotations": {"kwok.x-k8s.io/status": null}}}),
                    ),
                )
                .await
                .expect("give the node back to kwok");
        }
    }

    /// Deletes the Sites and their nodes, and first the MailDomains that
    /// list them (a Site stays while a MailDomain lists it).
    pub async fn remove(self) {
        let domains = Api::<pec_operator::api::MailDomain>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        for md in domains
            .iter()
            .filter(|md| md.spec.sites.iter().any(|s| self.names.contains(s)))
        {
            let _ = Api::<pec_operator::api::MailDomain>::namespaced(
                self.client.clone(),
                &md.namespace().unwrap_or_default(),
            )
            .delete(&md.name_any(), &DeleteParams::default())
            .await;
        }
        for site in &self.names {
            let _ = Api::<Site>::all(self.client.clone())
                .delete(site, &DeleteParams::default())
                .await;
            for node in self.node_names(site) {
                let _ = Api::<Node>::all(self.client.clone())
                    .delete(&node, &DeleteParams::default())
                    .await;
            }
        }
    }
}

/// Ready endpoint addresses of the domain Service, by site.
pub async fn endpoints_by_site(client: &Client, ns: &str, md: &str) -> BTreeMap<String, usize> {
    try_endpoints_by_site(client, ns, md)
        .await
        .expect("list slices")
}

/// [`endpoints_by_site`], or the error of the list.
pub async fn try_endpoints_by_site(
    client: &Client,
    ns: &str,
    md: &str,
) -> Result<BTreeMap<String, usize>, kube::Error> {
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!(
            "kubernetes.io/service-name={}",
            domain_service_name(md)
        )))
        .await?;
    let mut by_site = BTreeMap::new();
    for slice in slices.items {
        let site = slice.labels().get(SITE_LABEL).cloned().unwrap_or_default();
        let ready = slice
            .endpoints
            .iter()
            .flatten()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
            .count();
        *by_site.entry(site).or_default() += ready;
    }
    by_site.retain(|_, n| *n > 0);
    Ok(by_site)
}
