//! `pec-platform-routes` (ConfigMap, one per namespace): where mail for each
//! domain of the namespace goes, `domain: <its Service>.<namespace>.svc:25`.
//! Every gateway of the namespace mounts it and re-reads it, so a domain of
//! the platform hands mail to another directly through its Service, without
//! MX lookups or a route in its spec, and a new domain is reachable without
//! rolling the pods. Together with `pec-platform-providers` (the published
//! certificates of the namespace's SigningKeys, which every gateway there
//! trusts) a namespace is one platform.
//!
//! Rewritten by every reconcile of a MailDomain of the namespace, from a
//! list of them; a deleted domain leaves it at the next reconcile of another
//! (at most the resync period; meanwhile mail for it waits and retries).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

use super::build::domain_service_name;
use crate::api::MailDomain;

/// The ConfigMap's name.
pub const PLATFORM_ROUTES: &str = "pec-platform-routes";
/// Its key: the routes file the gateways read.
pub const ROUTES_KEY: &str = "routes.yaml";

/// The routes of `domains` (of one namespace `ns`): each PEC domain to the
/// incoming point of its domain Service. Domains being deleted are left
/// out; a domain two MailDomains claim goes to the older one.
pub fn platform_routes(domains: &[MailDomain], ns: &str) -> BTreeMap<String, String> {
    let mut sorted: Vec<&MailDomain> = domains
        .iter()
        .filter(|md| md.metadata.deletion_timestamp.is_none())
        .collect();
    sorted.sort_by_key(|md| (md.creation_timestamp(), md.name_any()));
    let mut routes = BTreeMap::new();
    for md in sorted {
        routes
            .entry(md.spec.domain.to_ascii_lowercase())
            .or_insert_with(|| format!("{}.{ns}.svc:25", domain_service_name(&md.name_any())));
    }
    routes
}

/// Rewrites [`PLATFORM_ROUTES`] in `ns` from the MailDomains there.
pub async fn apply(client: &Client, ns: &str, field_manager: &str) -> Result<(), kube::Error> {
    let domains = Api::<MailDomain>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items;
    // A map of strings always renders; the error is only in the signature.
    let yaml = serde_yaml::to_string(&platform_routes(&domains, ns))
        .map_err(|e| kube::Error::Service(e.into()))?;
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
                },
                "data": {ROUTES_KEY: yaml},
            })),
        )
        .await?;
    Ok(())
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
        let routes = platform_routes(
            &[
                domain("second-claim", "a.pec.it", 30),
                domain("a", "A.pec.it", 10),
                domain("b", "b.pec.it", 20),
                leaving,
            ],
            "pec-mail",
        );
        assert_eq!(
            routes,
            BTreeMap::from([
                ("a.pec.it".to_string(), "a.pec-mail.svc:25".to_string()),
                ("b.pec.it".to_string(), "b.pec-mail.svc:25".to_string()),
            ])
        );
    }
}
