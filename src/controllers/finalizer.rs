//! Finalizers written so that no other writer's change to the list is lost.
//!
//! A merge patch of `metadata.finalizers` replaces the whole list: a
//! finalizer another controller added between our read and our write would
//! vanish. These helpers send a JSON patch that first tests the list we read
//! (or, for an object with none, its `resourceVersion`), so the API server
//! refuses a stale write and the reconcile retries on a fresh read.

use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// The JSON patch that turns `current` (the list as read, at
/// `resource_version`) into `wanted`.
pub fn patch(current: &[String], resource_version: Option<&str>, wanted: &[String]) -> Value {
    let guard = if current.is_empty() {
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": resource_version})
    } else {
        json!({"op": "test", "path": "/metadata/finalizers", "value": current})
    };
    json!([guard, {"op": "add", "path": "/metadata/finalizers", "value": wanted}])
}

/// Makes `obj`'s finalizers `wanted`, unless they changed since `obj` was read.
async fn set<K>(api: &Api<K>, obj: &K, wanted: Vec<String>) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let ops = patch(
        obj.finalizers(),
        obj.meta().resource_version.as_deref(),
        &wanted,
    );
    let ops: json_patch::Patch = serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
    api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::<()>::Json(ops),
    )
    .await?;
    Ok(())
}

/// Adds `finalizer` to `obj` unless it is there already.
pub async fn add<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    if obj.finalizers().iter().any(|f| f == finalizer) {
        return Ok(());
    }
    let mut wanted = obj.finalizers().to_vec();
    wanted.push(finalizer.to_string());
    set(api, obj, wanted).await
}

/// Removes `finalizer` from `obj` if it is there.
pub async fn remove<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    if !obj.finalizers().iter().any(|f| f == finalizer) {
        return Ok(());
    }
    let wanted = obj
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .cloned()
        .collect();
    set(api, obj, wanted).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_replaced_only_if_it_is_still_the_one_read() {
        let current = vec!["other.io/keep".to_string()];
        let wanted = vec!["other.io/keep".to_string(), "pec.dev/x".to_string()];
        let ops = patch(&current, Some("41"), &wanted);
        assert_eq!(
            ops,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": ["other.io/keep"]},
                {"op": "add", "path": "/metadata/finalizers", "value": ["other.io/keep", "pec.dev/x"]}
            ])
        );
    }

    #[test]
    fn an_object_without_finalizers_is_guarded_by_its_resource_version() {
        let ops = patch(&[], Some("41"), &["pec.dev/x".to_string()]);
        assert_eq!(
            ops[0],
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": "41"})
        );
        assert_eq!(ops[1]["value"], json!(["pec.dev/x"]));
    }

    #[test]
    fn the_patch_refuses_a_list_changed_since_it_was_read() {
        let read = vec!["a".to_string()];
        let ops: json_patch::Patch =
            serde_json::from_value(patch(&read, Some("1"), &[])).expect("a JSON patch");
        let mut changed = json!({"metadata": {"resourceVersion": "2", "finalizers": ["a", "b"]}});
        assert!(
            json_patch::patch(&mut changed, &ops).is_err(),
            "stale list overwritten"
        );
        let mut same = json!({"metadata": {"resourceVersion": "1", "finalizers": ["a"]}});
        json_patch::patch(&mut same, &ops).expect("unchanged list patched");
        assert_eq!(same["metadata"]["finalizers"], json!([]));
    }
}
