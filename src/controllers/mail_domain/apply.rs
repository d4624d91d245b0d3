//! Writes a MailDomain's children with server-side apply when they differ
//! from what was last applied, and deletes the ones this pass no longer
//! wants, both judged from the domain's record in the controller's cache
//! (a [`Held`], taken once per reconcile).

use std::{collections::BTreeSet, fmt::Debug};

use futures::future;
use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
    },
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::reflector::ObjectRef,
};
use serde::{Serialize, de::DeserializeOwned};

use super::{
    Error,
    build::{Children, SiteChildren, short_hash},
    by_domain::{Held, find},
    cached::Child,
};
use crate::api::MailDomain;

/// The field manager of everything this controller applies.
pub const FIELD_MANAGER: &str = "pec-operator/maildomain";

/// The annotation on every child that holds a hash of what was last applied:
/// a child whose cached copy carries the hash of what is wanted now is not
/// applied again (the way the Prometheus Operator skips unchanged objects).
pub const APPLIED_HASH_ANNOTATION: &str = "pec.dev/applied-hash";

/// What [`apply_all`] did.
pub struct Applied {
    /// The Deployments as the server has them (applied) or as the cache
    /// holds them (unchanged).
    pub deployments: Vec<Deployment>,
    /// How many children were written.
    pub writes: usize,
}

/// Applies every child that differs from what was last applied; returns the
/// Deployments and the number of writes.
///
/// The sites go at once, and within a site in two rounds: the ConfigMap
/// and NetworkPolicy first, so new pods never start with a stale
/// configuration or unfenced, then the Deployment, Service and PDB. A
/// reconcile waits for about two round trips instead of one per child. The
/// first failure is returned; the writes already made stay (the next
/// reconcile finds them applied).
pub async fn apply_all(
    client: &Client,
    namespace: &str,
    domain: &ObjectRef<MailDomain>,
    children: &Children,
    held: &Held,
) -> Result<Applied, Error> {
    let Children {
        sites,
        domain_service,
        endpoint_slices,
    } = children;
    let sites = future::try_join_all(
        sites
            .iter()
            .map(|site| apply_site(client, namespace, domain, site, held)),
    );
    let domain_service = apply_changed(client, namespace, domain_service, &held.services);
    let slices = future::try_join_all(
        endpoint_slices
            .iter()
            .flatten()
            .map(|slice| apply_changed(client, namespace, slice, &held.endpoint_slices)),
    );
    let (sites, service_written, slices_written) =
        future::try_join3(sites, domain_service, slices).await?;
    let mut applied = Applied {
        deployments: Vec::with_capacity(sites.len()),
        writes: usize::from(service_written)
            + slices_written.into_iter().map(usize::from).sum::<usize>(),
    };
    for (deployment, writes) in sites {
        applied.deployments.push(deployment);
        applied.writes += writes;
    }
    Ok(applied)
}

/// Applies one site's children: the ConfigMap and NetworkPolicy, then the
/// rest.
/// Returns its Deployment (as applied, or as cached when unchanged) and the
/// number of writes.
async fn apply_site(
    client: &Client,
    namespace: &str,
    domain: &ObjectRef<MailDomain>,
    site: &SiteChildren,
    held: &Held,
) -> Result<(Deployment, usize), Error> {
    // Destructured without `..`: a new child must be applied here or the build fails.
    let SiteChildren {
        site: _,
        config_map,
        deployment,
        service,
        pdb,
        network_policy,
    } = site;
    let (config_written, policy_written) = future::try_join(
        apply_changed(client, namespace, config_map, &held.config_maps),
        apply_changed(client, namespace, network_policy, &held.network_policies),
    )
    .await?;
    let deployment = async {
        let cached = find(&held.deployments, &deployment.name_any());
        let (wanted, hash) = with_applied_hash(deployment);
        match cached.filter(|c| c.applied_hash() == Some(hash.as_str())) {
            Some(unchanged) => Ok((unchanged.to_deployment(domain), false)),
            None => Ok((apply(client, namespace, &wanted).await?, true)),
        }
    };
    let ((deployment, deployment_written), service_written, pdb_written) = future::try_join3(
        deployment,
        apply_changed(client, namespace, service, &held.services),
        apply_changed(client, namespace, pdb, &held.pdbs),
    )
    .await?;
    let writes = [
        config_written,
        policy_written,
        deployment_written,
        service_written,
        pdb_written,
    ]
    .into_iter()
    .map(usize::from)
    .sum();
    Ok((deployment, writes))
}

