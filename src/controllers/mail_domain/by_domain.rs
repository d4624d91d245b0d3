//! The MailDomain controller's cache of its children: one record per
//! domain ([`Held`]), holding each kind of child in a short list sorted by
//! name, filled by one watch per kind.
//!
//! A reflector store keeps each object behind an `Arc` of its own, under a
//! key of four strings, in a table of its own kind: at 1,000 domains each
//! of a domain's 17 children cost about 260 bytes of table and key, as
//! much as most of the records themselves, and finding a domain's children
//! meant scanning every object of the kind. Here a domain costs one table
//! entry and one record (about 430 bytes), and a reconcile takes its
//! record by the domain's name.
//!
//! Every child carries its domain's label, and the watches select on it.
//! A child is filed under the MailDomain that owns it (a gateway pod, owned
//! by its ReplicaSet, under the one its label names), in its namespace
//! ([`domain_of`]): a label changed by hand to another domain moves
//! nothing, and the owner's reconcile keeps the child as its own.
//!
//! A record is shared (`Arc`) and copied on write: a reconcile holds the
//! record it took, as it was, while the watches file newer changes.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod, Service},
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Resource,
    runtime::{
        WatchStreamExt,
        reflector::ObjectRef,
        watcher::{self, Event},
    },
};
use tokio::sync::watch;

use super::cached::{CachedChild, CachedDeployment, CachedPod, CachedSlice, Child, domain_of};
use crate::{
    api::MailDomain,
    controllers::watch_cache::{self, Stopped, Triggers, trigger},
};

/// Which MailDomain a record belongs to.
pub type DomainRef = ObjectRef<MailDomain>;

/// One domain's children as the cache holds them, each kind sorted by
/// name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Held {
    pub deployments: Vec<CachedDeployment>,
    pub pods: Vec<CachedPod>,
    pub config_maps: Vec<CachedChild<ConfigMap>>,
    pub services: Vec<CachedChild<Service>>,
    pub pdbs: Vec<CachedChild<PodDisruptionBudget>>,
    pub network_policies: Vec<CachedChild<NetworkPolicy>>,
    /// The EndpointSlices of the domain Service (the operator's own).
    pub endpoint_slices: Vec<CachedSlice>,
}

impl Held {
    /// Whether it holds no child at all.
    fn is_empty(&self) -> bool {
        // Destructured without `..`: a new kind must be counted here.
        let Self {
            deployments,
            pods,
            config_maps,
            services,
            pdbs,
            network_policies,
            endpoint_slices,
        } = self;
        deployments.is_empty()
            && pods.is_empty()
            && config_maps.is_empty()
            && services.is_empty()
            && pdbs.is_empty()
            && network_policies.is_empty()
            && endpoint_slices.is_empty()
    }

    /// The Deployments, as `domain`'s (see [`CachedDeployment::to_deployment`]).
    pub fn deployments(&self, domain: &DomainRef) -> Vec<Deployment> {
        self.deployments
            .iter()
            .map(|d| d.to_deployment(domain))
            .collect()
    }

    /// The gateway pods, as `domain`'s (see [`CachedPod::to_pod`]).
    pub fn pods(&self, domain: &DomainRef) -> Vec<Pod> {
        self.pods.iter().map(|p| p.to_pod(domain)).collect()
    }
}

/// The child `name` in `children` (one kind of a [`Held`], sorted by name).
pub fn find<'a, C: Child>(children: &'a [C], name: &str) -> Option<&'a C> {
    children.get(position(children, name).ok()?)
}

/// Where `name` is in `children` (sorted by name), or where it would go.
fn position<C: Child>(children: &[C], name: &str) -> Result<usize, usize> {
    children.binary_search_by(|c| c.name().cmp(name))
}

/// A kind of child a [`Held`] keeps, and where.
pub trait Kind: Child {
    fn of(held: &Held) -> &Vec<Self>;
    fn of_mut(held: &mut Held) -> &mut Vec<Self>;
}

macro_rules! kind {
    ($ty:ty => $field:ident) => {
        impl Kind for $ty {
            fn of(held: &Held) -> &Vec<Self> {
                &held.$field
            }

            fn of_mut(held: &mut Held) -> &mut Vec<Self> {
                &mut held.$field
            }
        }
    };
}

