//! Watch caches: a store filled by a watch in a task of its own, that
//! knows when it holds its first full list and tells which objects changed
//! once it holds the change. A [`Cache`] keeps the watched objects, trimmed,
//! in a kube reflector [`Store`] ([`spawn`]); a [`Records`] keeps a compact
//! type made from each, in a [`Table`] ([`spawn_as`]).
//!
//! A reconcile waits for [`Cache::ready`], never for kube's
//! `Store::wait_until_ready`: that one is a one-shot channel with a single
//! waker slot, so of several reconciles waiting on one store at once only
//! the last to ask is woken, and the others wait for ever. A new leader
//! starts many reconciles at once, all waiting for the caches, so this
//! happened: a SlaTarget reconcile, started a moment before the
//! MailDomain store filled, never finished. Readiness here is a
//! `tokio::sync::watch`, which wakes every waiter.
//!
//! Why compact records get a table of their own: a reflector [`Store`]
//! keeps beside each object a key (name, namespace, resource version and
//! uid, each a string copied from the object) in a map entry of over 100
//! bytes. With records of 250-500 bytes that key and entry were the larger
//! part: at 1,000 domains about 360 bytes per record, 8.9 MiB of the
//! caches' 18.8. A [`Table`]'s entries are the records themselves, found
//! by their own namespace and name.

use std::{
    hash::BuildHasher,
    ops::Deref,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use futures::StreamExt;
use hashbrown::{DefaultHashBuilder, HashTable, hash_table::Entry};
use kube::{
    Api, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{self, Lookup, Store},
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

/// Whether a cache holds its first full list; every waiter is woken.
#[derive(Clone)]
struct Ready(watch::Receiver<bool>);

impl Ready {
    async fn wait(&self) -> Result<(), Stopped> {
        let mut ready = self.0.clone();
        ready.wait_for(|ready| *ready).await.map_err(|_| Stopped)?;
        Ok(())
    }
}

/// A store of one kind's objects, filled by a task of its own until the
/// process ends. It reads like the [`Store`] it derefs to.
pub struct Cache<K: Lookup<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
    ready: Ready,
}

impl<K: Lookup<DynamicType = ()> + Clone + 'static> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            ready: self.ready.clone(),
        }
    }
}

/// The watch that fills a cache stopped before its first full list (the
/// process is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the watch that fills the cache stopped before its first full list")]
pub struct Stopped;

impl<K: Lookup<DynamicType = ()> + Clone + 'static> Cache<K> {
    /// Waits until the cache holds its first full list: until then an
    /// object missing from it may exist. Every waiter is woken.
    pub async fn ready(&self) -> Result<(), Stopped> {
        self.ready.wait().await
    }

    /// The reflector store, for what takes one (a controller's reader).
    pub fn store(&self) -> &Store<K> {
        &self.store
    }
}

impl<K: Lookup<DynamicType = ()> + Clone + 'static> Deref for Cache<K> {
    type Target = Store<K>;

    fn deref(&self) -> &Store<K> {
        &self.store
    }
}

/// Records of one kind, each held once and found by its namespace and
/// name (see the module's docs for why not a reflector [`Store`]).
pub struct Table<C> {
    inner: Arc<TableInner<C>>,
}

struct TableInner<C> {
    hasher: DefaultHashBuilder,
    records: RwLock<HashTable<Arc<C>>>,
}

impl<C> Clone for Table<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// Whether `record` is the one named `name` in `namespace`.
fn named<C: Lookup>(record: &C, namespace: Option<&str>, name: &str) -> bool {
    record.name().as_deref() == Some(name) && record.namespace().as_deref() == namespace
}

impl<C: Lookup<DynamicType = ()>> TableInner<C> {
    fn hash(&self, namespace: Option<&str>, name: &str) -> u64 {
        self.hasher.hash_one((namespace, name))
    }

    fn hash_of(&self, record: &C) -> u64 {
        self.hash(
            record.namespace().as_deref(),
            record.name().as_deref().unwrap_or_default(),
        )
    }

    /// Puts `record` into `records` in place of the one of the same name.
    fn put(&self, records: &mut HashTable<Arc<C>>, record: Arc<C>) {
        let (namespace, name) = (record.namespace(), record.name());
        let (namespace, name) = (namespace.as_deref(), name.as_deref().unwrap_or_default());
        let found = records.entry(
            self.hash(namespace, name),
            |held| named(held.as_ref(), namespace, name),
            |held| self.hash_of(held),
        );
        match found {
            Entry::Occupied(mut held) => *held.get_mut() = record.clone(),
            Entry::Vacant(vacant) => {
                vacant.insert(record.clone());
            }
        }
    }