/// `obj` with [`APPLIED_HASH_ANNOTATION`] set to the hash of `obj`, and the hash.
fn with_applied_hash<K: Resource + Serialize + Clone>(obj: &K) -> (K, String) {
    let hash = short_hash(&serde_json::to_vec(obj).unwrap_or_default(), 16);
    let mut wanted = obj.clone();
    wanted
        .annotations_mut()
        .insert(APPLIED_HASH_ANNOTATION.into(), hash.clone());
    (wanted, hash)
}

/// Applies `obj` unless `held` (the domain's children of its kind) shows
/// it as last applied in this form; returns whether it wrote.
async fn apply_changed<K, S>(
    client: &Client,
    namespace: &str,
    obj: &K,
    held: &[S],
) -> Result<bool, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + k8s_openapi::Resource
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
    S: Child,
{
    let (wanted, hash) = with_applied_hash(obj);
    let unchanged =
        find(held, &obj.name_any()).is_some_and(|c| c.applied_hash() == Some(hash.as_str()));
    if unchanged {
        return Ok(false);
    }
    apply(client, namespace, &wanted).await?;
    Ok(true)
}

/// Deletes children of `domain` that this pass did not apply, except those of
/// `kept_sites` (listed sites whose Site is missing: their running gateways
/// stay until the site is removed from the spec). What exists is read from
/// `held`. Returns the sites whose children were removed.
pub async fn prune(
    client: &Client,
    namespace: &str,
    children: &Children,
    kept_sites: &[String],
    held: &Held,
) -> Result<BTreeSet<String>, Error> {
    let applied = applied_names(children);
    let slices: Option<BTreeSet<String>> = children
        .endpoint_slices
        .as_ref()
        .map(|v| v.iter().filter_map(|s| s.metadata.name.clone()).collect());
    let keep = |site: Option<&str>, name: &str| keeps(&applied, kept_sites, site, name);
    let pruner = Pruner {
        client,
        namespace,
        keep: &keep,
    };
    let mut removed = BTreeSet::new();
    removed.extend(pruner.prune::<Deployment, _>(&held.deployments).await?);
    removed.extend(pruner.prune::<Service, _>(&held.services).await?);
    removed.extend(pruner.prune::<PodDisruptionBudget, _>(&held.pdbs).await?);
    removed.extend(
        pruner
            .prune::<NetworkPolicy, _>(&held.network_policies)
            .await?,
    );
    removed.extend(pruner.prune::<ConfigMap, _>(&held.config_maps).await?);
    // A slice is kept only while its site serves; with no site able to
    // serve, the last slices stay.
    if let Some(slices) = slices {
        let keep_slice = |_: Option<&str>, name: &str| slices.contains(name);
        // Only our slices: the per-site Services' own slices (made by the
        // EndpointSlice controller) carry our labels too.
        let service = children
            .domain_service
            .metadata
            .name
            .clone()
            .unwrap_or_default();
        let ours: Vec<_> = held
            .endpoint_slices
            .iter()
            .filter(|slice| slice.service() == Some(&service))
            .map(site_and_name)
            .collect();
        prune_kind::<EndpointSlice>(client, namespace, ours, &keep_slice).await?;
    }
    Ok(removed)
}

/// The names of the per-site objects and the domain Service this pass
/// applies (a site's ConfigMap, Service, PDB and NetworkPolicy share its
/// Deployment's name).
fn applied_names(children: &Children) -> BTreeSet<String> {
    let mut applied: BTreeSet<String> = children
        .sites
        .iter()
        .filter_map(|s| s.deployment.metadata.name.clone())
        .collect();
    applied.extend(children.domain_service.metadata.name.clone());
    applied
}

/// The prune rule for every child but EndpointSlices: an object stays when
/// this pass applied its name, or when it belongs to a listed site whose
/// Site is missing (`kept_sites`: its gateways run on until the site leaves
/// the spec).
fn keeps(
    applied: &BTreeSet<String>,
    kept_sites: &[String],
    site: Option<&str>,
    name: &str,
) -> bool {
    applied.contains(name) || site.is_some_and(|s| kept_sites.iter().any(|k| k == s))
}