kind!(CachedDeployment => deployments);
kind!(CachedPod => pods);
kind!(CachedChild<ConfigMap> => config_maps);
kind!(CachedChild<Service> => services);
kind!(CachedChild<PodDisruptionBudget> => pdbs);
kind!(CachedChild<NetworkPolicy> => network_policies);
kind!(CachedSlice => endpoint_slices);

/// The records, by domain.
#[derive(Clone, Default)]
struct Records(Arc<RwLock<HashMap<DomainRef, Arc<Held>>>>);

impl Records {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<DomainRef, Arc<Held>>> {
        // A writer that panicked left whole records: each change is one
        // assignment.
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<DomainRef, Arc<Held>>> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Files `child` under `domain`, in place of the one of the same name;
    /// returns whether the record changed.
    fn apply<C: Kind>(&self, domain: &DomainRef, child: C) -> bool {
        let mut records = self.write();
        let held = match records.get_mut(domain) {
            Some(held) => held,
            None => records.entry(domain.clone()).or_default(),
        };
        match position(C::of(held), child.name()) {
            Ok(at) if C::of(held)[at] == child => false,
            Ok(at) => {
                C::of_mut(Arc::make_mut(held))[at] = child;
                true
            }
            Err(at) => {
                let children = C::of_mut(Arc::make_mut(held));
                // Lists are short: an exact fit beats doubling.
                children.reserve_exact(1);
                children.insert(at, child);
                true
            }
        }
    }

    /// Forgets `domain`'s child `name`; returns whether it was held.
    fn delete<C: Kind>(&self, domain: &DomainRef, name: &str) -> bool {
        let mut records = self.write();
        let Some(held) = records.get_mut(domain) else {
            return false;
        };
        let Ok(at) = position(C::of(held), name) else {
            return false;
        };
        let held = Arc::make_mut(held);
        C::of_mut(held).remove(at);
        if held.is_empty() {
            records.remove(domain);
        }
        true
    }

    /// Replaces every domain's `C` children with `listed` (each list sorted
    /// by name); returns the domains whose `C` children changed.
    fn replace<C: Kind>(&self, mut listed: HashMap<DomainRef, Vec<C>>) -> Vec<DomainRef> {
        let mut records = self.write();
        let mut changed = Vec::new();
        records.retain(|domain, held| {
            let now = listed.remove(domain).unwrap_or_default();
            if *C::of(held) != now {
                *C::of_mut(Arc::make_mut(held)) = now;
                changed.push(domain.clone());
            }
            !held.is_empty()
        });
        for (domain, now) in listed {
            let mut held = Held::default();
            *C::of_mut(&mut held) = now;
            records.insert(domain.clone(), Arc::new(held));
            changed.push(domain);
        }
        changed
    }
}

/// The children of every MailDomain, filled by the watches
/// [`ByDomain::watch`] starts.
#[derive(Clone, Default)]
pub struct ByDomain {
    records: Records,
    /// One per watch: whether it has listed once.
    ready: Vec<watch::Receiver<bool>>,
}

impl ByDomain {
    /// `domain`'s children as the cache holds them now (none when it holds
    /// none).
    pub fn get(&self, domain: &DomainRef) -> Arc<Held> {
        self.records.read().get(domain).cloned().unwrap_or_default()
    }

    /// Every record, with the domain it belongs to.
    pub fn all(&self) -> Vec<(DomainRef, Arc<Held>)> {
        let records = self.records.read();
        records
            .iter()
            .map(|(domain, held)| (domain.clone(), held.clone()))
            .collect()
    }

    /// The operator's EndpointSlices in `namespace`, whatever their domain.
    pub fn endpoint_slices_in(&self, namespace: &str) -> Vec<CachedSlice> {
        let records = self.records.read();
        records
            .iter()
            .filter(|(domain, _)| domain.namespace.as_deref() == Some(namespace))
            .flat_map(|(_, held)| held.endpoint_slices.iter().cloned())
            .collect()
    }

    /// Waits until every watch has listed once: until then a child missing
    /// from a record may exist. Every waiter is woken.
    pub async fn ready(&self) -> Result<(), Stopped> {
        for ready in &self.ready {
            watch_cache::listed(ready).await?;
        }
        Ok(())
    }

