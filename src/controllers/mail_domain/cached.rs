//! What the MailDomain controller's caches keep of its children: compact
//! types holding only what a reconcile reads, instead of the Kubernetes
//! objects.
//!
//! A `Pod` takes about 2.4 KB and a `Deployment` about 2.5 KB even with
//! every optional field empty (their specs and statuses are large structs
//! held inline), and an `ObjectMeta` with its label and annotation maps
//! about 1.8 KB; a platform of 10,000 domains has 40,000 gateway pods,
//! 20,000 Deployments and 110,000 other children. Kept as these types, each
//! costs a hundred or two bytes:
//! - [`CachedChild`]: a child only whose metadata is read (ConfigMaps,
//!   Services, PodDisruptionBudgets, NetworkPolicies): its name, site and
//!   the hash of what was last applied;
//! - [`CachedDeployment`]: that, the gateway configuration's hash and the
//!   replica counts;
//! - [`CachedPod`]: a gateway pod's site, deletion, node, IP, phase and
//!   Ready condition (its status and when it last changed);
//! - [`CachedSlice`]: one of the operator's EndpointSlices, as the Service
//!   it serves and whether any of its endpoints is ready (the SLA probe's
//!   question).
//!
//! None keeps its namespace or MailDomain: the cache files each record
//! under the domain it belongs to (see [`super::by_domain`]), which
//! [`domain_of`] reads from the object before it is made into a record.
//!
//! [`Child`] is what the no-op check and the prune read of any cached
//! child. [`CachedDeployment::to_deployment`] and [`CachedPod::to_pod`]
//! give a reconcile back Kubernetes objects with just those fields, so the
//! status and failover logic keeps reading Kubernetes types.

use std::{collections::BTreeMap, marker::PhantomData};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStatus},
        core::v1::{Pod, PodCondition, PodSpec, PodStatus, PodTemplateSpec},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{Resource, api::ObjectMeta, core::PartialObjectMeta, runtime::reflector::ObjectRef};

use super::{
    apply::APPLIED_HASH_ANNOTATION,
    build::{CONFIG_HASH_ANNOTATION, DOMAIN_LABEL, SITE_LABEL},
};
use crate::{api::MailDomain, controllers::MANAGED_BY};

/// What the controller reads of any child in its caches.
pub trait Child: Clone + PartialEq + Send + Sync + 'static {
    /// Its name.
    fn name(&self) -> &str;
    /// The site it belongs to (its site label).
    fn site(&self) -> Option<&str>;
    /// The hash of what was last applied to it.
    fn applied_hash(&self) -> Option<&str>;
}

/// The MailDomain an object of the operator's belongs to, in its
/// namespace: the MailDomain among its owners, else (a gateway pod, owned
/// by its ReplicaSet) the one its domain label names.
pub fn domain_of(meta: &ObjectMeta) -> Option<ObjectRef<MailDomain>> {
    let api_version = <MailDomain as Resource>::api_version(&());
    let kind = <MailDomain as Resource>::kind(&());
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == kind && o.api_version == api_version)
        .map(|o| &o.name);
    let domain = owner.or_else(|| meta.labels.as_ref()?.get(DOMAIN_LABEL))?;
    Some(ObjectRef::new(domain).within(meta.namespace.as_deref()?))
}

/// A child's name and the site it belongs to.
#[derive(Clone, Debug, Default, PartialEq)]
struct Key {
    name: String,
    site: Option<String>,
}

impl Key {
    /// Takes the key out of `meta`.
    fn take(meta: &mut ObjectMeta) -> Self {
        Self {
            name: meta.name.take().unwrap_or_default(),
            site: meta.labels.as_mut().and_then(|l| l.remove(SITE_LABEL)),
        }
    }

    /// Metadata with the key, the namespace of `domain` and the operator's
    /// labels.
    fn metadata(&self, domain: &ObjectRef<MailDomain>) -> ObjectMeta {
        let labels = [
            ("app.kubernetes.io/managed-by", Some(MANAGED_BY)),
            (DOMAIN_LABEL, Some(domain.name.as_str())),
            (SITE_LABEL, self.site.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v?.to_string())))
        .collect();
        ObjectMeta {
            name: Some(self.name.clone()),
            namespace: domain.namespace.clone(),
            labels: Some(labels),
            ..ObjectMeta::default()
        }
    }
}

