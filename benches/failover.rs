//! Failover benchmark: induces repeated site failures and recoveries on the
//! local cluster and prints how long traffic takes to leave a failed site
//! (p50, p99, max), how long a recovered site takes to rejoin, and how many
//! switches a flapping site causes beyond the one its first failure justifies.
//!
//! Needs a local cluster with the operator running: `./e2e/bench.sh`.
//! Environment: `KUBECONFIG`, `PEC_BENCH_FAILURES` (default 20).

#[path = "../e2e/support/datacenter.rs"]
mod datacenter;
#[path = "../e2e/support/stats.rs"]
mod stats;

use std::time::{Duration, Instant};

use datacenter::{TestSites, endpoints_by_site, eventually};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use pec_operator::api::{FailoverMode, HealthSpec, MailDomain, SitePhase};
use serde_json::json;
use stats::percentile;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const PERIOD: i32 = 1;
const THRESHOLD: i32 = 3;
const STABILIZATION: i32 = 3;
const FLAP_STABILIZATION: i32 = 30;
const FLAPS: usize = 6;

async fn serving(api: &Api<MailDomain>, md: &str) -> Vec<String> {
    api.get(md)
        .await
        .ok()
        .and_then(|m| m.status)
        .map(|s| s.serving_sites)
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let failures: usize = std::env::var("PEC_BENCH_FAILURES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let client = Client::try_default().await?;
    let tag = std::process::id();
    let ns = format!("bench-failover-{tag}");
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await?;
    let health = HealthSpec {
        period_seconds: PERIOD,
        failure_threshold: THRESHOLD,
        fence_after_flaps: 0,
        ..HealthSpec::default()
    };
    let sites = TestSites::create(&client, &format!("bf{tag}"), health).await;
    let [a, b] = sites.names.clone();
    let mut md: MailDomain =
        serde_yaml::from_str(include_str!("../examples/20-maildomain-standard.yaml"))?;
    md.metadata.namespace = Some(ns.clone());
    md.spec.sites = sites.names.to_vec();
    md.spec.failover.mode = FailoverMode::ActiveActive;
    md.spec.failover.stabilization_seconds = STABILIZATION;
    let name = md.metadata.name.clone().unwrap_or_default();
    let api = Api::<MailDomain>::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &md).await?;
    eventually("both sites serving", || async {
        (endpoints_by_site(&client, &ns, &name).await.len() == 2).then_some(())
    })
    .await;

    println!(
        "failover benchmark: {failures} failures of one of two sites; health every {PERIOD}s, down after {THRESHOLD} checks (bound {}s), stabilization {STABILIZATION}s",
        PERIOD * THRESHOLD + 1
    );
    let mut detection = Vec::with_capacity(failures);
    let mut rejoin = Vec::with_capacity(failures);
    for i in 0..failures {
        let failing = if i % 2 == 0 { &a } else { &b };
        let failed_at = Instant::now();
        sites.fail(failing).await;
        let took = eventually("the failed site's endpoints to leave", || async {
            (!endpoints_by_site(&client, &ns, &name)
                .await
                .contains_key(failing))
            .then(|| failed_at.elapsed())
        })
        .await;
        detection.push(took);
        let recovered_at = Instant::now();
        sites.recover(failing).await;
        let back = eventually("the site to rejoin", || async {
            endpoints_by_site(&client, &ns, &name)
                .await
                .contains_key(failing)
                .then(|| recovered_at.elapsed())
        })
        .await;
        rejoin.push(back);
    }
    detection.sort();
    rejoin.sort();
    println!(
        "failure -> endpoints gone: p50 {:.2}s  p99 {:.2}s  max {:.2}s  (n={})",
        percentile(&detection, 50.0).as_secs_f64(),
        percentile(&detection, 99.0).as_secs_f64(),
        detection.last().map_or(0.0, Duration::as_secs_f64),
        detection.len()
    );
    println!(
        "recovery -> endpoints back: p50 {:.2}s  p99 {:.2}s  max {:.2}s  (stabilization {STABILIZATION}s plus kubelet-style pod readiness)",
        percentile(&rejoin, 50.0).as_secs_f64(),
        percentile(&rejoin, 99.0).as_secs_f64(),
        rejoin.last().map_or(0.0, Duration::as_secs_f64),
    );

    // A flapping site: down (as declared by the operator), up for a few
    // seconds, down again, with a stabilization window longer than its up time.
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"failover": {"stabilizationSeconds": FLAP_STABILIZATION}}})),
    )
    .await?;
    let mut last = serving(&api, &name).await;
    let mut switches = 0;
    let watch = |last: &mut Vec<String>, switches: &mut usize, now: Vec<String>| {
        if now != *last {
            *switches += 1;
            *last = now;
        }
    };
    for _ in 0..FLAPS {
        sites.fail(&b).await;
        sites.wait_phase(&b, SitePhase::Down).await;
        watch(&mut last, &mut switches, serving(&api, &name).await);
        sites.recover(&b).await;
        let up_until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < up_until {
            watch(&mut last, &mut switches, serving(&api, &name).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!(
        "flapping site ({FLAPS} down/up cycles, stabilization {FLAP_STABILIZATION}s): {switches} switch(es) of the serving sites, {} false (beyond the first removal)",
        switches.saturating_sub(1)
    );
    sites.remove().await;
    Ok(())
}
