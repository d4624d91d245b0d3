//! Rollout and scale benchmark. For each size N:
//! - **convergence**: how long N MailDomains over two sites take from apply
//!   until every gateway Deployment is ready and every domain's status is
//!   written, beside a plain client that server-side-applies the same child
//!   objects itself (each site's objects and the domain Service), waits for
//!   the same Deployments and then writes the domain Service's
//!   EndpointSlices from the ready pods, in the same run; and which Events
//!   the operator wrote, by reason;
//! - **requests**: the operator's API requests per second at steady state,
//!   by verb, over a minute;
//! - **resync**: the writes the operator makes during one full resync period
//!   of the converged platform (Lease renewals counted apart);
//! - **memory**: the operator's resident memory after convergence, and
//!   again after the resync period (idle connections and transient
//!   buffers gone) and once the rollout's Events have aged out of the
//!   operator's event recorder (seven and a half minutes after its last
//!   Event; the figures the slope is taken from), against the domains in
//!   the cluster, and its slope per domain; beside it, the heap its live
//!   objects take and the heap its allocator holds
//!   (`pec_operator_heap_*`), which tell the caches' growth from the
//!   allocator's slack and the binary's own pages; and its CPU while idle.
//!
//! Needs a local cluster with the operator running: `./e2e/bench.sh` sets it
//! up, runs this program and tears it down. Prints figures; asserts nothing.
//!
//! Environment: `KUBECONFIG`; `PEC_BENCH_DOMAINS`, sizes (default `200`;
//! `200,1000` runs both, each in namespaces of its own, the earlier still
//! there, so the cluster then holds 1,200 domains); `PEC_BENCH_PLAIN_UP_TO`,
//! the largest size the plain client runs beside the operator (larger sizes
//! run the operator alone, for its memory and requests: `1000,4000,5000`
//! with `PEC_BENCH_PLAIN_UP_TO=1000` measures 1,000, 5,000 and 10,000
//! domains); `PEC_BENCH_AUDIT_LOG`, the API server's audit log of the
//! operator's requests (`e2e/cluster.sh up --audit-operator`), without which
//! requests and writes are not counted; `PEC_BENCH_RESYNC_SECONDS`, the
//! operator's `--resync-seconds`; `PEC_BENCH_OPERATOR_PORT`, its metrics
//! port, for its memory.