    /// Fills the `C` children with `into(obj)` for each object `feed` (a
    /// kube watcher: of whole objects, or of their metadata) brings, in a
    /// task of its own until the process ends; asks `triggers` for a
    /// reconcile of each domain whose record changed (see
    /// [`Filing::take`]).
    pub fn watch<K, C: Kind>(
        &mut self,
        feed: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
        into: fn(K) -> C,
        triggers: &Triggers<MailDomain>,
    ) where
        K: Resource + Send + 'static,
    {
        let (listed, ready) = watch::channel(false);
        self.ready.push(ready);
        let mut filing = Filing {
            records: self.records.clone(),
            listing: HashMap::new(),
        };
        let triggers = triggers.clone();
        let filed = move |obj: K| Some((domain_of(obj.meta())?, into(obj)));
        tokio::spawn(feed.default_backoff().for_each(move |event| {
            // The watcher retries with backoff; the records keep what they
            // had.
            if let Ok(event) = event {
                let done = matches!(event, Event::InitDone);
                let changed = filing.take(file(event, filed));
                if done {
                    listed.send_replace(true);
                }
                trigger(&triggers, changed);
            }
            futures::future::ready(())
        }));
    }
}

/// `event` with its object filed: `None` for one that belongs to no
/// domain.
fn file<K, C>(event: Event<K>, filed: impl Fn(K) -> Option<C>) -> Event<Option<C>> {
    match event {
        Event::Apply(obj) => Event::Apply(filed(obj)),
        Event::Delete(obj) => Event::Delete(filed(obj)),
        Event::Init => Event::Init,
        Event::InitApply(obj) => Event::InitApply(filed(obj)),
        Event::InitDone => Event::InitDone,
    }
}

/// What one watch does to the records: its kind's children, and the list
/// it is taking.
struct Filing<C> {
    records: Records,
    /// The children listed so far, while a (re)list is under way.
    listing: HashMap<DomainRef, Vec<C>>,
}

impl<C: Kind> Filing<C> {
    /// Takes one event of the watch; returns the domains to reconcile.
    ///
    /// A change that leaves a domain's record as it was (a new version of
    /// the object with nothing the record keeps changed) asks for none;
    /// any other asks for its domain. A relist is taken whole, once
    /// complete: then each domain whose `C` children differ from those
    /// held before is named.
    fn take(&mut self, event: Event<Option<(DomainRef, C)>>) -> Vec<DomainRef> {
        match event {
            Event::Apply(Some((domain, child))) => {
                let changed = self.records.apply(&domain, child);
                changed.then_some(domain).into_iter().collect()
            }
            Event::Delete(Some((domain, child))) => {
                let changed = self.records.delete::<C>(&domain, child.name());
                changed.then_some(domain).into_iter().collect()
            }
            Event::Init => {
                self.listing.clear();
                Vec::new()
            }
            Event::InitApply(Some((domain, child))) => {
                self.listing.entry(domain).or_default().push(child);
                Vec::new()
            }
            Event::InitDone => {
                let mut complete = std::mem::take(&mut self.listing);
                for children in complete.values_mut() {
                    children.sort_by(|a, b| a.name().cmp(b.name()));
                    children.shrink_to_fit();
                }
                self.records.replace(complete)
            }
            Event::Apply(None) | Event::Delete(None) | Event::InitApply(None) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::ObjectMeta;

    fn domain(name: &str) -> DomainRef {
        ObjectRef::new(name).within("mail")
    }

    fn pod(name: &str, node: &str) -> CachedPod {
        CachedPod::from(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: Some(node.into()),
                ..Default::default()
            }),
            status: None,
        })
    }

    fn names(held: &Held) -> Vec<&str> {
        held.pods.iter().map(|p| p.name()).collect()
    }

    #[test]
    fn a_domain_s_children_are_kept_by_name_and_found_by_name() {
        let records = Records::default();
        for name in ["c", "a", "b"] {
            assert!(records.apply(&domain("acme"), pod(name, "n1")), "new");
        }
        assert!(records.apply(&domain("other"), pod("x", "n1")));
        let by = ByDomain {
            records: records.clone(),
            ready: Vec::new(),
        };
        let acme = by.get(&domain("acme"));
        assert_eq!(names(&acme), ["a", "b", "c"]);
        assert_eq!(find(&acme.pods, "b"), Some(&pod("b", "n1")));
        assert_eq!(find(&acme.pods, "d"), None);
        assert!(by.get(&domain("nobody")).is_empty());
        let slice = CachedSlice::default();
        records.apply(&domain("other"), slice.clone());
        assert_eq!(by.endpoint_slices_in("mail"), [slice]);
        assert!(by.endpoint_slices_in("elsewhere").is_empty());
    }

