//! What the MailDomain controller reads from memory: in-memory stores (a
//! reflector store per kind, and the children's records filed by domain),
//! each filled by a watch in a task of its own (never by the controller's
//! trigger polling: a reconcile waits for them). The same watches trigger
//! the reconciles, each after its store holds the change, so a reconcile
//! never reads a store older than what triggered it. A reconcile finds the Sites,
//! SigningKeys, gateway Deployments and pods, and the names and labels of
//! its other children here instead of asking the API server, so a converged
//! platform costs watches only.
//!
//! A store lags the API server by at most one watch event. A reconcile that
//! reads a stale store at worst applies a child once more or deletes one
//! that is already gone; the event that brings the store up to date
//! triggers another reconcile of the same domain.
//!
//! Only what the controller reads is kept: the children as the compact
//! records of [`super::cached`], filed by domain (see [`super::by_domain`]):
//! pods, Deployments, the operator's own EndpointSlices (which the SLA
//! probe reads too) and, from a watch of their metadata, the ConfigMaps,
//! Services, PDBs and NetworkPolicies. The EndpointSlice controller's
//! slices are not kept at all; everything else is kept without its managed
//! fields or the copy of its manifest `kubectl apply` keeps.

use std::sync::Arc;

use futures::channel::mpsc::UnboundedReceiver;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    core::PartialObjectMeta,
    runtime::{
        reflector::{ObjectRef, Store},
        watcher::{self, Config},
    },
};
use serde::de::DeserializeOwned;

use super::{
    build::{self, DOMAIN_LABEL},
    by_domain::{ByDomain, DomainRef, Held},
    cached::{CachedChild, CachedDeployment, CachedPod, CachedSlice},
    references,
};
use crate::{
    api::{MailDomain, SigningKey, Site},
    controllers::{
        MANAGED_BY,
        watch_cache::{self, Cache, Stopped, Triggers, trigger},
    },
};

/// The stores a reconcile reads.
#[derive(Clone)]
pub struct Caches {
    /// The controller's own store of MailDomains.
    pub mail_domains: Cache<MailDomain>,
    pub sites: Cache<Site>,
    pub signing_keys: Cache<SigningKey>,
    /// Every domain's children.
    pub children: ByDomain,
    /// The platform routes ConfigMap of each namespace (see
    /// [`super::routes`]).
    pub routes: Cache<PartialObjectMeta<ConfigMap>>,
    /// Every Secret, cut to what the reference checks read (see
    /// [`references::keep_what_is_checked`]).
    pub secrets: Cache<Secret>,
}

/// The label selector of the children this operator made for a domain.
fn domain_children() -> Config {
    Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={MANAGED_BY},{DOMAIN_LABEL}"
    ))
}

/// The label selector of the EndpointSlices this operator made (those of
/// the domain Services). The per-site Services' slices, which the
/// EndpointSlice controller makes, carry the operator's labels too but are
/// read by nothing here: left out, they cost neither memory nor events.
fn own_endpoint_slices() -> Config {
    Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={MANAGED_BY},{DOMAIN_LABEL},{}",
        build::own_endpoint_slice_selector()
    ))
}

/// The selector of the platform routes ConfigMap of every namespace.
fn platform_routes() -> Config {
    Config::default()
        .labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"))
        .fields(&format!("metadata.name={}", super::routes::PLATFORM_ROUTES))
}

/// Reconciles the MailDomains `domains_of` finds in `domains` for a
/// changed object.
fn related<K: 'static>(
    triggers: &Triggers<MailDomain>,
    domains: &Cache<MailDomain>,
    domains_of: fn(&Store<MailDomain>, &K) -> Vec<ObjectRef<MailDomain>>,
) -> impl FnMut(&K) + Send + 'static {
    let (triggers, domains) = (triggers.clone(), domains.clone());
    move |obj| trigger(&triggers, domains_of(&domains, obj))
}

/// The MailDomains in `domains` for which `wanted` holds.
fn domains_where(
    domains: &Store<MailDomain>,
    wanted: impl Fn(&MailDomain) -> bool,
) -> Vec<ObjectRef<MailDomain>> {
    domains
        .state()
        .iter()
        .filter(|md| wanted(md))
        .map(|md| ObjectRef::from_obj(md.as_ref()))
        .collect()
}

/// The MailDomains in `domains` that list the Site `site`.
fn domains_on_site(domains: &Store<MailDomain>, site: &Site) -> Vec<ObjectRef<MailDomain>> {
    let name = site.name_any();
    domains_where(domains, |md| md.spec.sites.contains(&name))
}

/// The MailDomains in `domains` that sign with the SigningKey `key`.
fn domains_signing_with(
    domains: &Store<MailDomain>,
    key: &SigningKey,
) -> Vec<ObjectRef<MailDomain>> {
    let name = key.name_any();
    let namespace = key.namespace();
    domains_where(domains, |md| {
        md.namespace() == namespace && md.spec.signing_key_ref.as_deref() == Some(&name)
    })
}

