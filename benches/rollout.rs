//! Rollout benchmark: how long N MailDomains over two sites take from apply to
//! all Ready with the operator, beside a plain client that server-side-applies
//! the same child objects itself and waits for the same Deployments.
//!
//! Needs a local cluster with the operator running: `./e2e/bench.sh` sets it
//! up, runs this program and tears it down. Prints figures; asserts nothing.
//!
//! Environment: `KUBECONFIG`, `PEC_BENCH_DOMAINS` (default 200).

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Namespace, Service},
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, Resource,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use pec_operator::{
    api::{MailDomain, MailDomainSpec, Site},
    controllers::mail_domain::{
        build::{self, SiteChildren},
        validate::ResolvedSite,
    },
};
use serde::{Serialize, de::DeserializeOwned};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SITES: [&str; 2] = ["dc-it1", "dc-it2"];
const CONCURRENCY: usize = 16;

fn domain(ns: &str, i: usize) -> MailDomain {
    let mut md: MailDomain =
        serde_yaml::from_str(include_str!("../examples/20-maildomain-standard.yaml"))
            .expect("the example parses");
    md.metadata = ObjectMeta {
        name: Some(format!("bench-{i:04}")),
        namespace: Some(ns.to_string()),
        ..ObjectMeta::default()
    };
    md.spec = MailDomainSpec {
        domain: format!("pec{i}.bench.example.it"),
        ..md.spec
    };
    md
}

async fn create_namespace(client: &Client, name: &str) -> Result<(), BoxError> {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

/// Polls until `done` says so; returns the elapsed time since `start`.
async fn until<F, Fut>(start: Instant, mut done: F) -> Result<Duration, BoxError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, BoxError>>,
{
    let deadline = start + Duration::from_secs(900);
    loop {
        if done().await? {
            return Ok(start.elapsed());
        }
        if Instant::now() > deadline {
            return Err("gave up after 15 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn all_deployments_ready(
    client: &Client,
    ns: &str,
    expected: usize,
) -> Result<bool, BoxError> {
    let list = Api::<Deployment>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let ready = list
        .items
        .iter()
        .filter(|d| {
            let s = d.status.clone().unwrap_or_default();
            s.ready_replicas.unwrap_or(0) >= d.spec.replicas.unwrap_or(1)
                && s.updated_replicas == s.ready_replicas
        })
        .count();
    Ok(ready == expected)
}

async fn run_operator(
    client: &Client,
    ns: &str,
    n: usize,
) -> Result<(Duration, Duration), BoxError> {
    create_namespace(client, ns).await?;
    for doc in include_str!("../examples/10-sites.yaml").split("\n---\n") {
        let site: Site = serde_yaml::from_str(doc)?;
        let name = site.metadata.name.clone().unwrap_or_default();
        Api::<Site>::all(client.clone())
            .patch(
                &name,
                &PatchParams::apply("bench").force(),
                &Patch::Apply(&site),
            )
            .await?;
    }
    let api = Api::<MailDomain>::namespaced(client.clone(), ns);
    let start = Instant::now();
    stream::iter((0..n).map(|i| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &domain(ns, i))
                .await
                .map(|_| ())
        }
    }))
    .buffer_unordered(CONCURRENCY)
    .try_collect::<Vec<_>>()
    .await?;
    let applied = start.elapsed();
    let ready = until(start, || async {
        let list = api.list(&ListParams::default()).await?;
        let ready = list
            .items
            .iter()
            .filter(|md| {
                md.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        Ok(ready == n)
    })
    .await?;
    Ok((applied, ready))
}

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<(), BoxError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + Serialize
        + DeserializeOwned,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    Api::<K>::namespaced(client.clone(), ns)
        .patch(
            &name,
            &PatchParams::apply("bench-plain").force(),
            &Patch::Apply(obj),
        )
        .await?;
    Ok(())
}

async fn run_plain(client: &Client, ns: &str, n: usize) -> Result<(Duration, Duration), BoxError> {
    create_namespace(client, ns).await?;
    let sites: Vec<ResolvedSite> = SITES
        .iter()
        .map(|s| ResolvedSite {
            name: s.to_string(),
            node_selector: [("topology.kubernetes.io/zone".to_string(), s.to_string())].into(),
            nodes: 3,
        })
        .collect();
    let children: Vec<SiteChildren> = (0..n)
        .map(|i| {
            build::children(
                &domain(ns, i),
                None,
                &Default::default(),
                &sites,
                Some(&[]),
                &[],
            )
            .map(|c| c.sites)
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let start = Instant::now();
    stream::iter(children.iter().map(|c| async move {
        let SiteChildren {
            site: _,
            config_map,
            deployment,
            service,
            pdb,
            network_policy,
        } = c;
        apply::<ConfigMap>(client, ns, config_map).await?;
        apply::<Service>(client, ns, service).await?;
        apply::<PodDisruptionBudget>(client, ns, pdb).await?;
        apply::<NetworkPolicy>(client, ns, network_policy).await?;
        apply::<Deployment>(client, ns, deployment).await
    }))
    .buffer_unordered(CONCURRENCY)
    .try_collect::<Vec<_>>()
    .await?;
    let applied = start.elapsed();
    let ready = until(start, || all_deployments_ready(client, ns, children.len())).await?;
    Ok((applied, ready))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let n: usize = std::env::var("PEC_BENCH_DOMAINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let client = Client::try_default().await?;
    let tag = std::process::id();
    println!(
        "rollout benchmark: {n} MailDomains x {} sites, {} gateway pods, 5 objects per (domain, site)",
        SITES.len(),
        n * SITES.len() * 2
    );
    let (plain_applied, plain_ready) = run_plain(&client, &format!("bench-plain-{tag}"), n).await?;
    println!(
        "plain client : applied {:>7.2} s, all Deployments ready {:>7.2} s",
        plain_applied.as_secs_f64(),
        plain_ready.as_secs_f64()
    );
    let (op_applied, op_ready) = run_operator(&client, &format!("bench-operator-{tag}"), n).await?;
    println!(
        "operator     : applied {:>7.2} s, all MailDomains Ready  {:>7.2} s",
        op_applied.as_secs_f64(),
        op_ready.as_secs_f64()
    );
    println!(
        "ratio operator/plain (to all ready): {:.2}",
        op_ready.as_secs_f64() / plain_ready.as_secs_f64()
    );
    Ok(())
}
