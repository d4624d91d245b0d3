//! `pec-platform-routes` (ConfigMap, one per namespace): where mail for each
//! domain of the namespace goes, `domain: <its Service>.<namespace>.svc:25`.
//! Every gateway of the namespace mounts it and re-reads it, so a domain of
//! the platform hands mail to another directly through its Service, without
//! MX lookups or a route in its spec, and a new domain is reachable without
//! rolling the pods. Together with `pec-platform-providers` (the published
//! certificates of the namespace's SigningKeys, which every gateway there
//! trusts) a namespace is one platform.
//!
//! Computed by every reconcile of a MailDomain of the namespace from the
//! controller's cache of MailDomains (no request), and written only when
//! the cached ConfigMap does not carry the hash of these routes, or when
//! somebody else wrote it since this replica did (so a ConfigMap edited or
//! deleted by hand comes back at the next reconcile of a domain there). A
//! deleted domain leaves it at the next reconcile of another (at most the
//! resync period; meanwhile mail for it waits and retries).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    core::PartialObjectMeta,
};
use serde_json::json;

use super::{
    apply::APPLIED_HASH_ANNOTATION,
    build::{domain_service_name, short_hash},
};
use crate::api::MailDomain;

/// The ConfigMap's name.
pub const PLATFORM_ROUTES: &str = "pec-platform-routes";
/// Its key: the routes file the gateways read.
pub const ROUTES_KEY: &str = "routes.yaml";

/// The routes of `domains` (of one namespace `ns`): each PEC domain to the
/// incoming point of its domain Service. A domain name two MailDomains
/// claim goes to the one that holds it (the first created, see
/// [`domain_holder`]). Domains being deleted are left out.
///
/// [`domain_holder`]: super::references::domain_holder
pub fn platform_routes<'a>(
    domains: impl IntoIterator<Item = &'a MailDomain>,
    ns: &str,
) -> BTreeMap<String, String> {
    let mut sorted: Vec<&MailDomain> = domains
        .into_iter()
        .filter(|md| md.metadata.deletion_timestamp.is_none())
        .collect();
    sorted.sort_by_key(|md| (md.creation_timestamp(), md.name_any()));
    let mut routes = BTreeMap::new();
    for md in sorted {
        routes
            .entry(md.spec.domain.trim_end_matches('.').to_ascii_lowercase())
            .or_insert_with(|| format!("{}.{ns}.svc:25", domain_service_name(&md.name_any())));
    }
    routes
}

/// The resource version of each namespace's ConfigMap as this replica last
/// wrote it.
#[derive(Default)]
pub struct PlatformRoutes {
    written: Mutex<HashMap<String, String>>,
}

impl PlatformRoutes {
    /// Brings [`PLATFORM_ROUTES`] in `ns` up to date with the MailDomains
    /// there, from `domains` (the controller's full cache; never a partial
    /// list, which would drop routes); `cached` is the ConfigMap as the watch
    /// cache has it. Writes
    /// only when the routes changed or another writer touched it; returns
    /// whether it wrote.
    pub async fn sync(
        &self,
        client: &Client,
        ns: &str,
        field_manager: &str,
        cached: Option<&PartialObjectMeta<ConfigMap>>,
        domains: &[std::sync::Arc<MailDomain>],
    ) -> Result<bool, kube::Error> {
        let routes = platform_routes(
            domains
                .iter()
                .map(AsRef::as_ref)
                .filter(|md| md.metadata.namespace.as_deref() == Some(ns)),
            ns,
        );
        // A map of strings always renders; the error is only in the signature.
        let yaml = serde_yaml::to_string(&routes).map_err(|e| kube::Error::Service(e.into()))?;
        let hash = short_hash(yaml.as_bytes(), 16);
        let current = cached.is_some_and(|cm| {
            let ours = self
                .written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(ns)
                .cloned();
            cm.annotations().get(APPLIED_HASH_ANNOTATION) == Some(&hash)
                && ours.is_none_or(|version| {
                    cm.resource_version().as_deref() == Some(version.as_str())
                })
        });
        if current {
            return Ok(false);
        }
        let written = apply(client, ns, field_manager, &yaml, &hash).await?;
        if let Some(version) = written.resource_version() {
            self.written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ns.to_string(), version);
        }
        Ok(true)
    }
}

/// Writes the routes file `yaml` (whose hash is `hash`) as
/// [`PLATFORM_ROUTES`] in `ns`; returns the ConfigMap as written.
async fn apply(
    client: &Client,
    ns: &str,
    field_manager: &str,
    yaml: &str,
    hash: &str,
) -> Result<ConfigMap, kube::Error> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .patch(
            PLATFORM_ROUTES,
            &PatchParams::apply(field_manager).force(),
            &Patch::Apply(json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": PLATFORM_ROUTES,
                    "namespace": ns,
                    "labels": {"app.kubernetes.io/managed-by": super::super::MANAGED_BY},
                    "annotations": {APPLIED_HASH_ANNOTATION: hash},
                },
                "data": {ROUTES_KEY: yaml},
            })),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(name: &str, pec: &str, created: i64) -> MailDomain {
        let mut md = crate::controllers::mail_domain::build::tests::domain(&["dc-it1"]);
        md.metadata.name = Some(name.into());
        md.spec.domain = pec.into();
        md.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::from_second(created).expect("time"),
            ));
        md
    }

    #[test]
    fn every_domain_of_the_namespace_routes_to_its_service_and_the_first_claim_wins() {
        let mut leaving = domain("old", "old.pec.it", 1);
        leaving.metadata.deletion_timestamp = leaving.metadata.creation_timestamp.clone();
        let all = [
            domain("second-claim", "a.pec.it.", 30),
            domain("a", "A.pec.it", 10),
            domain("b", "b.pec.it", 20),
            leaving,
        ];
        assert_eq!(
            platform_routes(&all, "mail"),
            BTreeMap::from([
                ("a.pec.it".to_string(), "a.mail.svc:25".to_string()),
                ("b.pec.it".to_string(), "b.mail.svc:25".to_string()),
            ])
        );
    }
}