    /// The record held under `record`'s name, if any.
    fn find<'a>(&self, records: &'a HashTable<Arc<C>>, record: &C) -> Option<&'a Arc<C>> {
        let (namespace, name) = (record.namespace(), record.name());
        let (namespace, name) = (namespace.as_deref(), name.as_deref().unwrap_or_default());
        records.find(self.hash(namespace, name), |held| {
            named(held.as_ref(), namespace, name)
        })
    }
}

impl<C: Lookup<DynamicType = ()>> Table<C> {
    fn new() -> Self {
        Self {
            inner: Arc::new(TableInner {
                hasher: DefaultHashBuilder::default(),
                records: RwLock::default(),
            }),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, HashTable<Arc<C>>> {
        // A panic while holding the lock cannot leave a table half-written:
        // every change is one call of the table's own.
        self.inner.records.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashTable<Arc<C>>> {
        self.inner
            .records
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The record of `name` in `namespace`, if the table holds one.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<C>> {
        let hash = self.inner.hash(Some(namespace), name);
        self.read()
            .find(hash, |held| named(held.as_ref(), Some(namespace), name))
            .cloned()
    }

    /// Every record the table holds, in no particular order.
    pub fn state(&self) -> Vec<Arc<C>> {
        self.read().iter().cloned().collect()
    }

    /// A table holding `records`, for tests of what reads one.
    #[cfg(test)]
    pub fn of(records: impl IntoIterator<Item = C>) -> Self {
        let mut writer = TableWriter::new(Self::new());
        for record in records {
            writer.take(&Event::Apply(Arc::new(record)), |_, _| false);
        }
        writer.table
    }
}

/// What fills a [`Table`] from a watch's events. As kube's reflector does,
/// a relist is gathered aside and takes the table's place only once
/// complete.
struct TableWriter<C> {
    table: Table<C>,
    relist: HashTable<Arc<C>>,
}

impl<C: Lookup<DynamicType = ()>> TableWriter<C> {
    fn new(table: Table<C>) -> Self {
        Self {
            table,
            relist: HashTable::new(),
        }
    }

    /// Gives `event` to the table; returns whether it was a change after
    /// which `same(before, after)` holds of the record held before.
    fn take(&mut self, event: &Event<Arc<C>>, same: fn(&C, &C) -> bool) -> bool {
        let inner = &*self.table.inner;
        match event {
            Event::Apply(record) => {
                let mut records = self.table.write();
                let unchanged = inner
                    .find(&records, record)
                    .is_some_and(|before| same(before, record));
                inner.put(&mut records, record.clone());
                unchanged
            }
            Event::Delete(record) => {
                let mut records = self.table.write();
                let (namespace, name) = (record.namespace(), record.name());
                let (namespace, name) = (namespace.as_deref(), name.as_deref().unwrap_or_default());
                if let Ok(held) = records.find_entry(inner.hash(namespace, name), |held| {
                    named(held.as_ref(), namespace, name)
                }) {
                    held.remove();
                }
                false
            }
            Event::Init => {
                self.relist = HashTable::new();
                false
            }
            Event::InitApply(record) => {
                inner.put(&mut self.relist, record.clone());
                false
            }
            Event::InitDone => {
                *self.table.write() = std::mem::take(&mut self.relist);
                false
            }
        }
    }
}

/// A [`Table`] of compact records, filled by a task of its own until the
/// process ends. It reads like the table it derefs to.
pub struct Records<C> {
    table: Table<C>,
    ready: Ready,
}

impl<C> Clone for Records<C> {
    fn clone(&self) -> Self {
        Self {
            table: self.table.clone(),
            ready: self.ready.clone(),
        }
    }
}

impl<C> Records<C> {
    /// Waits until the table holds its first full list (see
    /// [`Cache::ready`]).
    pub async fn ready(&self) -> Result<(), Stopped> {
        self.ready.wait().await
    }
}

impl<C> Deref for Records<C> {
    type Target = Table<C>;

    fn deref(&self) -> &Table<C> {
        &self.table
    }
}

/// What a watch can fill a cache with: a Kubernetes kind.
pub trait Watched:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// A cache of `api`'s objects matching `config`, each passed through `trim`
/// first, filled by a watch in a task of its own until the process ends.
///
/// `changed` sees every object the watch adds, changes or deletes, after the
/// store holds that change: a reconcile it triggers reads a store at least
/// as new as the event. After a relist it sees the objects listed, once the
/// store holds the new list. It must not block (it runs in the watch's
/// task).
pub fn spawn<K: Watched>(
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    mut changed: impl FnMut(&K) + Send + 'static,
) -> Cache<K> {
    let (store, writer) = reflector::store();
    let (ready_tx, ready) = watch::channel(false);
    let events = watcher::watcher(api, config)
        .default_backoff()
        .map(move |event| {
            event.map(|event| {
                convert(event, |mut obj| {
                    trim(&mut obj);
                    obj
                })
            })
        });
    let feed = reflector::reflector(writer, events);
    let listed = store.clone();
    tokio::spawn(feed.for_each(move |event| {
        match event {
            Ok(Event::Apply(obj) | Event::Delete(obj)) => changed(&obj),
            Ok(Event::InitDone) => {
                ready_tx.send_replace(true);
                listed.state().iter().for_each(|obj| changed(obj));
            }
            // The store swaps in a new list only once it is complete.
            Ok(Event::Init | Event::InitApply(_)) => {}
            // The watcher retries with backoff; the store keeps what it had.
            Err(_) => {}
        }
        futures::future::ready(())
    }));
    Cache {
        store,
        ready: Ready(ready),
    }
}

/// Records of `api`'s objects matching `config`: `into(obj)` for each, a
/// type of the controller's own holding only what it reads, in a
/// [`Table`] filled like [`spawn`]'s store.
///
/// A change after which `same(before, after)` holds of the record the
/// table kept is stored but not passed to `changed`: what a reconcile reads
/// of it is as it was. A Deployment's conditions or a pod's container
/// statuses change often while it starts, and a record that keeps neither
/// would otherwise trigger a reconcile at each of those changes. Deletions
/// and relists always reach `changed`.
pub fn spawn_as<K, C>(
    api: Api<K>,
    config: watcher::Config,
    into: impl Fn(K) -> C + Send + 'static,
    same: fn(&C, &C) -> bool,
    mut changed: impl FnMut(&C) + Send + 'static,
) -> Records<C>
where
    K: Watched,
    C: Lookup<DynamicType = ()> + Send + Sync + 'static,
{
    let table = Table::new();
    let mut writer = TableWriter::new(table.clone());
    let (ready_tx, ready) = watch::channel(false);
    // The table takes each event before it is passed on; whether the event
    // left its record as it was is read from the table before that.
    let feed = watcher::watcher(api, config)
        .default_backoff()
        .map(move |event| {
            let event = convert(event?, |obj| Arc::new(into(obj)));
            let unchanged = writer.take(&event, same);
            Ok::<_, watcher::Error>((event, unchanged))
        });
    // After a (re)list the table holds exactly what was listed: the records
    // are read from it, not kept a second time while the list arrives.
    let listed = table.clone();
    tokio::spawn(feed.for_each(move |event| {
        match event {
            Ok((Event::Apply(_), true)) => {}
            Ok((Event::Apply(record) | Event::Delete(record), _)) => changed(&record),
            Ok((Event::InitDone, _)) => {
                ready_tx.send_replace(true);
                listed.state().iter().for_each(|record| changed(record));
            }
            // The table swaps in a new list only once it is complete.
            Ok((Event::Init | Event::InitApply(_), _)) => {}
            // The watcher retries with backoff; the table keeps what it had.
            Err(_) => {}
        }
        futures::future::ready(())
    }));
    Records {
        table,
        ready: Ready(ready),
    }
}

/// `event` with its object made into a `C`.
fn convert<K, C>(event: Event<K>, into: impl Fn(K) -> C) -> Event<C> {
    match event {
        Event::Apply(obj) => Event::Apply(into(obj)),
        Event::Delete(obj) => Event::Delete(into(obj)),
        Event::Init => Event::Init,
        Event::InitApply(obj) => Event::InitApply(into(obj)),
        Event::InitDone => Event::InitDone,
    }
}

/// Where a watch cache's changes ask for reconciles: an unbounded channel,
/// so the watch's task never waits for the controller.
pub type Triggers<K> = futures::channel::mpsc::UnboundedSender<reflector::ObjectRef<K>>;

/// Asks `triggers` to reconcile each of `objects`; a controller already
/// gone (the process is shutting down) is no error.
pub fn trigger<K>(
    triggers: &Triggers<K>,
    objects: impl IntoIterator<Item = reflector::ObjectRef<K>>,
) where
    K: Resource<DynamicType = ()>,
{
    for obj in objects {
        let _ = triggers.unbounded_send(obj);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::ResourceExt;

    /// What kube's own readiness got wrong: several waiters, each polled
    /// before the store filled, are all woken when it fills.
    #[tokio::test]
    async fn every_waiter_is_woken_when_the_cache_fills() {
        let (store, _writer) = reflector::store::<ConfigMap>();
        let (ready_tx, ready) = watch::channel(false);
        let cache = Cache {
            store,
            ready: Ready(ready),
        };
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.ready().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(waiters.iter().all(|w| !w.is_finished()), "not ready yet");
        ready_tx.send_replace(true);
        for waiter in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("woken")
                .expect("joined")
                .expect("ready");
        }
    }

    fn config_map(name: &str, version: &str, data: &str) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.into());
        cm.metadata.namespace = Some("mail".into());
        cm.metadata.resource_version = Some(version.into());
        cm.data = Some([("k".to_string(), data.to_string())].into());
        cm
    }

    /// The same data, whatever the version.
    fn same_data(a: &ConfigMap, b: &ConfigMap) -> bool {
        a.data == b.data
    }

    #[test]
    fn only_a_change_of_what_the_record_keeps_counts_as_a_change() {
        let table = Table::new();
        let mut writer = TableWriter::new(table.clone());
        let mut take = |event: Event<ConfigMap>| {
            let event = convert(event, Arc::new);
            writer.take(&event, same_data)
        };
        assert!(!take(Event::Apply(config_map("a", "1", "x"))), "new");
        assert!(
            take(Event::Apply(config_map("a", "2", "x"))),
            "a new version only"
        );
        assert!(!take(Event::Apply(config_map("a", "3", "y"))), "changed");
        assert!(
            !take(Event::Apply(config_map("b", "4", "y"))),
            "another object"
        );
        assert!(
            !take(Event::Delete(config_map("a", "5", "y"))),
            "a deletion always counts"
        );
        assert!(table.get("mail", "a").is_none(), "deleted");
        assert!(!take(Event::Apply(config_map("a", "6", "y"))), "back again");
        assert!(
            take(Event::Apply(config_map("a", "7", "y"))),
            "the same again"
        );
        let held = table.get("mail", "a").expect("held");
        assert_eq!(
            held.metadata.resource_version.as_deref(),
            Some("7"),
            "the table keeps the newest version"
        );
        assert_eq!(table.state().len(), 2, "one record per object");
    }

    #[test]
    fn a_table_finds_a_record_by_namespace_and_name() {
        let mut elsewhere = config_map("a", "1", "other");
        elsewhere.metadata.namespace = Some("elsewhere".into());
        let table = Table::of([
            config_map("a", "1", "x"),
            elsewhere,
            config_map("b", "2", "y"),
        ]);
        let data = |ns: &str, name: &str| {
            table
                .get(ns, name)
                .and_then(|cm| cm.data.as_ref()?.get("k").cloned())
        };
        assert_eq!(data("mail", "a").as_deref(), Some("x"));
        assert_eq!(data("elsewhere", "a").as_deref(), Some("other"));
        assert_eq!(data("mail", "b").as_deref(), Some("y"));
        assert_eq!(data("elsewhere", "b"), None);
        assert_eq!(data("mail", "c"), None);
    }

    /// A relist replaces the table's records only once it is complete:
    /// until then readers see the old ones, and afterwards nothing the
    /// relist did not list.
    #[test]
    fn a_relist_takes_the_tables_place_only_when_complete() {
        let table = Table::of([config_map("old", "1", "x"), config_map("kept", "2", "x")]);
        let mut writer = TableWriter::new(table.clone());
        let mut take = |event: Event<ConfigMap>| writer.take(&convert(event, Arc::new), same_data);
        take(Event::Init);
        take(Event::InitApply(config_map("kept", "3", "y")));
        take(Event::InitApply(config_map("new", "4", "y")));
        assert!(table.get("mail", "old").is_some(), "still the old list");
        assert!(
            table.get("mail", "new").is_none(),
            "the relist is not complete"
        );
        take(Event::InitDone);
        let mut names: Vec<String> = table.state().iter().map(|cm| cm.name_any()).collect();
        names.sort();
        assert_eq!(names, ["kept", "new"]);
        assert_eq!(
            table
                .get("mail", "kept")
                .expect("kept")
                .metadata
                .resource_version
                .as_deref(),
            Some("3")
        );
    }

    #[tokio::test]
    async fn a_cache_whose_watch_stopped_says_so() {
        let (store, _writer) = reflector::store::<ConfigMap>();
        let (ready_tx, ready) = watch::channel(false);
        let cache = Cache {
            store,
            ready: Ready(ready),
        };
        drop(ready_tx);
        assert!(cache.ready().await.is_err());
    }
}
