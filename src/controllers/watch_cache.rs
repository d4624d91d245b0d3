//! Watch caches: a reflector store filled by a watch in a task of its own,
//! that knows when it holds its first full list and tells which objects
//! changed once it holds the change. A cache keeps the watched objects,
//! trimmed. (The MailDomain controller keeps its children in a cache of its
//! own, by domain: `mail_domain::by_domain`.)
//!
//! A reconcile waits for [`Cache::ready`], never for kube's
//! `Store::wait_until_ready`: that one is a one-shot channel with a single
//! waker slot, so of several reconciles waiting on one store at once only
//! the last to ask is woken, and the others wait for ever. A new leader
//! starts many reconciles at once, all waiting for the caches, so this
//! happened: a SlaTarget reconcile, started a moment before the
//! MailDomain store filled, never finished. Readiness here is a
//! `tokio::sync::watch`, which wakes every waiter.

use std::ops::Deref;

use futures::StreamExt;
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

/// A store of one kind's objects, filled by a task of its own until the
/// process ends. It reads like the [`Store`] it derefs to.
pub struct Cache<K: Lookup<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
    ready: watch::Receiver<bool>,
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
        listed(&self.ready).await
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
    let (store, mut writer) = reflector::store();
    let (ready_tx, ready) = watch::channel(false);
    // What kube's `reflector` does: the store takes each event before it is
    // passed on.
    let feed = watcher::watcher(api, config)
        .default_backoff()
        .map(move |event| {
            let event = event.map(|event| event.modify(trim))?;
            writer.apply_watcher_event(&event);
            Ok::<_, watcher::Error>(event)
        });
    // After a (re)list the store holds exactly what was listed: the objects
    // are read from it, not kept a second time while the list arrives.
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
    Cache { store, ready }
}

/// Waits until `ready` says a cache holds its first full list.
pub async fn listed(ready: &watch::Receiver<bool>) -> Result<(), Stopped> {
    let mut ready = ready.clone();
    ready.wait_for(|ready| *ready).await.map_err(|_| Stopped)?;
    Ok(())
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

    /// What kube's own readiness got wrong: several waiters, each polled
    /// before the store filled, are all woken when it fills.
    #[tokio::test]
    async fn every_waiter_is_woken_when_the_cache_fills() {
        let (store, _writer) = reflector::store::<ConfigMap>();
        let (ready_tx, ready) = watch::channel(false);
        let cache = Cache { store, ready };
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

    #[tokio::test]
    async fn a_cache_whose_watch_stopped_says_so() {
        let (store, _writer) = reflector::store::<ConfigMap>();
        let (ready_tx, ready) = watch::channel(false);
        let cache = Cache { store, ready };
        drop(ready_tx);
        assert!(cache.ready().await.is_err());
    }
}