/// The hash of what was last applied, from `meta`'s annotations.
fn take_applied_hash(meta: &mut ObjectMeta) -> Option<String> {
    meta.annotations.as_mut()?.remove(APPLIED_HASH_ANNOTATION)
}

/// What every applied child's record keeps of its metadata: its key and
/// the hash of what was last applied.
#[derive(Clone, Debug, Default, PartialEq)]
struct Meta {
    key: Key,
    applied_hash: Option<String>,
}

impl Meta {
    /// Takes what is kept out of `meta`.
    fn take(meta: &mut ObjectMeta) -> Self {
        Self {
            key: Key::take(meta),
            applied_hash: take_applied_hash(meta),
        }
    }
}

/// A record holding a [`Meta`]: it is a [`Child`] through it.
trait WithMeta {
    fn meta(&self) -> &Meta;
}

impl<T> Child for T
where
    T: WithMeta + Clone + PartialEq + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.meta().key.name
    }

    fn site(&self) -> Option<&str> {
        self.meta().key.site.as_deref()
    }

    fn applied_hash(&self) -> Option<&str> {
        self.meta().applied_hash.as_deref()
    }
}

/// A child of kind `K` reduced to what the controller reads of its
/// metadata.
#[derive(Debug)]
pub struct CachedChild<K> {
    meta: Meta,
    kind: PhantomData<fn() -> K>,
}

// By hand: derived, these would ask `K` to be `Clone` and `PartialEq`.
impl<K> Clone for CachedChild<K> {
    fn clone(&self) -> Self {
        Self {
            meta: self.meta.clone(),
            kind: PhantomData,
        }
    }
}

impl<K> PartialEq for CachedChild<K> {
    fn eq(&self, other: &Self) -> bool {
        self.meta == other.meta
    }
}

impl<K: Resource<DynamicType = ()>> From<PartialObjectMeta<K>> for CachedChild<K> {
    fn from(obj: PartialObjectMeta<K>) -> Self {
        let mut meta = obj.metadata;
        Self {
            meta: Meta::take(&mut meta),
            kind: PhantomData,
        }
    }
}

impl<K> WithMeta for CachedChild<K> {
    fn meta(&self) -> &Meta {
        &self.meta
    }
}

/// A gateway Deployment reduced to what the controller reads: its key,
/// the hashes of what was applied and of the gateway configuration its
/// pods run, its generation and its replica counts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CachedDeployment {
    meta: Meta,
    generation: Option<i64>,
    config_hash: Option<String>,
    /// The status without its conditions.
    status: Option<DeploymentStatus>,
}

impl From<Deployment> for CachedDeployment {
    fn from(d: Deployment) -> Self {
        let Deployment {
            mut metadata,
            spec,
            status,
        } = d;
        Self {
            meta: Meta::take(&mut metadata),
            generation: metadata.generation,
            config_hash: spec
                .template
                .metadata
                .and_then(|m| m.annotations)
                .and_then(|mut a| a.remove(CONFIG_HASH_ANNOTATION)),
            status: status.map(|s| DeploymentStatus {
                conditions: None,
                ..s
            }),
        }
    }
}

impl CachedDeployment {
    /// A `Deployment` of `domain` holding what the cache kept: the
    /// operator's labels, the applied hash, the generation, the pod
    /// template's configuration hash and the status without conditions.
    pub fn to_deployment(&self, domain: &ObjectRef<MailDomain>) -> Deployment {
        let mut metadata = self.meta.key.metadata(domain);
        metadata.generation = self.generation;
        metadata.annotations = self
            .meta
            .applied_hash
            .as_ref()
            .map(|h| BTreeMap::from([(APPLIED_HASH_ANNOTATION.to_string(), h.clone())]));
        let template_annotations = self
            .config_hash
            .as_ref()
            .map(|h| BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_string(), h.clone())]));
        Deployment {
            metadata,
            spec: DeploymentSpec {
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        annotations: template_annotations,
                        ..ObjectMeta::default()
                    }),
                    spec: None,
                },
                ..DeploymentSpec::default()
            },
            status: self.status.clone(),
        }
    }
}

