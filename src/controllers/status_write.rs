//! The status write every controller makes the same way: server-side apply
//! of the whole status under the controller's field manager, with the API
//! version and kind taken from the type, and nothing sent when the status
//! did not change; and [`Written`], what a controller wrote that its watch
//! cache may not hold yet.

use std::{collections::HashMap, fmt::Debug, sync::Mutex};

use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

/// The server-side apply body that sets `status` on a `K`.
pub fn body<K, S>(status: &S) -> serde_json::Value
where
    K: Resource<DynamicType = ()>,
    S: Serialize,
{
    json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    })
}

/// Writes `new` as the status of `name` through `api` under
/// `field_manager`, unless it equals `old`; returns the object as written,
/// or `None` when nothing was sent.
pub async fn write<K, S>(
    api: &Api<K>,
    field_manager: &str,
    name: &str,
    old: &S,
    new: &S,
) -> Result<Option<K>, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if old == new {
        return Ok(None);
    }
    apply(api, field_manager, name, new).await.map(Some)
}

/// The statuses a controller wrote that its watch cache may not hold yet.
///
/// A reconcile reads its object from the watch cache, which learns of the
/// controller's own status write only when the watch delivers it. A
/// reconcile of the same object that starts before then would take the
/// status it replaced for the current one: it would write the same status
/// again and send the same Events a second time. [`Written::newer`] gives
/// it the status as written instead, for as long as the cache is older.
///
/// Each entry lives until a reconcile of that object finds the cache
/// holding that write or a later change: at the longest, until the
/// object's next resync.
pub struct Written<S> {
    /// The last write to each (namespace, name): its resource version and
    /// the status it wrote.
    last: Mutex<HashMap<(String, String), (u64, S)>>,
}

impl<S> Default for Written<S> {
    fn default() -> Self {
        Written {
            last: Mutex::new(HashMap::new()),
        }
    }
}

impl<S: Clone> Written<S> {
    /// Remembers `status`, written to `namespace/name`, which the write
    /// left at resource version `version`.
    pub fn remember(&self, namespace: &str, name: &str, version: Option<&str>, status: S) {
        if let Some(version) = revision(version) {
            self.lock()
                .insert((namespace.into(), name.into()), (version, status));
        }
    }

    /// The status last written to `namespace/name`, if the cached copy, at
    /// resource version `cached`, is older than that write. Forgets the
    /// write once the cache holds it or anything later.
    pub fn newer(&self, namespace: &str, name: &str, cached: Option<&str>) -> Option<S> {
        let key = (namespace.to_string(), name.to_string());
        let mut last = self.lock();
        let (written, status) = last.get(&key)?;
        match revision(cached) {
            Some(cached) if cached < *written => Some(status.clone()),
            _ => {
                last.remove(&key);
                None
            }
        }
    }

    /// Entries held: for tests and the memory benchmark.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), (u64, S)>> {
        // A panic while the lock was held left a consistent map behind.
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A resource version as a number. The API server's are etcd revisions,
/// which only grow; one that does not parse is never taken as newer.
fn revision(version: Option<&str>) -> Option<u64> {
    version?.parse().ok()
}

/// Writes `status` as the status of `name` through `api` under
/// `field_manager`, whatever the object holds now.
pub async fn apply<K, S>(
    api: &Api<K>,
    field_manager: &str,
    name: &str,
    status: &S,
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    api.patch_status(
        name,
        &PatchParams::apply(field_manager).force(),
        &Patch::Apply(body::<K, S>(status)),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_the_status_until_the_cache_holds_it() {
        let written = Written::<&str>::default();
        assert_eq!(
            written.newer("ns", "a", Some("10")),
            None,
            "nothing written"
        );
        written.remember("ns", "a", Some("12"), "ready");
        assert_eq!(
            written.newer("ns", "a", Some("10")),
            Some("ready"),
            "cache older"
        );
        assert_eq!(written.newer("ns", "b", Some("10")), None, "another object");
        assert_eq!(written.newer("ns", "a", Some("11")), Some("ready"));
        assert_eq!(written.newer("ns", "a", Some("12")), None, "cache holds it");
        assert!(written.is_empty(), "and the write is forgotten");
        written.remember("ns", "a", Some("20"), "starting");
        assert_eq!(written.newer("ns", "a", Some("25")), None, "a later change");
        assert!(written.is_empty());
    }

    #[test]
    fn a_version_that_is_not_a_number_never_wins() {
        let written = Written::<&str>::default();
        written.remember("ns", "a", Some("x1"), "ready");
        assert!(written.is_empty(), "not remembered");
        written.remember("ns", "a", Some("12"), "ready");
        assert_eq!(written.newer("ns", "a", None), None);
        assert!(written.is_empty(), "the cache is taken as it is");
    }
    use crate::api::{MailDomain, Site, SiteStatus};

    #[test]
    fn the_body_names_the_type_it_is_for() {
        let status = SiteStatus::default();
        let site = body::<Site, _>(&status);
        assert_eq!(site["apiVersion"], "pec.dev/v1alpha1");
        assert_eq!(site["kind"], "Site");
        let md = body::<MailDomain, _>(&crate::api::MailDomainStatus::default());
        assert_eq!(md["kind"], "MailDomain");
        assert!(md["status"].is_object());
    }
}
