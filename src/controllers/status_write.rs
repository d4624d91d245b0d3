//! The status write every controller makes the same way: server-side apply
//! of the whole status under the controller's field manager, with the API
//! version and kind taken from the type, and nothing sent when the status
//! did not change.

use std::fmt::Debug;

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
/// `field_manager`, unless it equals `old`; returns whether it wrote.
pub async fn write<K, S>(
    api: &Api<K>,
    field_manager: &str,
    name: &str,
    old: &S,
    new: &S,
) -> Result<bool, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if old == new {
        return Ok(false);
    }
    apply(api, field_manager, name, new).await?;
    Ok(true)
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
