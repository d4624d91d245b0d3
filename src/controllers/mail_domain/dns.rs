//! DNS for clients outside the cluster: one external-dns `DNSEndpoint` per
//! domain naming the load-balancer addresses of its serving sites.
//!
//! Written only when the `DNSEndpoint` CRD is installed (its presence is
//! looked up through discovery at most every [`RECHECK`], and its absence is
//! logged once), and only when it differs from what was last applied.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DynamicObject, Patch, PatchParams},
    core::{ApiResource, GroupVersionKind},
};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{
    Error,
    apply::{APPLIED_HASH_ANNOTATION, FIELD_MANAGER},
    build::{domain_labels, domain_service_name, short_hash},
};
use crate::api::{MailDomain, Site};

const GROUP: &str = "externaldns.k8s.io";
const VERSION: &str = "v1alpha1";
const KIND: &str = "DNSEndpoint";
/// How long a discovery answer about the CRD is trusted.
const RECHECK: Duration = Duration::from_secs(5);

/// Whether the `DNSEndpoint` CRD is installed, looked up lazily.
#[derive(Default)]
pub struct DnsSupport {
    checked: Mutex<Option<(Instant, bool)>>,
    said_absent: AtomicBool,
}

impl DnsSupport {
    /// Whether DNSEndpoints can be written now.
    pub async fn available(&self, client: &Client) -> bool {
        if let Some((at, available)) = *self.checked.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < RECHECK
        {
            return available;
        }
        let available = client
            .list_api_group_resources(&format!("{GROUP}/{VERSION}"))
            .await
            .is_ok_and(|list| list.resources.iter().any(|r| r.kind == KIND));
        *self.checked.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), available));
        if !available && !self.said_absent.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "the external-dns DNSEndpoint CRD is not installed; no DNS records are written"
            );
        }
        if available {
            self.said_absent.store(false, Ordering::Relaxed);
        }
        available
    }
}

/// The DNSEndpoint of `md`: an A record for the domain with the load-balancer
/// addresses of the serving sites.
pub fn endpoint(md: &MailDomain, serving: &[String], sites: &[&Site]) -> Value {
    let targets: Vec<&String> = sites
        .iter()
        .filter(|s| serving.contains(&s.name_any()))
        .flat_map(|s| s.spec.load_balancer_addresses.iter())
        .collect();
    let name = md.name_any();
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KIND,
        "metadata": {
            "name": domain_service_name(&name),
            "namespace": md.namespace(),
            "labels": domain_labels(&name),
            "ownerReferences": md.controller_owner_ref(&()).into_iter().collect::<Vec<_>>(),
        },
        "spec": {
            "endpoints": [{
                "dnsName": md.spec.domain,
                "recordType": "A",
                "recordTTL": md.spec.failover.dns_ttl_seconds,
                "targets": targets,
            }],
        },
    })
}

/// Applies the DNSEndpoint unless the one there carries the hash of
/// `endpoint` (DNSEndpoints are not watched: one read instead of a write).
pub async fn apply(client: &Client, namespace: &str, endpoint: &Value) -> Result<(), Error> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(GROUP, VERSION, KIND));
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource);
    let name = endpoint["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let failed = |source| Error::Apply {
        kind: KIND,
        name: name.clone(),
        source,
    };
    let (wanted, hash) = with_hash(endpoint);
    let current = api.get_opt(&name).await.map_err(failed)?;
    if current.is_some_and(|c| c.annotations().get(APPLIED_HASH_ANNOTATION) == Some(&hash)) {
        return Ok(());
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(wanted),
    )
    .await
    .map(|_| ())
    .map_err(failed)
}

/// `endpoint` with [`APPLIED_HASH_ANNOTATION`] set to its hash, and the hash.
fn with_hash(endpoint: &Value) -> (Value, String) {
    let hash = short_hash(endpoint.to_string().as_bytes(), 16);
    let mut wanted = endpoint.clone();
    wanted["metadata"]["annotations"] = json!({ APPLIED_HASH_ANNOTATION: hash });
    (wanted, hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::mail_domain::build::tests::{domain, site};

    #[test]
    fn names_only_the_serving_sites_addresses() {
        let md = domain(&["dc-it1", "dc-it2"]);
        let mut a = site("dc-it1");
        a.spec.load_balancer_addresses = vec!["192.0.2.1".into()];
        let mut b = site("dc-it2");
        b.spec.load_balancer_addresses = vec!["198.51.100.1".into()];
        let e = endpoint(&md, &["dc-it2".to_string()], &[&a, &b]);
        let record = &e["spec"]["endpoints"][0];
        assert_eq!(record["dnsName"], "pec.acme.it");
        assert_eq!(record["targets"], json!(["198.51.100.1"]));
        assert_eq!(record["recordTTL"], 30);
    }

    #[test]
    fn the_hash_follows_the_endpoint_and_is_carried_by_what_is_applied() {
        let md = domain(&["dc-it1", "dc-it2"]);
        let mut a = site("dc-it1");
        a.spec.load_balancer_addresses = vec!["192.0.2.1".into()];
        let one = endpoint(&md, &["dc-it1".to_string()], &[&a]);
        let none = endpoint(&md, &[], &[&a]);
        let (wanted, hash) = with_hash(&one);
        assert_eq!(
            wanted["metadata"]["annotations"][APPLIED_HASH_ANNOTATION],
            hash
        );
        assert_eq!(with_hash(&one).1, hash, "stable");
        assert_ne!(with_hash(&none).1, hash, "another target set, another hash");
    }
}
