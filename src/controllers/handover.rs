//! Handing fields over from a field manager the operator no longer uses to
//! the one it uses now.
//!
//! Server-side apply removes a field from an object only when no manager
//! owns it any more. When a controller starts applying under a new name,
//! the fields its old name applied stay owned by the old name, so a field
//! the controller later stops setting would never go away. The cure is the
//! one `kubectl` uses when it moves an object from client-side to
//! server-side apply: apply everything once under the new name (both names
//! then own the fields they agree on), then apply an empty object under the
//! old name, which gives up every field it held; what only the old name
//! held goes, the rest stays with the new name.
//!
//! A controller that renames its manager calls [`held_by`] on the objects
//! it reads or applies and [`release`] once the new name holds the same
//! fields.

use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
};
use serde::de::DeserializeOwned;
use serde_json::json;

/// The part of an object a field manager writes: the object itself, or one
/// of its subresources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The object (metadata, spec, data...).
    Object,
    /// The `status` subresource.
    Status,
}

impl Part {
    /// Whether a managed-fields entry's `subresource` names this part.
    fn is(self, subresource: Option<&str>) -> bool {
        match self {
            Part::Object => subresource.is_none_or(str::is_empty),
            Part::Status => subresource == Some("status"),
        }
    }
}

/// Whether `manager` still holds fields of `part` of the object described
/// by `meta` through server-side apply (entries of other operations, such
/// as the finalizer's JSON patches, are not applies and need no release).
pub fn held_by(meta: &ObjectMeta, manager: &str, part: Part) -> bool {
    meta.managed_fields.iter().flatten().any(|entry| {
        entry.manager.as_deref() == Some(manager)
            && entry.operation.as_deref() == Some("Apply")
            && part.is(entry.subresource.as_deref())
    })
}

/// Applies an empty `K` named `name` under `manager` to `part`: `manager`
/// gives up every field it held there. Returns the object as it is after.
pub async fn release<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    part: Part,
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let empty = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name},
    });
    let params = PatchParams::apply(manager);
    match part {
        Part::Object => api.patch(name, &params, &Patch::Apply(empty)).await,
        Part::Status => api.patch_status(name, &params, &Patch::Apply(empty)).await,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    use super::*;

    fn entry(manager: &str, operation: &str, subresource: Option<&str>) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            subresource: subresource.map(Into::into),
            ..ManagedFieldsEntry::default()
        }
    }

    fn meta(entries: Vec<ManagedFieldsEntry>) -> ObjectMeta {
        ObjectMeta {
            managed_fields: Some(entries),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn an_apply_by_the_manager_on_the_part_is_held() {
        let m = meta(vec![entry("old", "Apply", Some("status"))]);
        assert!(held_by(&m, "old", Part::Status));
        assert!(!held_by(&m, "old", Part::Object));
        assert!(!held_by(&m, "new", Part::Status));
    }

    #[test]
    fn the_object_part_has_no_subresource_or_an_empty_one() {
        for sub in [None, Some("")] {
            let m = meta(vec![entry("old", "Apply", sub)]);
            assert!(held_by(&m, "old", Part::Object), "{sub:?}");
            assert!(!held_by(&m, "old", Part::Status), "{sub:?}");
        }
    }

    #[test]
    fn updates_and_objects_without_managed_fields_hold_nothing() {
        let m = meta(vec![entry("old", "Update", None)]);
        assert!(!held_by(&m, "old", Part::Object));
        assert!(!held_by(&ObjectMeta::default(), "old", Part::Object));
    }
}
