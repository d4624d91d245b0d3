//! Tests that stop an operator replica. e2e/test.sh runs them after every
//! other test, alone, since the surviving replica needs a lease duration to
//! take over.

use kube::Api;
use pec_operator::api::{FailoverMode, SlaTarget};
use serde_json::json;

use crate::{
    failover::{World, fast_health, world},
    harness::{eventually, scrape, wait_for},
    sla::{measure, set_down},
};

fn first(s: Option<&SlaTarget>) -> Option<&pec_operator::api::SlaObjectStatus> {
    s.and_then(|s| s.status.as_ref())
        .and_then(|st| st.objects.first())
}

#[tokio::test]
async fn killing_the_leader_mid_outage_loses_nothing_and_records_the_gap_as_unobserved() {
    let World {
        client,
        ns,
        sites,
        md,
    } = world(
        "sla-leader-crash",
        "lc",
        fast_health(),
        FailoverMode::ActiveActive,
        1,
    )
    .await;
    let sla = measure(&client, &ns, &md, json!({})).await;
    let slas = Api::<SlaTarget>::namespaced(client.clone(), &ns);

    set_down(&client, &sites, true).await;
    let before = wait_for(
        &slas,
        &sla,
        "an outage in status",
        |s: Option<&SlaTarget>| {
            first(s).is_some_and(|o| o.ongoing_outage.is_some() && o.period.down_seconds >= 2.0)
        },
    )
    .await;
    let before = first(Some(&before)).expect("object").clone();
    let started = before
        .ongoing_outage
        .clone()
        .and_then(|o| o.start)
        .expect("outage start");

    // Kill the leader the hard way: no lease release, no last status write.
    let ports: Vec<String> = std::env::var("PEC_E2E_METRICS_PORTS")
        .expect("ports")
        .split(',')
        .map(String::from)
        .collect();
    let pids: Vec<String> = std::env::var("PEC_E2E_PIDS")
        .expect("e2e/test.sh sets PEC_E2E_PIDS")
        .split(',')
        .map(String::from)
        .collect();
    let mut leader = None;
    for (i, port) in ports.iter().enumerate() {
        if scrape(port).await.lines().any(|l| l == "pec_leader 1") {
            leader = Some(i);
        }
    }
    let leader = leader.expect("a leader");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pids[leader]])
        .status()
        .expect("kill");
    assert!(killed.success());
    let survivor = ports[1 - leader].clone();
    eventually("the surviving replica to lead", || async {
        scrape(&survivor)
            .await
            .lines()
            .any(|l| l == "pec_leader 1")
            .then_some(())
    })
    .await;

    let after = wait_for(
        &slas,
        &sla,
        "measurement resumed after the gap",
        |s: Option<&SlaTarget>| {
            first(s)
                .is_some_and(|o| o.period.unobserved_seconds > 0.0 && o.ongoing_outage.is_some())
        },
    )
    .await;
    let after = first(Some(&after)).expect("object").clone();
    println!(
        "unobserved {:.1}s, down {:.1}s before the crash, {:.1}s after",
        after.period.unobserved_seconds, before.period.down_seconds, after.period.down_seconds
    );
    // Nothing measured before the crash is lost.
    assert!(after.period.down_seconds >= before.period.down_seconds);
    let kept = after
        .period
        .latest_outage
        .clone()
        .expect("the outage seen before the crash");
    assert_eq!(
        kept.start,
        Some(started),
        "the outage from before the crash is kept"
    );
    assert_eq!(
        after.period.outages, 2,
        "split by the unobserved gap, never guessed across it"
    );
    // The unobserved gap covers at least the lease takeover.
    assert!(after.period.unobserved_seconds >= 5.0);
    set_down(&client, &sites, false).await;
    sites.remove().await;
}
