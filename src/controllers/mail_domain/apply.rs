//! Writes a MailDomain's children with server-side apply and deletes the ones
//! this pass no longer wants, and fetches the objects a MailDomain names
//! (its children, pods, Secrets, claim and ConfigMaps). The only client code
//! of this controller besides the Site and SigningKey fetches in `mod.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
    },
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};

use super::{
    Error,
    build::{Children, DOMAIN_LABEL, SITE_LABEL, SiteChildren},
    references::{Named, Referenced},
};
use crate::{api::MailDomain, controllers::MANAGED_BY};

/// The field manager of everything this controller applies.
pub const FIELD_MANAGER: &str = "pec-operator/maildomain";

/// Applies every child; returns the applied Deployments as the server has them.
pub async fn apply_all(
    client: &Client,
    namespace: &str,
    children: &Children,
) -> Result<Vec<Deployment>, Error> {
    let mut deployments = Vec::with_capacity(children.sites.len());
    for site in &children.sites {
        // Destructured without `..`: a new child must be applied here or the build fails.
        let SiteChildren {
            site: _,
            config_map,
            deployment,
            service,
            pdb,
            network_policy,
        } = site;
        // The ConfigMap first, so new pods never start with a stale configuration.
        apply(client, namespace, config_map).await?;
        apply(client, namespace, service).await?;
        apply(client, namespace, pdb).await?;
        apply(client, namespace, network_policy).await?;
        deployments.push(apply(client, namespace, deployment).await?);
    }
    let Children {
        sites: _,
        domain_service,
        endpoint_slices,
    } = children;
    apply(client, namespace, domain_service).await?;
    for slice in endpoint_slices.iter().flatten() {
        apply(client, namespace, slice).await?;
    }
    Ok(deployments)
}

/// Deletes children of `domain` that this pass did not apply, except those of
/// `kept_sites` (listed sites whose Site is missing: their running gateways
/// stay until the site is removed from the spec). Returns the sites whose
/// children were removed.
pub async fn prune(
    client: &Client,
    namespace: &str,
    domain: &str,
    children: &Children,
    kept_sites: &[String],
) -> Result<BTreeSet<String>, Error> {
    let mut applied: BTreeSet<String> = children
        .sites
        .iter()
        .filter_map(|s| s.deployment.metadata.name.clone())
        .collect();
    applied.extend(children.domain_service.metadata.name.clone());
    let slices: Option<BTreeSet<String>> = children
        .endpoint_slices
        .as_ref()
        .map(|v| v.iter().filter_map(|s| s.metadata.name.clone()).collect());
    let selector = format!("app.kubernetes.io/managed-by={MANAGED_BY},{DOMAIN_LABEL}={domain}");
    let keep = |labels: &BTreeMap<String, String>, name: &str| {
        applied.contains(name)
            || labels
                .get(SITE_LABEL)
                .is_some_and(|s| kept_sites.contains(s))
    };
    let mut removed = BTreeSet::new();
    removed.extend(prune_kind::<Deployment>(client, namespace, &selector, &keep).await?);
    removed.extend(prune_kind::<Service>(client, namespace, &selector, &keep).await?);
    removed.extend(prune_kind::<PodDisruptionBudget>(client, namespace, &selector, &keep).await?);
    removed.extend(prune_kind::<NetworkPolicy>(client, namespace, &selector, &keep).await?);
    removed.extend(prune_kind::<ConfigMap>(client, namespace, &selector, &keep).await?);
    // A slice is kept only while its site serves; with no site able to
    // serve, the last slices stay.
    if let Some(slices) = slices {
        let keep_slice = |_: &BTreeMap<String, String>, name: &str| slices.contains(name);
        // Only our slices: the per-site Services' own slices (made by the
        // EndpointSlice controller) carry our labels too.
        let ours = format!(
            "{selector},kubernetes.io/service-name={}",
            children
                .domain_service
                .metadata
                .name
                .clone()
                .unwrap_or_default()
        );
        prune_kind::<EndpointSlice>(client, namespace, &ours, &keep_slice).await?;
    }
    Ok(removed)
}

/// Lists the gateway pods of `domain`, whatever their site.
pub async fn pods(client: &Client, namespace: &str, domain: &str) -> Result<Vec<Pod>, Error> {
    let selector = format!("app.kubernetes.io/managed-by={MANAGED_BY},{DOMAIN_LABEL}={domain}");
    Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .map(|l| l.items)
        .map_err(|source| Error::List {
            kind: "Pod",
            source,
        })
}

/// Lists the Deployments of `domain`, whatever their site.
pub async fn deployments(
    client: &Client,
    namespace: &str,
    domain: &str,
) -> Result<Vec<Deployment>, Error> {
    let selector = format!("app.kubernetes.io/managed-by={MANAGED_BY},{DOMAIN_LABEL}={domain}");
    Api::<Deployment>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .map(|l| l.items)
        .map_err(|source| Error::List {
            kind: "Deployment",
            source,
        })
}

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
    let mut refs = Referenced {
        tls: fetch(&secrets, "Secret", gateway.tls_secret_ref.as_deref()).await?,
        mailboxes: fetch(&secrets, "Secret", gateway.mailboxes_secret_ref.as_deref()).await?,
        claim: fetch(
            &claims,
            "PersistentVolumeClaim",
            gateway.storage_claim_name.as_deref(),
        )
        .await?,
        providers: Vec::with_capacity(gateway.providers.len()),
    };
    for name in &gateway.providers {
        refs.providers
            .extend(fetch(&config_maps, "ConfigMap", Some(name)).await?);
    }
    Ok(refs)
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

async fn apply<K>(client: &Client, namespace: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + k8s_openapi::Resource
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let name = obj.name_any();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .map_err(|source| Error::Apply {
            kind: <K as k8s_openapi::Resource>::KIND,
            name,
            source,
        })
}

async fn prune_kind<K>(
    client: &Client,
    namespace: &str,
    selector: &str,
    keep: &(dyn Fn(&BTreeMap<String, String>, &str) -> bool + Sync),
) -> Result<Vec<String>, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + k8s_openapi::Resource
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let list = api
        .list_metadata(&ListParams::default().labels(selector))
        .await
        .map_err(|source| Error::List {
            kind: <K as k8s_openapi::Resource>::KIND,
            source,
        })?;
    let mut removed_sites = Vec::new();
    for item in list.items {
        let name = item.name_any();
        if keep(item.labels(), &name) {
            continue;
        }
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            // Already gone: what we wanted.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(Error::Delete {
                    kind: <K as k8s_openapi::Resource>::KIND,
                    name,
                    source,
                });
            }
        }
        tracing::info!(kind = <K as k8s_openapi::Resource>::KIND, %name, "deleted a child no longer wanted");
        if let Some(site) = item.labels().get(SITE_LABEL) {
            removed_sites.push(site.clone());
        }
    }
    Ok(removed_sites)
}