/// Which MailDomain changes ask for a reconcile: a domain seen for the
/// first time, a new generation (its spec changed), its deletion starting,
/// or a change of its labels or annotations (so `kubectl annotate` asks for
/// a reconcile, as it does of Flux's controllers). A change of status alone
/// does not: those are this controller's own writes, and the reconcile that
/// wrote one has already acted on what it reports (controller-runtime's
/// `GenerationChangedPredicate` filters the same way). A relist after a
/// broken watch still catches a spec changed meanwhile, by its generation.
#[derive(Default)]
struct SpecChanges {
    seen: std::collections::HashMap<ObjectRef<MailDomain>, u64>,
}

impl SpecChanges {
    /// Whether `md`'s change asks for a reconcile; `held` says whether the
    /// store still holds a domain (one it no longer holds was deleted, and
    /// is forgotten here too).
    fn changed(&mut self, md: &MailDomain, held: impl Fn(&ObjectRef<MailDomain>) -> bool) -> bool {
        use std::hash::{Hash, Hasher};
        let key = ObjectRef::from_obj(md);
        if !held(&key) {
            self.seen.remove(&key);
            return false;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (
            md.metadata.generation,
            md.metadata.deletion_timestamp.is_some(),
            &md.metadata.labels,
            &md.metadata.annotations,
        )
            .hash(&mut hasher);
        let now = hasher.finish();
        self.seen.insert(key, now) != Some(now)
    }
}

/// The MailDomains in `domains` that name the Secret `secret` (as their TLS
/// or mailboxes Secret).
fn domains_naming_secret(
    domains: &Store<MailDomain>,
    secret: &Secret,
) -> Vec<ObjectRef<MailDomain>> {
    let name = secret.name_any();
    let namespace = secret.namespace();
    domains_where(domains, |md| {
        let gateway = &md.spec.gateway;
        md.namespace() == namespace
            && (gateway.tls_secret_ref.as_deref() == Some(&name)
                || gateway.mailboxes_secret_ref.as_deref() == Some(&name))
    })
}

/// The annotation `kubectl apply` (client-side) leaves on what it applied:
/// the whole manifest again, as JSON.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what no reconcile reads from every cached object: its managed
/// fields, and the copy of its manifest `kubectl apply` keeps in an
/// annotation (as large as the spec itself; it changes only with the spec,
/// so no change goes unseen without it).
fn drop_unread<K: Resource>(obj: &mut K) {
    obj.managed_fields_mut().clear();
    let annotations = obj.annotations_mut();
    annotations.remove(LAST_APPLIED);
    if annotations.is_empty() {
        obj.meta_mut().annotations = None;
    }
}

/// [`drop_unread`], and the MailDomain copied: a copy's lists take only
/// the room their items need, where those deserialized from the watch keep
/// what they grew to (a list of five conditions has room for eight).
fn trim_domain(md: &mut MailDomain) {
    drop_unread(md);
    *md = md.clone();
}

/// Builds the stores, each filled in a task of its own, and the stream of
/// the reconciles their changes ask for:
/// - a MailDomain's change reconciles it;
/// - a child's change (a gateway pod's too: its readiness decides the
///   domain's endpoints) reconciles the MailDomain it belongs to, unless
///   its record stays as it was; after a relist, each domain whose
///   children of that kind changed is reconciled (see
///   [`super::by_domain`]);
/// - a SigningKey's change (a new active generation rolls the gateways)
///   reconciles the domains that sign with it;
/// - a Site's change reconciles the domains that list it.
pub fn caches(client: &Client) -> (Caches, UnboundedReceiver<ObjectRef<MailDomain>>) {
    let (triggers, requests) = futures::channel::mpsc::unbounded();
    // The store the callback below reads is the one `spawn` makes: set
    // before the watch's task delivers its first event to it.
    let store = Arc::new(std::sync::OnceLock::<Store<MailDomain>>::new());
    let mail_domains = watch_cache::spawn(
        Api::<MailDomain>::all(client.clone()),
        Config::default(),
        trim_domain,
        {
            let (triggers, store) = (triggers.clone(), store.clone());
            let mut seen = SpecChanges::default();
            move |md: &MailDomain| {
                let held =
                    |key: &ObjectRef<MailDomain>| store.get().is_none_or(|s| s.get(key).is_some());
                if seen.changed(md, held) {
                    trigger(&triggers, [ObjectRef::from_obj(md)]);
                }
            }
        },
    );
    let _ = store.set(mail_domains.store().clone());
    let caches = Caches {
        sites: watch_cache::spawn(
            Api::<Site>::all(client.clone()),
            Config::default(),
            drop_unread,
            related(&triggers, &mail_domains, domains_on_site),
        ),
        signing_keys: watch_cache::spawn(
            Api::<SigningKey>::all(client.clone()),
            Config::default(),
            drop_unread,
            related(&triggers, &mail_domains, domains_signing_with),
        ),
        children: children(client, &triggers),
        routes: watch_cache::spawn(
            Api::<PartialObjectMeta<ConfigMap>>::all(client.clone()),
            platform_routes(),
            drop_unread,
            |_| {},
        ),
        secrets: watch_cache::spawn(
            Api::<Secret>::all(client.clone()),
            Config::default(),
            references::keep_what_is_checked,
            related(&triggers, &mail_domains, domains_naming_secret),
        ),
        mail_domains,
    };
    (caches, requests)
}

/// The cache of every domain's children, kind by kind.
fn children(client: &Client, triggers: &Triggers<MailDomain>) -> ByDomain {
    let mut children = ByDomain::default();
    children.watch(
        watcher::watcher(Api::<Deployment>::all(client.clone()), domain_children()),
        CachedDeployment::from,
        triggers,
    );
    children.watch(
        watcher::watcher(Api::<Pod>::all(client.clone()), domain_children()),
        CachedPod::from,
        triggers,
    );
    metadata_of::<ConfigMap>(&mut children, client, triggers);
    metadata_of::<Service>(&mut children, client, triggers);
    metadata_of::<PodDisruptionBudget>(&mut children, client, triggers);
    metadata_of::<NetworkPolicy>(&mut children, client, triggers);
    children.watch(
        watcher::watcher(
            Api::<EndpointSlice>::all(client.clone()),
            own_endpoint_slices(),
        ),
        CachedSlice::from,
        triggers,
    );
    children
}

/// Fills `children` with the `K` objects of the domains, as
/// [`CachedChild`]ren, from a watch of their metadata only (the API server
/// sends no data or spec: a ConfigMap's gateway configuration is not
/// read).
fn metadata_of<K>(children: &mut ByDomain, client: &Client, triggers: &Triggers<MailDomain>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
    CachedChild<K>: super::by_domain::Kind,
{
    children.watch(
        // An `Api` of `PartialObjectMeta` asks for metadata only.
        watcher::watcher(
            Api::<PartialObjectMeta<K>>::all(client.clone()),
            domain_children(),
        ),
        CachedChild::from,
        triggers,
    );
}

impl Caches {
    /// Waits until every store holds its first complete list; a reconcile
    /// must never take a store still filling for the truth (a Site not yet
    /// listed would look deleted).
    pub async fn ready(&self) -> Result<(), Stopped> {
        self.mail_domains.ready().await?;
        self.sites.ready().await?;
        self.signing_keys.ready().await?;
        self.children.ready().await?;
        self.routes.ready().await?;
        self.secrets.ready().await
    }

    /// The Secret `name` in `namespace` as the cache keeps it, if it exists.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        self.secrets
            .get(&ObjectRef::new(name).within(namespace))
            .map(|s| s.as_ref().clone())
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

    /// The children of `domain` as the caches hold them now.
    pub fn held(&self, domain: &DomainRef) -> Arc<Held> {
        self.children.get(domain)
    }
}

#[cfg(test)]
mod tests {
    use super::SpecChanges;
    use super::*;
    use crate::controllers::mail_domain::{
        build::tests::{domain, site},
        status::tests::key,
    };
    use kube::runtime::watcher::Event;

    #[test]
    fn a_cached_domain_keeps_neither_managed_fields_nor_kubectl_s_copy() {
        let mut md = domain(&["dc-it1", "dc-it2"]);
        let manifest = serde_json::to_string(&md).unwrap();
        md.metadata.managed_fields = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry::default(),
        ]);
        md.annotations_mut()
            .insert(LAST_APPLIED.into(), manifest.clone());
        md.annotations_mut().insert("team".into(), "mail".into());
        let spec = md.spec.clone();
        drop_unread(&mut md);
        assert!(md.managed_fields().is_empty());
        assert_eq!(
            md.metadata.annotations,
            Some([("team".to_string(), "mail".to_string())].into())
        );
        assert_eq!(md.spec, spec);

        md.annotations_mut().insert(LAST_APPLIED.into(), manifest);
        md.annotations_mut().remove("team");
        drop_unread(&mut md);
        assert_eq!(md.metadata.annotations, None, "no empty map is kept");
    }

