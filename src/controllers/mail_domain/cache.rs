//! What the MailDomain controller reads from memory: reflector stores, each
//! filled by a watch in a task of its own (never by the controller's
//! trigger polling: a reconcile waits for them). A reconcile finds the Sites,
//! SigningKeys, gateway Deployments and pods, and the names and labels of
//! its other children here instead of asking the API server, so a converged
//! platform costs watches only.
//!
//! A store lags the API server by at most one watch event. A reconcile that
//! reads a stale store at worst applies a child once more or deletes one
//! that is already gone; the event that brings the store up to date
//! triggers another reconcile of the same domain.
//!
//! Only what the controller reads is kept: managed fields are dropped from
//! everything, pods keep their labels, node, IP and conditions, Deployments
//! lose their pod template's spec, EndpointSlices are kept whole (the SLA
//! probe reads them too), and the other children are watched as metadata
//! only.

use std::sync::Arc;

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod, PodSpec, PodStatus, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    core::PartialObjectMeta,
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher::Config,
    },
};
use serde::de::DeserializeOwned;

use super::build::DOMAIN_LABEL;
use crate::{
    api::{MailDomain, SigningKey, Site},
    controllers::{MANAGED_BY, spawn_store},
};

/// The stores a reconcile reads.
#[derive(Clone)]
pub struct Caches {
    /// The controller's own store of MailDomains.
    pub mail_domains: Store<MailDomain>,
    pub sites: Store<Site>,
    pub signing_keys: Store<SigningKey>,
    pub deployments: Store<Deployment>,
    pub pods: Store<Pod>,
    pub config_maps: Store<PartialObjectMeta<ConfigMap>>,
    pub services: Store<PartialObjectMeta<Service>>,
    pub pdbs: Store<PartialObjectMeta<PodDisruptionBudget>>,
    pub network_policies: Store<PartialObjectMeta<NetworkPolicy>>,
    pub endpoint_slices: Store<EndpointSlice>,
}

/// The label selector of everything this operator made.
fn owned() -> Config {
    Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"))
}

/// A store of the metadata of `K`'s objects this operator made, filled by a
/// task of its own.
fn reflect_metadata<K>(client: &Client) -> Store<PartialObjectMeta<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    spawn_store(
        Api::<PartialObjectMeta<K>>::all(client.clone()),
        owned(),
        drop_managed_fields,
    )
}

/// Drops what no reconcile reads from every cached object.
fn drop_managed_fields<K: Resource>(obj: &mut K) {
    obj.managed_fields_mut().clear();
}

/// A pod as the controller reads it: labels, deletion, node, IP, conditions.
fn trim_pod(pod: &mut Pod) {
    pod.managed_fields_mut().clear();
    pod.metadata.annotations = None;
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    pod.spec = Some(PodSpec {
        node_name,
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|s| PodStatus {
        conditions: s.conditions,
        pod_ip: s.pod_ip,
        phase: s.phase,
        ..PodStatus::default()
    });
}

/// A Deployment without its pod template's spec (the template's
/// annotations, which carry the configuration hash, stay).
fn trim_deployment(deployment: &mut Deployment) {
    deployment.managed_fields_mut().clear();
    deployment.spec.template.spec = None;
}

/// Builds the stores; each fills in a task of its own.
pub fn caches(client: &Client, mail_domains: Store<MailDomain>) -> Caches {
    Caches {
        mail_domains,
        sites: spawn_store(
            Api::<Site>::all(client.clone()),
            Config::default(),
            drop_managed_fields,
        ),
        signing_keys: spawn_store(
            Api::<SigningKey>::all(client.clone()),
            Config::default(),
            drop_managed_fields,
        ),
        deployments: spawn_store(
            Api::<Deployment>::all(client.clone()),
            owned(),
            trim_deployment,
        ),
        pods: spawn_store(Api::<Pod>::all(client.clone()), owned(), trim_pod),
        config_maps: reflect_metadata::<ConfigMap>(client),
        services: reflect_metadata::<Service>(client),
        pdbs: reflect_metadata::<PodDisruptionBudget>(client),
        network_policies: reflect_metadata::<NetworkPolicy>(client),
        endpoint_slices: spawn_store(
            Api::<EndpointSlice>::all(client.clone()),
            owned(),
            drop_managed_fields,
        ),
    }
}

impl Caches {
    /// Waits until every store holds its first complete list; a reconcile
    /// must never take a store still filling for the truth (a Site not yet
    /// listed would look deleted).
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.mail_domains.wait_until_ready().await?;
        self.sites.wait_until_ready().await?;
        self.signing_keys.wait_until_ready().await?;
        self.deployments.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.config_maps.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.pdbs.wait_until_ready().await?;
        self.network_policies.wait_until_ready().await?;
        self.endpoint_slices.wait_until_ready().await
    }

    /// The Site `name`, if it exists.
    pub fn site(&self, name: &str) -> Option<Site> {
        self.sites
            .get(&ObjectRef::new(name))
            .map(|s| s.as_ref().clone())
    }

    /// The SigningKey `name` in `namespace`, if it exists.
    pub fn signing_key(&self, namespace: &str, name: &str) -> Option<SigningKey> {
        self.signing_keys
            .get(&ObjectRef::new(name).within(namespace))
            .map(|k| k.as_ref().clone())
    }

    /// The Deployments of `domain` in `namespace`, whatever their site.
    pub fn deployments(&self, namespace: &str, domain: &str) -> Vec<Deployment> {
        of_domain(&self.deployments, namespace, domain)
            .map(|d| d.as_ref().clone())
            .collect()
    }

    /// The gateway pods of `domain` in `namespace`, whatever their site.
    pub fn pods(&self, namespace: &str, domain: &str) -> Vec<Pod> {
        of_domain(&self.pods, namespace, domain)
            .map(|p| p.as_ref().clone())
            .collect()
    }
}

/// The objects of `store` this operator made for `domain` in `namespace`.
pub fn of_domain<'a, K>(
    store: &'a Store<K>,
    namespace: &'a str,
    domain: &'a str,
) -> impl Iterator<Item = Arc<K>> + 'a
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.state().into_iter().filter(move |obj| {
        let labels = obj.labels();
        obj.namespace().as_deref() == Some(namespace)
            && labels
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str)
                == Some(MANAGED_BY)
            && labels.get(DOMAIN_LABEL).map(String::as_str) == Some(domain)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodCondition};

    #[test]
    fn a_trimmed_pod_keeps_what_readiness_needs() {
        let mut pod = Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("gw-0".into()),
                labels: Some([("pec.dev/site".to_string(), "dc-it1".to_string())].into()),
                annotations: Some([("big".to_string(), "x".repeat(1000))].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                containers: vec![Container {
                    name: "gateway".into(),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some("10.0.0.7".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..PodCondition::default()
                }]),
                host_ip: Some("192.0.2.1".into()),
                ..PodStatus::default()
            }),
        };
        trim_pod(&mut pod);
        let spec = pod.spec.as_ref().expect("spec");
        let status = pod.status.as_ref().expect("status");
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        assert!(spec.containers.is_empty(), "containers dropped");
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(status.conditions.as_ref().map(Vec::len), Some(1));
        assert_eq!(status.host_ip, None);
        assert_eq!(pod.metadata.annotations, None);
        assert_eq!(pod.labels()["pec.dev/site"], "dc-it1");
    }
}
