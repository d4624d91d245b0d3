//! The reads a MailDomain reconcile still sends to the API server: the
//! Secrets, claim and ConfigMaps its spec names, by name (caching every
//! Secret of the cluster would cost more than these GETs).

use std::fmt::Debug;

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret};
use kube::{Api, Client};
use serde::de::DeserializeOwned;

use super::{
    Error,
    references::{Named, Referenced},
};
use crate::api::MailDomain;

/// The Secrets, claim and ConfigMaps `md`'s spec names, as they are now.
pub async fn references(
    client: &Client,
    namespace: &str,
    md: &MailDomain,
) -> Result<Referenced, Error> {
    let gateway = &md.spec.gateway;
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace);
    // At once: a reconcile waits one round trip for all of them.
    let (tls, mailboxes, claim, providers) = futures::future::try_join4(
        fetch(&secrets, "Secret", gateway.tls_secret_ref.as_deref()),
        fetch(&secrets, "Secret", gateway.mailboxes_secret_ref.as_deref()),
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
        tls,
        mailboxes,
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