/// Deletes one domain's children that `keep` does not keep, kind by kind.
struct Pruner<'a> {
    client: &'a Client,
    namespace: &'a str,
    keep: &'a (dyn Fn(Option<&str>, &str) -> bool + Sync),
}

impl Pruner<'_> {
    /// Prunes the `K` objects `held` shows for the domain; returns the
    /// sites of those deleted.
    async fn prune<K, S>(&self, held: &[S]) -> Result<Vec<String>, Error>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + k8s_openapi::Resource
            + Clone
            + Debug
            + DeserializeOwned,
        S: Child,
    {
        let existing = held.iter().map(site_and_name).collect();
        prune_kind::<K>(self.client, self.namespace, existing, self.keep).await
    }
}

/// A cached child's site and name, as the prune reads them.
fn site_and_name<S: Child>(obj: &S) -> (Option<String>, String) {
    (obj.site().map(str::to_string), obj.name().to_string())
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

/// Deletes the objects of kind `K` among `existing` (site, name) that
/// `keep` does not keep; returns the sites of those deleted.
async fn prune_kind<K>(
    client: &Client,
    namespace: &str,
    existing: Vec<(Option<String>, String)>,
    keep: &(dyn Fn(Option<&str>, &str) -> bool + Sync),
) -> Result<Vec<String>, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + k8s_openapi::Resource
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let mut removed_sites = Vec::new();
    for (site, name) in existing {
        if keep(site.as_deref(), &name) {
            continue;
        }
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            // Already gone (the cache had not seen it go): what we wanted.
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
        removed_sites.extend(site);
    }
    Ok(removed_sites)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::mail_domain::{
        build::{self, tests::domain},
        observe::ResolvedSite,
    };

    fn children(sites: &[&str]) -> Children {
        let resolved: Vec<ResolvedSite> = sites
            .iter()
            .map(|s| ResolvedSite {
                name: s.to_string(),
                node_selector: [("topology.kubernetes.io/zone".to_string(), s.to_string())].into(),
                nodes: 3,
            })
            .collect();
        build::children(
            &domain(sites),
            None,
            &Default::default(),
            &resolved,
            Some(&[]),
            &[],
        )
        .expect("children")
    }

    #[test]
    fn what_this_pass_applied_stays_and_a_dropped_site_goes() {
        let now = children(&["dc-it1"]);
        let before = children(&["dc-it1", "dc-it2"]);
        let applied = applied_names(&now);
        for site in &before.sites {
            let name = site.deployment.metadata.name.clone().expect("name");
            let kept = keeps(&applied, &[], Some(&site.site), &name);
            assert_eq!(kept, site.site == "dc-it1", "{name}");
        }
        let service = now.domain_service.metadata.name.clone().expect("name");
        assert!(keeps(&applied, &[], None, &service));
    }

    #[test]
    fn a_listed_site_whose_site_is_missing_keeps_its_gateways() {
        let now = children(&["dc-it1"]);
        let before = children(&["dc-it1", "dc-it2"]);
        let applied = applied_names(&now);
        let missing = ["dc-it2".to_string()];
        for site in &before.sites {
            let name = site.deployment.metadata.name.clone().expect("name");
            assert!(keeps(&applied, &missing, Some(&site.site), &name));
        }
        assert!(
            !keeps(&applied, &missing, Some("dc-it3"), "pec-x-dc-it3"),
            "only the missing site's objects"
        );
    }

    #[test]
    fn the_applied_hash_follows_the_object_and_only_the_object() {
        let a = children(&["dc-it1"]);
        let b = children(&["dc-it1"]);
        let (wanted, hash) = with_applied_hash(&a.sites[0].config_map);
        let (_, again) = with_applied_hash(&b.sites[0].config_map);
        assert_eq!(hash, again, "the same object, the same hash");
        assert_eq!(
            wanted.annotations().get(APPLIED_HASH_ANNOTATION),
            Some(&hash),
            "carried by what is applied"
        );
        let mut changed = a.sites[0].config_map.clone();
        changed
            .data
            .get_or_insert_default()
            .insert("extra".into(), "1".into());
        assert_ne!(with_applied_hash(&changed).1, hash);
        // What the cache shows after the apply carries the hash it was given.
        let (rewanted, rehash) = with_applied_hash(&a.sites[0].config_map);
        assert_eq!(rewanted, wanted);
        assert_eq!(rehash, hash);
    }
}