    #[test]
    fn a_cached_domain_s_lists_take_only_the_room_their_items_need() {
        let conditions: Vec<_> = (0..5)
            .map(|i| {
                serde_json::json!({
                    "type": format!("Check{i}"), "status": "True", "reason": "Fine",
                    "message": "all good", "lastTransitionTime": "2026-01-01T00:00:00Z",
                })
            })
            .collect();
        // From text, as the watch reads it (a `Value` would tell its length).
        let mut md: MailDomain = serde_json::from_str(
            &serde_json::json!({
                "apiVersion": "pec.dev/v1alpha1", "kind": "MailDomain",
                "metadata": {"name": "acme", "namespace": "mail"},
                "spec": serde_json::to_value(&domain(&["dc-it1"]).spec).expect("spec"),
                "status": {"conditions": conditions},
            })
            .to_string(),
        )
        .expect("a MailDomain");
        let room = |md: &MailDomain| {
            let conditions = &md.status.as_ref().expect("status").conditions;
            (conditions.len(), conditions.capacity())
        };
        assert_eq!(room(&md), (5, 8), "deserialized, the list grew by doubling");
        let mut before = md.clone();
        drop_unread(&mut before);
        trim_domain(&mut md);
        assert_eq!(
            serde_json::to_value(&md).expect("json"),
            serde_json::to_value(&before).expect("json"),
            "the same domain"
        );
        assert_eq!(room(&md), (5, 5));
    }