impl WithMeta for CachedDeployment {
    fn meta(&self) -> &Meta {
        &self.meta
    }
}

/// What the controller reads of one gateway pod. Two records are equal
/// when they keep the same, whatever version of the pod each was read
/// from: a change of what a record does not keep (a condition other than
/// Ready, a container's status) leaves it equal, and nothing a reconcile
/// reads of it has changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CachedPod {
    key: Key,
    deleting: Option<Time>,
    node: Option<String>,
    ip: Option<String>,
    phase: Option<String>,
    ready: Option<ReadyCondition>,
}

/// A pod's `Ready` condition: its status and when it last changed.
#[derive(Clone, Debug, Default, PartialEq)]
struct ReadyCondition {
    status: String,
    since: Option<Time>,
}

impl From<Pod> for CachedPod {
    fn from(pod: Pod) -> Self {
        let Pod {
            mut metadata,
            spec,
            status,
        } = pod;
        let status = status.unwrap_or_default();
        Self {
            key: Key::take(&mut metadata),
            deleting: metadata.deletion_timestamp,
            node: spec.and_then(|s| s.node_name),
            ip: status.pod_ip,
            phase: status.phase,
            ready: status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| ReadyCondition {
                    status: c.status,
                    since: c.last_transition_time,
                }),
        }
    }
}

impl CachedPod {
    /// A `Pod` of `domain` holding what the cache kept: the operator's
    /// labels, the deletion, the node, the IP, the phase and the Ready
    /// condition.
    pub fn to_pod(&self, domain: &ObjectRef<MailDomain>) -> Pod {
        let mut metadata = self.key.metadata(domain);
        metadata.deletion_timestamp = self.deleting.clone();
        Pod {
            metadata,
            spec: Some(PodSpec {
                node_name: self.node.clone(),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: self.ip.clone(),
                phase: self.phase.clone(),
                conditions: Some(
                    self.ready
                        .iter()
                        .map(|ready| PodCondition {
                            type_: "Ready".into(),
                            status: ready.status.clone(),
                            last_transition_time: ready.since.clone(),
                            ..PodCondition::default()
                        })
                        .collect(),
                ),
                ..PodStatus::default()
            }),
        }
    }
}

impl Child for CachedPod {
    fn name(&self) -> &str {
        &self.key.name
    }

    fn site(&self) -> Option<&str> {
        self.key.site.as_deref()
    }

    /// None: a pod is not applied.
    fn applied_hash(&self) -> Option<&str> {
        None
    }
}

/// One of the operator's EndpointSlices (those of a domain Service): the
/// Service it serves and whether any of its endpoints is ready.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CachedSlice {
    meta: Meta,
    service: Option<String>,
    ready: bool,
}

/// The label naming the Service an EndpointSlice serves.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl From<EndpointSlice> for CachedSlice {
    fn from(slice: EndpointSlice) -> Self {
        let mut metadata = slice.metadata;
        let service = metadata
            .labels
            .as_mut()
            .and_then(|l| l.remove(SERVICE_NAME_LABEL));
        Self {
            meta: Meta::take(&mut metadata),
            service,
            ready: slice
                .endpoints
                .iter()
                .flatten()
                .any(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false)),
        }
    }
}

impl CachedSlice {
    /// The Service it serves.
    pub fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }

    /// Whether any of its endpoints is ready.
    pub fn ready(&self) -> bool {
        self.ready
    }
}

impl WithMeta for CachedSlice {
    fn meta(&self) -> &Meta {
        &self.meta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::core::v1::{ConfigMap, Container},
        apimachinery::pkg::apis::meta::v1::OwnerReference,
    };
    use kube::{ResourceExt, api::TypeMeta};

    fn at(s: i64) -> Time {
        crate::time::to_k8s(
            chrono::DateTime::from_timestamp(1_800_000_000 + s, 0).expect("a valid time"),
        )
    }