use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt, TryStreamExt, stream};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Namespace, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
    events::v1::Event,
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use pec_operator::{
    api::{MailDomain, MailDomainSpec, Site},
    controllers::{
        MANAGED_BY, events,
        mail_domain::{
            build::{self, Children, ReadyGateway, SiteChildren},
            observe::{self, ResolvedSite},
        },
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
    // No store claim: a claim that does not exist keeps pods from being
    // scheduled, and both sides would wait for nothing.
    md.spec.gateway.storage_claim_name = None;
    // Small requests, so a thousand domains' gateways fit the simulated nodes.
    let q = |v: &str| k8s_openapi::apimachinery::pkg::api::resource::Quantity(v.into());
    md.spec.gateway.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
        requests: Some([("cpu".into(), q("10m")), ("memory".into(), q("16Mi"))].into()),
        ..Default::default()
    });
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
/// For `n` domains: each poll lists them all, so above 1,000 domains polls
/// are spaced by the size (200 ms up to 1,000 domains, 4 s at 4,000) and
/// the time is that coarse; the bench gives up after 15 minutes plus 0.6 s
/// per domain.
async fn until<F, Fut>(start: Instant, n: usize, mut done: F) -> Result<Duration, BoxError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, BoxError>>,
{
    let limit = Duration::from_secs(900) + Duration::from_millis(600 * n as u64);
    let interval = Duration::from_millis(if n <= 1000 { 200 } else { n as u64 });
    loop {
        if done().await? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(format!("gave up after {} s", limit.as_secs()).into());
        }
        tokio::time::sleep(interval).await;
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

/// The Secrets every bench domain names, as a platform engineer makes them:
/// a TLS certificate for `*.bench.example.it` and a mailboxes file. With
/// them the reference checks pass, so a domain is looked at again only at
/// the resync, as on a healthy platform.
async fn create_secrets(client: &Client, ns: &str, md: &MailDomain) -> Result<(), BoxError> {
    let cert = rcgen::generate_simple_self_signed(vec!["*.bench.example.it".to_string()])?;
    let secret = |name: &str, type_: &str, data: Vec<(&str, String)>| Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        type_: Some(type_.into()),
        string_data: Some(data.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
        ..Secret::default()
    };
    let gateway = &md.spec.gateway;
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    for s in [
        secret(
            gateway.tls_secret_ref.as_deref().unwrap_or_default(),
            "kubernetes.io/tls",
            vec![
                ("tls.crt", cert.cert.pem()),
                ("tls.key", cert.signing_key.serialize_pem()),
            ],
        ),
        secret(
            gateway.mailboxes_secret_ref.as_deref().unwrap_or_default(),
            "Opaque",
            vec![("mailboxes", "bench:!\n".to_string())],
        ),
    ] {
        secrets.create(&PostParams::default(), &s).await?;
    }
    Ok(())
}

async fn run_operator(
    client: &Client,
    ns: &str,
    n: usize,
) -> Result<(Duration, Duration), BoxError> {
    create_namespace(client, ns).await?;
    create_secrets(client, ns, &domain(ns, 0)).await?;
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
    // The same end as the plain client's (every Deployment ready and the
    // domain Service's endpoints written), and every domain's status
    // written for its generation. A status that counts every gateway ready
    // comes from a reconcile that saw them ready, which wrote the
    // endpoints first. Not Ready=True: that also needs each domain's
    // SigningKey active in an HSM, which the plain client has no
    // counterpart for.
    let ready = until(start, n, || async {
        let list = api.list(&ListParams::default()).await?;
        let observed = list
            .items
            .iter()
            .filter(|md| {
                md.status.as_ref().is_some_and(|s| {
                    s.observed_generation == md.metadata.generation
                        && s.sites.len() == SITES.len()
                        && s.sites
                            .iter()
                            .all(|g| g.desired > 0 && g.ready == g.desired)
                })
            })
            .count();
        Ok(observed == n && all_deployments_ready(client, ns, n * SITES.len()).await?)
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
    let domains: Vec<MailDomain> = (0..n).map(|i| domain(ns, i)).collect();
    let children = |md: &MailDomain, gateways: &[ReadyGateway]| {
        let serving: Vec<String> = SITES.iter().map(|s| s.to_string()).collect();
        build::children(
            md,
            None,
            &Default::default(),
            &sites,
            Some(&serving),
            gateways,
        )
    };
    let initial: Vec<Children> = domains
        .iter()
        .map(|md| children(md, &[]))
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    // The same children as the operator's: each site's objects and the
    // domain Service.
    stream::iter(initial.iter().flat_map(|c| {
        let sites = c.sites.iter().map(|site| {
            let SiteChildren {
                site: _,
                config_map,
                deployment,
                service,
                pdb,
                network_policy,
            } = site;
            async move {
                apply::<ConfigMap>(client, ns, config_map).await?;
                apply::<Service>(client, ns, service).await?;
                apply::<PodDisruptionBudget>(client, ns, pdb).await?;
                apply::<NetworkPolicy>(client, ns, network_policy).await?;
                apply::<Deployment>(client, ns, deployment).await
            }
            .boxed()
        });
        let domain_service = apply::<Service>(client, ns, &c.domain_service).boxed();
        sites.chain(std::iter::once(domain_service))
    }))
    .buffer_unordered(CONCURRENCY)
    .try_collect::<Vec<_>>()
    .await?;
    let applied = start.elapsed();
    until(start, n, || {
        all_deployments_ready(client, ns, n * SITES.len())
    })
    .await?;
    // ...and, once the gateways are ready, the domain Service's endpoints:
    // one EndpointSlice per site, listing that site's ready gateway pods.
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items;
    let slices: Vec<EndpointSlice> = domains
        .iter()
        .map(|md| {
            let own: Vec<Pod> = pods
                .iter()
                .filter(|p| p.labels().get(build::DOMAIN_LABEL) == md.metadata.name.as_ref())
                .cloned()
                .collect();
            children(md, &observe::ready_gateways(&own))
                .map(|c| c.endpoint_slices.unwrap_or_default())
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    stream::iter(slices.iter().map(|s| apply::<EndpointSlice>(client, ns, s)))
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    Ok((applied, start.elapsed()))
}

/// The Events about the domains in `ns` by type and reason, per domain:
/// which of the operator's writes while converging are Events.
async fn print_events(client: &Client, ns: &str, n: usize) -> Result<(), BoxError> {
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    // (objects, occurrences) by "type reason"
    let mut by_reason = std::collections::BTreeMap::<String, (usize, i32)>::new();
    for e in events.items {
        let key = format!(
            "{} {}",
            e.type_.unwrap_or_default(),
            e.reason.unwrap_or_default()
        );
        let entry = by_reason.entry(key).or_default();
        entry.0 += 1;
        entry.1 += e.series.map_or(1, |s| s.count);
    }
    println!(
        "  Events per domain (objects/occurrences): {}",
        by_reason
            .iter()
            .map(|(what, (objects, seen))| format!(
                "{what} {:.2}/{:.2}",
                *objects as f64 / n as f64,
                *seen as f64 / n as f64
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// One request of the operator, from the audit log.
struct Request {
    at: chrono::DateTime<chrono::Utc>,
    verb: String,
    resource: String,
}

/// The operator's requests in the audit log at `path` (JSON lines).
fn audit(path: &str) -> Result<Vec<Request>, BoxError> {
    use std::io::BufRead;
    let lines = std::io::BufReader::new(std::fs::File::open(path)?).lines();
    Ok(lines
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
        .filter_map(|e| {
            let at = e["requestReceivedTimestamp"].as_str()?.parse().ok()?;
            let group = e["objectRef"]["apiGroup"].as_str().unwrap_or("");
            let resource = e["objectRef"]["resource"].as_str().unwrap_or("?");
            let subresource = e["objectRef"]["subresource"]
                .as_str()
                .map(|s| format!("/{s}"))
                .unwrap_or_default();
            Some(Request {
                at,
                verb: e["verb"].as_str()?.to_string(),
                resource: if group.is_empty() {
                    format!("{resource}{subresource}")
                } else {
                    format!("{resource}.{group}{subresource}")
                },
            })
        })
        .collect())
}

/// Counts of the requests in `[from, to)` by `key`.
fn count_by(
    requests: &[Request],
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
    key: impl Fn(&Request) -> Option<String>,
) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for r in requests.iter().filter(|r| r.at >= from && r.at < to) {
        if let Some(k) = key(r) {
            *counts.entry(k).or_insert(0) += 1;
        }
    }
    counts
}

fn is_write(verb: &str) -> bool {
    matches!(
        verb,
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

fn now() -> chrono::DateTime<chrono::Utc> {
    pec_operator::clock::Clock::now(&pec_operator::clock::SystemClock)
}

/// The value of the operator's own metric `name` (unlabelled), from its
/// metrics on `port` (the process may have been restarted).
fn operator_metric(port: &str, name: &str) -> Option<f64> {
    let out = std::process::Command::new("curl")
        .args(["-fsS", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?
        .trim()
        .parse()
        .ok()
}

/// The namespace of the operator's run of `n` domains.
fn operator_namespace(n: usize) -> String {
    format!("bench-operator-{}-{n}", std::process::id())
}

/// How long ago the operator last published an Event in `ns` (zero if it
/// published none).
async fn since_last_operator_event(client: &Client, ns: &str) -> Result<Duration, BoxError> {
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let last = events
        .items
        .iter()
        .filter(|e| e.reporting_controller.as_deref() == Some(MANAGED_BY))
        .filter_map(|e| {
            let series = e.series.as_ref().map(|s| s.last_observed_time.0);
            series.or(e.event_time.as_ref().map(|t| t.0))
        })
        .max();
    let Some(last) = last else {
        return Ok(Duration::ZERO);
    };
    let since = jiff::Timestamp::now().duration_since(last);
    Ok(Duration::try_from(since).unwrap_or(Duration::ZERO))
}

/// The CPU seconds the operator has spent, from its metrics on `port`.
fn operator_cpu(port: Option<&str>) -> Option<f64> {
    operator_metric(port?, "process_cpu_seconds_total")
}

/// The operator's memory, in MiB: the whole process's resident memory,
/// and of its heap what live objects take and what the allocator holds.
#[derive(Clone, Copy)]
struct Memory {
    rss: f64,
    allocated: f64,
    heap_resident: f64,
}

impl Memory {
    fn read(port: &str) -> Option<Self> {
        let mib = |name| operator_metric(port, name).map(|b| b / 1024.0 / 1024.0);
        Some(Self {
            rss: mib("process_resident_memory_bytes")?,
            allocated: mib("pec_operator_heap_allocated_bytes")?,
            heap_resident: mib("pec_operator_heap_resident_bytes")?,
        })
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} MiB (heap {:.1} MiB allocated, {:.1} MiB held by the allocator)",
            self.rss, self.allocated, self.heap_resident
        )
    }
}

/// Requests per second over a minute of steady state, and the writes of
/// one resync period, from the audit log.
async fn steady_state(log: &str, resync: u64) -> Result<(), BoxError> {
    // Let the last reconciles of the rollout finish.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let from = now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let to = now();
    let requests = audit(log)?;
    let by_verb = count_by(&requests, from, to, |r| Some(r.verb.clone()));
    let total: usize = by_verb.values().sum();
    println!(
        "  requests at steady state: {:.2}/s over 60 s ({})",
        total as f64 / 60.0,
        by_verb
            .iter()
            .map(|(verb, n)| format!("{verb} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let window = resync + 15;
    tokio::time::sleep(Duration::from_secs(window.saturating_sub(60))).await;
    let to = now();
    let requests = audit(log)?;
    let writes = count_by(&requests, from, to, |r| {
        (is_write(&r.verb) && !r.resource.starts_with("leases."))
            .then(|| format!("{} {}", r.verb, r.resource))
    });
    let leases = count_by(&requests, from, to, |r| {
        (is_write(&r.verb) && r.resource.starts_with("leases.")).then(|| r.verb.clone())
    });
    println!(
        "  writes during one full resync ({window} s, resync period {resync} s): {} ({}); Lease renewals apart: {}",
        writes.values().sum::<usize>(),
        if writes.is_empty() {
            "none".to_string()
        } else {
            writes
                .iter()
                .map(|(what, n)| format!("{what} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        leases.values().sum::<usize>()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let sizes: Vec<usize> = std::env::var("PEC_BENCH_DOMAINS")
        .unwrap_or_else(|_| "200".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let plain_up_to: usize = std::env::var("PEC_BENCH_PLAIN_UP_TO")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    let audit_log = std::env::var("PEC_BENCH_AUDIT_LOG").ok();
    let resync: u64 = std::env::var("PEC_BENCH_RESYNC_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let port = std::env::var("PEC_BENCH_OPERATOR_PORT").ok();
    let client = Client::try_default().await?;
    let memory_now = || port.as_deref().and_then(Memory::read);
    let idle = memory_now();
    if let Some(idle) = idle {
        println!("operator memory before any domain: {idle}");
    }
    // (domains in the cluster, the operator's memory once they settled)
    let mut memory = Vec::new();
    let mut total = 0;
    for n in sizes {
        rollout(
            &client,
            n,
            n <= plain_up_to,
            audit_log.as_deref(),
            port.as_deref(),
        )
        .await?;
        total += n;
        let converged_at = Instant::now();
        let converged = memory_now();
        if let Some(memory) = converged {
            println!(
                "  operator memory after convergence: {memory} ({total} domains in the cluster)"
            );
        }
        let settled = match &audit_log {
            Some(log) => {
                steady_state(log, resync).await?;
                let settled = memory_now();
                if let Some(memory) = settled {
                    println!(
                        "  operator memory after the resync: {memory} ({total} domains in the cluster)"
                    );
                }
                settled
            }
            None => {
                println!("  requests and writes: not counted (no PEC_BENCH_AUDIT_LOG)");
                converged
            }
        };
        // Wait until the operator has dropped the recorder that kept the
        // rollout's Events: the bound after its last one.
        let since_last = since_last_operator_event(&client, &operator_namespace(n)).await?;
        let wait = (events::FORGOTTEN_WITHIN + Duration::from_secs(10)).saturating_sub(since_last);
        let cpu = || operator_cpu(port.as_deref());
        let (idle_from, cpu_before) = (Instant::now(), cpu());
        tokio::time::sleep(wait).await;
        let idle = idle_from.elapsed();
        match (cpu_before, cpu()) {
            (Some(before), Some(after)) if idle >= Duration::from_secs(60) => println!(
                "  operator CPU while idle: {:.1} s over {:.0} s ({:.1}% of one core)",
                after - before,
                idle.as_secs_f64(),
                100.0 * (after - before) / idle.as_secs_f64()
            ),
            _ => println!("  operator CPU while idle: not measured (under a minute idle)"),
        }
        let settled = match memory_now() {
            Some(memory) => {
                println!(
                    "  operator memory once its Events aged out ({} s after convergence): {memory}",
                    converged_at.elapsed().as_secs()
                );
                Some(memory)
            }
            None => settled,
        };
        if let Some(settled) = settled {
            memory.push((total, settled));
        }
    }
    if let (Some(idle), false) = (idle, memory.is_empty()) {
        println!("operator memory by domains in the cluster (settled):");
        let mut before = (0, idle);
        for &(domains, now) in &memory {
            let per_domain = |mib: fn(&Memory) -> f64| {
                (mib(&now) - mib(&before.1)) * 1024.0 / (domains - before.0) as f64
            };
            println!(
                "  {domains:>6} domains: {now}; per domain since {} domains: {:.1} KiB resident, \
                 {:.1} KiB of heap allocated",
                before.0,
                per_domain(|m| m.rss),
                per_domain(|m| m.allocated),
            );
            before = (domains, now);
        }
    }
    Ok(())
}

/// The convergence figures for `n` domains, plain client first (when
/// `plain`), and the operator's requests per domain while it converged (from the audit log
/// at `audit_log`, when there is one) and the CPU it spent (from its
/// metrics on `port`).
async fn rollout(
    client: &Client,
    n: usize,
    plain: bool,
    audit_log: Option<&str>,
    port: Option<&str>,
) -> Result<(), BoxError> {
    let client = client.clone();
    let tag = std::process::id();
    println!(
        "rollout benchmark: {n} MailDomains x {} sites, {} gateway pods, 5 objects per (domain, site), a Service and 2 EndpointSlices per domain",
        SITES.len(),
        n * SITES.len() * 2
    );
    let plain_ready = if plain {
        let plain_ns = format!("bench-plain-{tag}-{n}");
        let (plain_applied, plain_ready) = run_plain(&client, &plain_ns, n).await?;
        println!(
            "plain client : applied {:>7.2} s, all Deployments ready {:>7.2} s",
            plain_applied.as_secs_f64(),
            plain_ready.as_secs_f64()
        );
        // The plain client's objects go before the operator starts: they
        // carry the operator's labels and would sit in its caches, and
        // their deletion would load the API server while the operator
        // converges, which the plain client's run did not have to share.
        let namespaces = Api::<Namespace>::all(client.clone());
        namespaces.delete(&plain_ns, &Default::default()).await?;
        let gone = until(Instant::now(), n, || {
            let namespaces = namespaces.clone();
            let plain_ns = plain_ns.clone();
            async move { Ok(namespaces.get_opt(&plain_ns).await?.is_none()) }
        })
        .await?;
        println!(
            "plain client : its namespace deleted in {:>7.2} s, before the operator starts",
            gone.as_secs_f64()
        );
        Some(plain_ready)
    } else {
        println!("plain client : not run at this size (PEC_BENCH_PLAIN_UP_TO)");
        None
    };
    let cpu = || operator_cpu(port);
    // Before the first MailDomain the series may not exist yet: zero.
    let reconciles = || {
        let metric = |m: &str| {
            operator_metric(port?, &format!("{m}{{controller=\"maildomain\"}}")).or(Some(0.0))
        };
        Some((
            metric("pec_reconcile_duration_seconds_count")?,
            metric("pec_reconcile_duration_seconds_sum")?,
        ))
    };
    let cpu_before = cpu();
    let reconciles_before = reconciles();
    let from = now();
    let operator_ns = operator_namespace(n);
    let (op_applied, op_ready) = run_operator(&client, &operator_ns, n).await?;
    let to = now();
    print_events(&client, &operator_ns, n).await?;
    if let (Some(before), Some(after)) = (cpu_before, cpu()) {
        println!(
            "  operator CPU while converging: {:.1} s ({:.0}% of one core)",
            after - before,
            100.0 * (after - before) / op_ready.as_secs_f64()
        );
    }
    if let (Some((count0, sum0)), Some((count1, sum1))) = (reconciles_before, reconciles()) {
        println!(
            "  MailDomain reconciles while converging: {:.1} per domain, {:.2} s each on average",
            (count1 - count0) / n as f64,
            (sum1 - sum0) / (count1 - count0).max(1.0)
        );
    }
    println!(
        "operator     : applied {:>7.2} s, all Deployments ready {:>7.2} s (and every status written)",
        op_applied.as_secs_f64(),
        op_ready.as_secs_f64()
    );
    if let Some(plain_ready) = plain_ready {
        println!(
            "ratio operator/plain (to all ready): {:.2}",
            op_ready.as_secs_f64() / plain_ready.as_secs_f64()
        );
    }
    if let Some(log) = audit_log {
        let requests = audit(log)?;
        let last_deployment = requests
            .iter()
            .filter(|r| r.at >= from && r.at < to && r.resource == "deployments.apps")
            .map(|r| r.at)
            .max();
        if let Some(at) = last_deployment {
            println!(
                "  operator's last Deployment write: {:.2} s after the first MailDomain",
                (at - from).num_milliseconds() as f64 / 1000.0
            );
        }
        let by_kind = count_by(&requests, from, to, |r| {
            (!r.resource.starts_with("leases.")).then(|| format!("{} {}", r.verb, r.resource))
        });
        println!(
            "  operator requests per domain while converging: {:.1} ({})",
            by_kind.values().sum::<usize>() as f64 / n as f64,
            by_kind
                .iter()
                .map(|(what, k)| {
                    // A request a handful of times in the whole run (a watch
                    // started again) is given as its count, not as 0.00.
                    let per_domain = *k as f64 / n as f64;
                    if per_domain < 0.01 {
                        format!("{what} {k} in all")
                    } else {
                        format!("{what} {per_domain:.2}")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