    /// A store holding `domains`, as the controller's watch fills it.
    fn store_of(domains: Vec<MailDomain>) -> Store<MailDomain> {
        let (store, mut writer) = kube::runtime::reflector::store();
        for md in domains {
            writer.apply_watcher_event(&Event::Apply(md));
        }
        store
    }

    #[test]
    fn a_site_triggers_the_domains_that_list_it_and_a_key_those_that_sign_with_it() {
        let mut other = domain(&["dc-it3"]);
        other.metadata.name = Some("other".into());
        other.spec.signing_key_ref = Some("other-key".into());
        let domains = store_of(vec![domain(&["dc-it1", "dc-it2"]), other]);
        let acme = ObjectRef::<MailDomain>::new("acme").within("mail");
        assert_eq!(
            domains_on_site(&domains, &site("dc-it2")),
            vec![acme.clone()]
        );
        assert!(domains_on_site(&domains, &site("dc-it9")).is_empty());

        let mut key = key(&["pec.acme.it"]);
        key.metadata.namespace = Some("mail".into());
        assert_eq!(domains_signing_with(&domains, &key), vec![acme]);
        key.metadata.namespace = Some("elsewhere".into());
        assert!(
            domains_signing_with(&domains, &key).is_empty(),
            "a key of the same name in another namespace"
        );
    }

    #[test]
    fn a_secret_triggers_the_domains_that_name_it() {
        let mut tls = domain(&["dc-it1"]);
        tls.spec.gateway.tls_secret_ref = Some("acme-tls".into());
        let mut mailboxes = domain(&["dc-it1"]);
        mailboxes.metadata.name = Some("mailboxes".into());
        mailboxes.spec.gateway.mailboxes_secret_ref = Some("acme-tls".into());
        let mut other = domain(&["dc-it1"]);
        other.metadata.name = Some("other".into());
        other.spec.gateway.tls_secret_ref = Some("other-tls".into());
        let domains = store_of(vec![tls, mailboxes, other]);
        let secret = |namespace: &str| Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("acme-tls".into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            ..Secret::default()
        };
        let mut named = domains_naming_secret(&domains, &secret("mail"));
        named.sort_by_key(|r| r.name.clone());
        assert_eq!(
            named,
            vec![
                ObjectRef::new("acme").within("mail"),
                ObjectRef::new("mailboxes").within("mail")
            ]
        );
        assert!(
            domains_naming_secret(&domains, &secret("elsewhere")).is_empty(),
            "a Secret of the same name in another namespace"
        );
    }

    #[test]
    fn a_status_write_alone_asks_for_no_reconcile() {
        let mut md: MailDomain = serde_yaml::from_str(include_str!(
            "../../../examples/20-maildomain-standard.yaml"
        ))
        .expect("the example parses");
        md.metadata.generation = Some(1);
        let mut seen = SpecChanges::default();
        let held = |_: &ObjectRef<MailDomain>| true;
        assert!(seen.changed(&md, held), "first seen");
        md.status = Some(Default::default());
        assert!(!seen.changed(&md, held), "status alone");
        md.metadata.generation = Some(2);
        assert!(seen.changed(&md, held), "the spec changed");
        md.metadata
            .annotations
            .get_or_insert_default()
            .insert("touch".into(), "1".into());
        assert!(seen.changed(&md, held), "annotated");
        assert!(!seen.changed(&md, held), "the same again");
        md.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
        );
        assert!(seen.changed(&md, held), "deletion started");
        assert!(!seen.changed(&md, |_| false), "gone: nothing to reconcile");
        assert!(seen.seen.is_empty(), "and forgotten");
        assert!(seen.changed(&md, held), "made again under the same name");
    }
}