    fn config_map() -> PartialObjectMeta<ConfigMap> {
        PartialObjectMeta {
            types: Some(TypeMeta::resource::<ConfigMap>()),
            metadata: ObjectMeta {
                name: Some("acme-dc-it1".into()),
                namespace: Some("mail".into()),
                resource_version: Some("42".into()),
                uid: Some("some-uid".into()),
                labels: Some(
                    [
                        (DOMAIN_LABEL, "acme"),
                        (SITE_LABEL, "dc-it1"),
                        ("app.kubernetes.io/name", "pec-gateway"),
                    ]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into(),
                ),
                annotations: Some(
                    [
                        (APPLIED_HASH_ANNOTATION, "0123abcd"),
                        ("other", "something long"),
                    ]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            _phantom: PhantomData,
        }
    }

    fn acme() -> ObjectRef<MailDomain> {
        ObjectRef::new("acme").within("mail")
    }

    fn owner(kind: &str, api_version: &str, name: &str) -> OwnerReference {
        OwnerReference {
            api_version: api_version.into(),
            kind: kind.into(),
            name: name.into(),
            uid: "u".into(),
            ..OwnerReference::default()
        }
    }

    #[test]
    fn a_child_belongs_to_the_mail_domain_that_owns_it_else_to_its_label() {
        let mut cm = config_map();
        assert_eq!(domain_of(&cm.metadata), Some(acme()), "by its label");
        cm.metadata.owner_references = Some(vec![
            owner("MailDomain", "other.example/v1", "lookalike"),
            owner("ReplicaSet", "apps/v1", "acme-dc-it1-abc"),
            owner(
                "MailDomain",
                &<MailDomain as Resource>::api_version(&()),
                "owner",
            ),
        ]);
        cm.labels_mut()
            .insert(DOMAIN_LABEL.into(), "relabelled".into());
        assert_eq!(
            domain_of(&cm.metadata),
            Some(ObjectRef::new("owner").within("mail")),
            "by its owner, whatever its label says"
        );
        cm.metadata.namespace = None;
        assert_eq!(domain_of(&cm.metadata), None, "in no namespace");
    }

    #[test]
    fn a_cached_child_keeps_what_the_no_op_check_and_the_prune_read() {
        let cm = config_map();
        assert_eq!(
            domain_of(&cm.metadata),
            Some(ObjectRef::new("acme").within("mail"))
        );
        let child = CachedChild::from(cm);
        assert_eq!(child.name(), "acme-dc-it1");
        assert_eq!(Child::site(&child), Some("dc-it1"));
        assert_eq!(child.applied_hash(), Some("0123abcd"));
    }

    #[test]
    fn a_cached_child_of_a_foreign_object_belongs_to_no_domain() {
        let mut cm = config_map();
        cm.metadata.labels = None;
        cm.metadata.annotations = None;
        assert_eq!(domain_of(&cm.metadata), None);
        let child = CachedChild::from(cm);
        assert_eq!(Child::site(&child), None);
        assert_eq!(child.applied_hash(), None);
    }

    #[test]
    fn a_cached_deployment_gives_back_what_the_status_and_the_events_read() {
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "acme-dc-it2", "namespace": "mail", "generation": 3,
                "labels": {SITE_LABEL: "dc-it2", DOMAIN_LABEL: "acme", "other": "x"},
                "annotations": {APPLIED_HASH_ANNOTATION: "feed", "deployment.kubernetes.io/revision": "2"},
                "ownerReferences": [{"apiVersion": <MailDomain as Resource>::api_version(&()), "kind": "MailDomain", "name": "acme", "uid": "u"}],
            },
            "spec": {"replicas": 2, "selector": {}, "template": {
                "metadata": {"annotations": {CONFIG_HASH_ANNOTATION: "c0ffee"}},
                "spec": {"containers": [{"name": "gateway", "image": "pec-gateway"}]},
            }},
            "status": {"replicas": 2, "readyReplicas": 1, "updatedReplicas": 2, "observedGeneration": 3,
                "conditions": [{"type": "Available", "status": "True", "message": "long"}]},
        }))
        .expect("deployment");
        let at = domain_of(&d.metadata).expect("labelled");
        let cached = CachedDeployment::from(d);
        assert_eq!(Child::site(&cached), Some("dc-it2"));
        assert_eq!(Child::applied_hash(&cached), Some("feed"));
        let back = cached.to_deployment(&at);
        assert_eq!(back.name_any(), "acme-dc-it2");
        assert_eq!(back.metadata.namespace.as_deref(), Some("mail"));
        assert_eq!(back.metadata.generation, Some(3));
        assert_eq!(back.labels()[SITE_LABEL], "dc-it2");
        assert_eq!(back.labels()[DOMAIN_LABEL], "acme");
        assert!(!back.labels().contains_key("other"));
        assert_eq!(back.annotations()[APPLIED_HASH_ANNOTATION], "feed");
        let template = back.spec.template;
        assert_eq!(
            template
                .metadata
                .expect("metadata")
                .annotations
                .expect("annotations")[CONFIG_HASH_ANNOTATION],
            "c0ffee"
        );
        assert!(template.spec.is_none(), "the pod spec is not kept");
        let status = back.status.expect("status");
        assert_eq!(
            (
                status.replicas,
                status.ready_replicas,
                status.updated_replicas,
                status.observed_generation
            ),
            (Some(2), Some(1), Some(2), Some(3))
        );
        assert_eq!(status.conditions, None);
    }

    #[test]
    fn a_cached_slice_says_which_service_it_serves_and_whether_an_endpoint_is_ready() {
        let slice = |ready: &[bool]| -> EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {
                    "name": "acme-dc-it1", "namespace": "mail",
                    "labels": {SERVICE_NAME_LABEL: "acme", SITE_LABEL: "dc-it1", DOMAIN_LABEL: "acme"},
                    "annotations": {APPLIED_HASH_ANNOTATION: "5e1f"},
                    "ownerReferences": [{"apiVersion": <MailDomain as Resource>::api_version(&()), "kind": "MailDomain", "name": "acme", "uid": "u"}],
                },
                "addressType": "IPv4",
                "endpoints": ready.iter().map(|r| serde_json::json!({
                    "addresses": ["10.0.0.1"], "conditions": {"ready": r},
                })).collect::<Vec<_>>(),
            }))
            .expect("slice")
        };
        let cached = CachedSlice::from(slice(&[false, true]));
        assert_eq!(cached.service(), Some("acme"));
        assert!(cached.ready());
        assert_eq!(Child::site(&cached), Some("dc-it1"));
        assert_eq!(Child::applied_hash(&cached), Some("5e1f"));
        assert!(!CachedSlice::from(slice(&[false, false])).ready());
        assert!(!CachedSlice::from(slice(&[])).ready());
    }

    fn gateway_pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("gw-0".into()),
                namespace: Some("mail".into()),
                labels: Some(
                    [
                        ("app.kubernetes.io/managed-by", MANAGED_BY),
                        (SITE_LABEL, "dc-it1"),
                        (DOMAIN_LABEL, "acme"),
                        ("pod-template-hash", "abc"),
                    ]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into(),
                ),
                annotations: Some([("big".to_string(), "x".repeat(1000))].into()),
                deletion_timestamp: Some(at(5)),
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
                phase: Some("Running".into()),
                conditions: Some(vec![
                    PodCondition {
                        type_: "PodScheduled".into(),
                        status: "True".into(),
                        ..PodCondition::default()
                    },
                    PodCondition {
                        type_: "Ready".into(),
                        status: "False".into(),
                        last_transition_time: Some(at(3)),
                        message: Some("containers not ready".into()),
                        ..PodCondition::default()
                    },
                ]),
                host_ip: Some("192.0.2.1".into()),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn a_cached_pod_gives_back_what_readiness_and_failover_read() {
        let pod = CachedPod::from(gateway_pod()).to_pod(&acme());
        let spec = pod.spec.as_ref().expect("spec");
        let status = pod.status.as_ref().expect("status");
        assert_eq!(pod.name_any(), "gw-0");
        assert_eq!(pod.metadata.namespace.as_deref(), Some("mail"));
        assert_eq!(pod.labels()[SITE_LABEL], "dc-it1");
        assert_eq!(pod.labels()[DOMAIN_LABEL], "acme");
        assert_eq!(pod.labels()["app.kubernetes.io/managed-by"], MANAGED_BY);
        assert_eq!(pod.metadata.deletion_timestamp, Some(at(5)));
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let conditions = status.conditions.as_ref().expect("conditions");
        assert_eq!(conditions.len(), 1, "only Ready is kept");
        assert_eq!(conditions[0].type_, "Ready");
        assert_eq!(conditions[0].status, "False");
        assert_eq!(conditions[0].last_transition_time, Some(at(3)));
    }

    #[test]
    fn a_cached_pod_keeps_nothing_readiness_and_failover_do_not_read() {
        let mut bare = gateway_pod();
        bare.metadata.annotations = None;
        bare.labels_mut().remove("pod-template-hash");
        let spec = bare.spec.as_mut().expect("spec");
        spec.containers.clear();
        let status = bare.status.as_mut().expect("status");
        status.host_ip = None;
        let conditions = status.conditions.as_mut().expect("conditions");
        conditions.remove(0);
        conditions[0].message = None;
        assert_eq!(
            CachedPod::from(gateway_pod()),
            CachedPod::from(bare),
            "the same record with or without what is not read"
        );
    }

    #[test]
    fn a_pod_without_status_or_labels_belongs_to_no_domain_and_is_not_ready() {
        let new = Pod {
            metadata: ObjectMeta {
                name: Some("new".into()),
                namespace: Some("mail".into()),
                ..Default::default()
            },
            ..Pod::default()
        };
        assert_eq!(domain_of(&new.metadata), None);
        let pod = CachedPod::from(new).to_pod(&acme());
        assert!(!pod.labels().contains_key(SITE_LABEL));
        assert_eq!(
            pod.status.and_then(|s| s.conditions).map(|c| c.len()),
            Some(0)
        );
    }

    #[test]
    fn a_pod_record_is_the_same_after_a_change_it_does_not_keep() {
        let mut before = gateway_pod();
        before.metadata.resource_version = Some("1".into());
        let mut after = before.clone();
        after.metadata.resource_version = Some("2".into());
        let status = after.status.as_mut().expect("status");
        status.host_ip = Some("192.0.2.2".into());
        status.conditions.as_mut().expect("conditions")[0].status = "False".into();
        let (before, after_record) = (CachedPod::from(before), CachedPod::from(after.clone()));
        assert!(before == after_record);

        after
            .status
            .as_mut()
            .expect("status")
            .conditions
            .as_mut()
            .expect("conditions")[1]
            .status = "True".into();
        assert!(before != CachedPod::from(after.clone()), "Ready changed");
        let mut moved = gateway_pod();
        moved.spec.as_mut().expect("spec").node_name = Some("node-2".into());
        assert!(before != CachedPod::from(moved), "node");
        let mut relabelled = gateway_pod();
        relabelled
            .labels_mut()
            .insert(SITE_LABEL.into(), "dc-it2".into());
        assert!(before != CachedPod::from(relabelled), "site");
    }

    #[test]
    fn a_deployment_record_is_the_same_after_a_change_of_its_conditions_only() {
        let deployment = |version: &str, ready: i32, condition: &str| Deployment {
            metadata: ObjectMeta {
                name: Some("acme-dc-it1".into()),
                namespace: Some("mail".into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            spec: DeploymentSpec::default(),
            status: Some(DeploymentStatus {
                ready_replicas: Some(ready),
                conditions: Some(vec![k8s_openapi::api::apps::v1::DeploymentCondition {
                    reason: Some(condition.into()),
                    ..Default::default()
                }]),
                ..DeploymentStatus::default()
            }),
        };
        let before = CachedDeployment::from(deployment("1", 1, "NewReplicaSetCreated"));
        let progressed = CachedDeployment::from(deployment("2", 1, "ReplicaSetUpdated"));
        assert!(before == progressed);
        let ready = CachedDeployment::from(deployment("3", 2, "ReplicaSetUpdated"));
        assert!(before != ready);
    }

    #[test]
    fn a_child_record_changes_with_its_applied_hash_and_site_not_its_version() {
        let before = CachedChild::from(config_map());
        let mut cm = config_map();
        cm.metadata.resource_version = Some("43".into());
        cm.annotations_mut()
            .insert("other".into(), "changed".into());
        assert!(before == CachedChild::from(cm.clone()));
        cm.annotations_mut()
            .insert(APPLIED_HASH_ANNOTATION.into(), "4567".into());
        assert!(before != CachedChild::from(cm));
        let mut moved = config_map();
        moved
            .labels_mut()
            .insert(SITE_LABEL.into(), "dc-it2".into());
        assert!(before != CachedChild::from(moved));
    }
}