    #[test]
    fn only_a_change_of_what_a_record_keeps_counts() {
        let records = Records::default();
        let acme = domain("acme");
        assert!(records.apply(&acme, pod("a", "n1")));
        assert!(!records.apply(&acme, pod("a", "n1")), "the same again");
        assert!(records.apply(&acme, pod("a", "n2")), "moved");
        assert!(records.delete::<CachedPod>(&acme, "a"), "deleted");
        assert!(
            !records.delete::<CachedPod>(&acme, "a"),
            "a deletion of what is not held"
        );
        assert!(records.read().is_empty(), "an empty record is dropped");
    }

    #[test]
    fn a_reconcile_keeps_the_record_it_took_while_the_watch_changes_it() {
        let records = Records::default();
        let acme = domain("acme");
        records.apply(&acme, pod("a", "n1"));
        let by = ByDomain {
            records: records.clone(),
            ready: Vec::new(),
        };
        let taken = by.get(&acme);
        records.apply(&acme, pod("a", "n2"));
        records.apply(&acme, pod("b", "n1"));
        assert_eq!(taken.pods, [pod("a", "n1")], "as it was taken");
        assert_eq!(names(&by.get(&acme)), ["a", "b"]);
    }

    #[test]
    fn a_relist_replaces_one_kind_and_names_the_domains_it_changed() {
        let records = Records::default();
        let (acme, gone, same) = (domain("acme"), domain("gone"), domain("same"));
        records.apply(&acme, pod("a", "n1"));
        records.apply(&gone, pod("g", "n1"));
        records.apply(&same, pod("s", "n1"));
        let slice = CachedSlice::default();
        records.apply(&gone, slice.clone());
        let listed = HashMap::from([
            (acme.clone(), vec![pod("a", "n2")]),
            (same.clone(), vec![pod("s", "n1")]),
            (domain("new"), vec![pod("n", "n1")]),
        ]);
        let mut changed = records.replace(listed);
        changed.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(changed, [acme.clone(), gone.clone(), domain("new")]);
        let held = records.read();
        assert_eq!(held[&acme].pods, [pod("a", "n2")]);
        assert!(held[&gone].pods.is_empty(), "its pods were not listed");
        assert_eq!(
            held[&gone].endpoint_slices,
            [slice],
            "another kind is left as it was"
        );
        assert_eq!(held.len(), 4);
        drop(held);
        records.replace(HashMap::<DomainRef, Vec<CachedSlice>>::new());
        assert!(
            !records.read().contains_key(&gone),
            "a record left empty by a relist is dropped"
        );
    }

    #[test]
    fn a_watch_s_events_are_filed_and_a_relist_counts_once_complete() {
        let records = Records::default();
        let mut filing = Filing::<CachedPod> {
            records: records.clone(),
            listing: HashMap::new(),
        };
        let (acme, other) = (domain("acme"), domain("other"));
        let apply = |name: &str, node: &str| Event::Apply(Some((acme.clone(), pod(name, node))));
        assert_eq!(filing.take(apply("a", "n1")), std::slice::from_ref(&acme));
        assert!(
            filing.take(apply("a", "n1")).is_empty(),
            "nothing kept changed"
        );
        assert!(
            filing.take(Event::Apply(None)).is_empty(),
            "an object of no domain"
        );

        // A list restarted before it completed: what it had listed goes.
        assert!(filing.take(Event::Init).is_empty());
        let partial = Event::InitApply(Some((other.clone(), pod("z", "n1"))));
        assert!(filing.take(partial).is_empty());
        assert!(filing.take(Event::Init).is_empty());
        let listed =
            |d: &DomainRef, name: &str| Event::InitApply(Some((d.clone(), pod(name, "n1"))));
        assert!(filing.take(listed(&other, "y")).is_empty());
        assert!(filing.take(listed(&other, "x")).is_empty());
        assert!(filing.take(listed(&acme, "a")).is_empty());
        assert!(
            records.read().get(&other).is_none(),
            "a list under way is not seen"
        );
        let mut changed = filing.take(Event::InitDone);
        changed.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            changed,
            std::slice::from_ref(&other),
            "acme's pod is as it was"
        );
        let held = records.read();
        assert_eq!(names(&held[&other]), ["x", "y"], "sorted by name");
        drop(held);

        assert_eq!(
            filing.take(Event::Delete(Some((other.clone(), pod("x", "n1"))))),
            std::slice::from_ref(&other)
        );
        assert_eq!(names(&records.read()[&other]), ["y"]);
    }
}
