//! What a MailDomain's spec names besides its Sites and SigningKey: the TLS
//! and mailboxes Secrets from the watch cache (cut to what the checks read),
//! and the store claim and providers' ConfigMaps by name from the API server
//! (few domains name them, and a watch of every claim and ConfigMap would
//! cost more memory than these reads).

use std::fmt::Debug;

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim};
use kube::{Api, Client};
use serde::de::DeserializeOwned;

use super::{
    Error,
    cache::Caches,
    references::{Named, Referenced},
};
use crate::api::MailDomain;

/// The Secrets, claim and ConfigMaps `md`'s spec names: the Secrets as
/// `caches` hold them, the others as they are now.
pub async fn references(
    client: &Client,
    namespace: &str,
    md: &MailDomain,
    caches: &Caches,
) -> Result<Referenced, Error> {
    let gateway = &md.spec.gateway;
    let cached = |name: Option<&str>| {
        name.map(|name| Named {
            name: name.to_string(),
            found: caches.secret(namespace, name),
        })
    };
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace);
    // At once: a reconcile waits one round trip for all of them.
    let (claim, providers) = futures::future::try_join(
        fetch(
            &claims,
            "PersistentVolumeClaim",
            gateway.storage_claim_name.as_deref(),
        ),
        futures::future::try_join_all(
            gateway
                .providers
                .iter()
                .map(|name| fetch(&config_maps, "ConfigMap", Some(name))),
        ),
    )
    .await?;
    Ok(Referenced {
        tls: cached(gateway.tls_secret_ref.as_deref()),
        mailboxes: cached(gateway.mailboxes_secret_ref.as_deref()),
        claim,
        providers: providers.into_iter().flatten().collect(),
    })
}

/// `name` through `api`, when a name is given.
async fn fetch<K>(
    api: &Api<K>,
    kind: &'static str,
    name: Option<&str>,
) -> Result<Option<Named<K>>, Error>
where
    K: Clone + DeserializeOwned + Debug,
{
    let Some(name) = name else {
        return Ok(None);
    };
    let found = api
        .get_opt(name)
        .await
        .map_err(|source| Error::FetchReference {
            kind,
            name: name.to_string(),
            source,
        })?;
    Ok(Some(Named {
        name: name.to_string(),
        found,
    }))
}
