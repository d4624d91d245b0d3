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
    let ports = main_ports();
    let leader = leader_index(&ports).await;
    signal_listener(&ports[leader], "KILL");
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

/// The end of a measurement period: the January-April quadrimester ends at
/// midnight in Rome, 22:00 UTC (summer time).
const PERIOD_END: &str = "2026-04-30T22:00:00Z";

/// A measurement period closes: the SlaTarget moves it to its history with
/// the period's figures and publishes a `PeriodClosed` Event that says them.
/// The leader is restarted with its clock a minute before the end of a
/// period (`PEC_CLOCK_START`), and on the wall clock again afterwards.
#[tokio::test]
async fn the_end_of_a_period_moves_it_to_history_and_publishes_period_closed() {
    let end: chrono::DateTime<chrono::Utc> = PERIOD_END.parse().expect("instant");
    let ports = main_ports();
    let leader = leader_index(&ports).await;
    let (identity, port) = (IDENTITIES[leader], ports[leader].clone());
    signal_listener(&port, "KILL");
    stops_answering(&port).await;
    let start = (end - chrono::Duration::seconds(90)).to_rfc3339();
    let mut moved = KilledOnDrop(start_replica(
        identity,
        &port,
        &[("PEC_CLOCK_START", &start)],
    ));
    eventually("the moved replica to lead", || async {
        leads(&port).await.then_some(())
    })
    .await;
    // Sites and domain made under the moved clock, so every time in their
    // status is on it too (a site healthy since December would not be
    // stable yet in April).
    let World {
        client,
        ns,
        sites,
        md,
    } = world(
        "sla-period",
        "pc",
        fast_health(),
        FailoverMode::ActiveActive,
        1,
    )
    .await;
    let sla = measure(&client, &ns, &md, json!({"period": "Quadrimester"})).await;
    let slas = Api::<SlaTarget>::namespaced(client.clone(), &ns);
    let open = wait_for(
        &slas,
        &sla,
        "measurement in January-April",
        |s: Option<&SlaTarget>| {
            first(s).is_some_and(|o| {
                o.period.end.as_ref().map(|t| t.0.as_second()) == Some(end.timestamp())
                    && o.period.measured_seconds > 0.0
            })
        },
    )
    .await;
    let open = first(Some(&open)).expect("object").clone();
    assert!(open.history.is_empty(), "nothing closed yet");
    let label = open.period.label.clone();

    let closed = wait_for(
        &slas,
        &sla,
        "the period in history",
        |s: Option<&SlaTarget>| first(s).is_some_and(|o| !o.history.is_empty()),
    )
    .await;
    let object = first(Some(&closed)).expect("object").clone();
    let period = object.history.last().expect("a closed period");
    println!(
        "closed {}: measured {:.0}s, availability {}%, met {:?}; now in {}",
        period.label, period.measured_seconds, period.availability, period.met, object.period.label
    );
    assert_eq!(period.label, label, "the period that was open closed");
    assert_eq!(
        period.end.as_ref().map(|t| t.0.as_second()),
        Some(end.timestamp()),
        "it ends at midnight in Rome"
    );
    assert!(period.measured_seconds > 0.0);
    assert_eq!(period.availability, 100.0, "the domain served throughout");
    assert_eq!(period.met, Some(true));
    assert_ne!(object.period.label, label, "a new period is open");
    assert_eq!(
        object.period.start.as_ref().map(|t| t.0.as_second()),
        Some(end.timestamp()),
        "the new period starts where the old one ended"
    );

    let note = eventually("a PeriodClosed Event", || async {
        crate::harness::events_text(&client, &ns)
            .await
            .into_iter()
            .find(|(reason, _)| reason == "PeriodClosed")
            .map(|(_, note)| note)
    })
    .await;
    println!("PeriodClosed: {note}");
    assert!(
        note.contains(&label) && note.contains(&md) && note.ends_with(": met"),
        "the Event names the period, the domain and the verdict: {note}"
    );
    assert!(
        crate::harness::events_of(&client, &ns, &sla)
            .await
            .contains(&("Normal".into(), "PeriodClosed".into())),
        "a met period is a Normal Event about the SlaTarget"
    );

    // Back on the wall clock for the tests that follow.
    moved.stop();
    #[allow(clippy::zombie_processes)]
    let _restarted = start_replica(identity, &port, &[]);
    eventually("the restarted replica to lead again", || async {
        leads(&port).await.then_some(())
    })
    .await;
    sites.remove().await;
}

/// A replica that must not outlive its test, even one that fails (a
/// replica on a moved clock would measure every other test's SLA wrong).
struct KilledOnDrop(Replica);

impl KilledOnDrop {
    fn stop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until nothing answers on the local TCP `port`.
async fn stops_answering(port: &str) {
    eventually("the killed replica to stop answering", || async {
        tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
            .await
            .is_err()
            .then_some(())
    })
    .await;
}

/// The identities of the two replicas e2e/test.sh starts, in the order of
/// [`main_ports`].
const IDENTITIES: [&str; 2] = ["replica-a", "replica-b"];

/// The metrics ports of the two replicas e2e/test.sh starts (a replica a
/// test restarts keeps its identity and port).
fn main_ports() -> Vec<String> {
    std::env::var("PEC_E2E_METRICS_PORTS")
        .expect("e2e/test.sh sets PEC_E2E_METRICS_PORTS")
        .split(',')
        .map(String::from)
        .collect()
}

/// Which of `ports` leads (waits for one to).
async fn leader_index(ports: &[String]) -> usize {
    eventually("a leading replica", || async {
        for (i, port) in ports.iter().enumerate() {
            if leads(port).await {
                return Some(i);
            }
        }
        None
    })
    .await
}

/// Sends `signal` to the process listening on the local TCP `port` (found
/// with `ss`, so a replica restarted by an earlier test is found too).
fn signal_listener(port: &str, signal: &str) {
    let out = std::process::Command::new("ss")
        .args(["-Hltnp", &format!("sport = :{port}")])
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let pid = text
        .split("pid=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .filter(|pid| !pid.is_empty())
        .unwrap_or_else(|| panic!("no process listens on port {port}: {text}"));
    let sent = std::process::Command::new("kill")
        .args([&format!("-{signal}"), pid])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -{signal} {pid}");
}

/// A leader given SIGTERM releases the Lease as it stops, so the follower
/// leads at its next attempt (a retry period) instead of waiting for the
/// Lease to expire (a lease duration after the last renewal). The stopped
/// replica is started again under its identity, as a follower. It reads the
/// log e2e/test.sh gave the leader, so it must run first of this module
/// (tests run alone, in name order); the restart comes before that check so
/// a failure leaves two replicas for the tests after it.
#[tokio::test]
async fn a_leader_given_sigterm_releases_the_lease_and_the_follower_leads_at_once() {
    let ports = main_ports();
    let leader = leader_index(&ports).await;
    let follower = ports[1 - leader].clone();
    let started = tokio::time::Instant::now();
    signal_listener(&ports[leader], "TERM");
    eventually("the follower to lead", || async {
        leads(&follower).await.then_some(())
    })
    .await;
    let handover = started.elapsed();
    println!("SIGTERM to the leader -> the follower leads: {handover:?}");
    // Without the release the follower waits for the record to stand
    // unchanged for the lease duration (15 s), which began at the last
    // renewal, at most one retry period (2 s) before the signal.
    assert!(
        handover < std::time::Duration::from_secs(13),
        "the follower led after {handover:?}: it waited for the Lease to expire"
    );
    // Back to two replicas for the tests that follow.
    #[allow(clippy::zombie_processes)]
    let _restarted = start_replica(IDENTITIES[leader], &ports[leader], &[]);
    eventually("the restarted replica to answer as a follower", || async {
        let up = tokio::net::TcpStream::connect(format!("127.0.0.1:{}", ports[leader]))
            .await
            .is_ok();
        (up && !leads(&ports[leader]).await).then_some(())
    })
    .await;
    let logs = std::env::var("PEC_E2E_LOGS").expect("e2e/test.sh sets PEC_E2E_LOGS");
    let suffix = if leader == 0 { "a" } else { "b" };
    let log = std::fs::read_to_string(format!("{logs}/operator-{suffix}.log")).expect("log");
    assert!(
        log.contains("released the leader lease"),
        "the stopped leader's log says it released the Lease"
    );
}

/// Whether the replica on `port` answers and leads.
async fn leads(port: &str) -> bool {
    if tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .is_err()
    {
        return false;
    }
    scrape(port).await.lines().any(|l| l == "pec_leader 1")
}

/// An operator replica started by a test, with its own log file.
struct Replica {
    child: std::process::Child,
    log: std::path::PathBuf,
}

/// Starts an operator replica as `identity` with `env` added, such as
/// `PEC_CRASH_AFTER` (abort after a step, see src/failpoint.rs) or
/// `PEC_CLOCK_START` (a moved clock, see src/clock.rs).
fn start_replica(identity: &str, port: &str, env: &[(&str, &str)]) -> Replica {
    static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("e2e/test.sh sets {k}"));
    let logs = var("PEC_E2E_LOGS");
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::path::PathBuf::from(format!("{logs}/operator-restart-{identity}-{n}.log"));
    let log = std::fs::File::create(&path).expect("log file");
    let mut cmd = std::process::Command::new(var("PEC_E2E_OPERATOR"));
    cmd.arg("run")
        .env("KUBECONFIG", var("PEC_E2E_OPERATOR_KUBECONFIG"))
        .env("POD_NAMESPACE", "pec-system")
        .env("POD_NAME", identity)
        .env("PEC_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("PEC_LOG_FORMAT", "json")
        .env_remove("PEC_CRASH_AFTER")
        .env_remove("PEC_CLOCK_START")
        .envs(env.iter().copied())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    let child = cmd.spawn().expect("start the operator");
    // e2e/test.sh stops whatever is left when the run ends.
    let mut pids = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{logs}/extra-pids"))
        .expect("pid file");
    std::io::Write::write_all(&mut pids, format!("{}\n", child.id()).as_bytes()).expect("pid");
    Replica { child, log: path }
}

/// Waits for a replica armed with `armed` (`point@namespace/name`) to abort,
/// and checks from its own log that it aborted at that step for that
/// object, not for some other reason.
async fn crashes(mut replica: Replica, armed: &str) {
    let (point, object) = armed.split_once('@').expect("point@namespace/name");
    let deadline = tokio::time::Instant::now() + crate::datacenter::WAIT;
    loop {
        if let Some(status) = replica.child.try_wait().expect("wait") {
            assert!(!status.success(), "aborted at {armed}: {status}");
            let log = std::fs::read_to_string(&replica.log).expect("replica log");
            let aborted_here = log.lines().any(|line| {
                line.contains("aborting on purpose")
                    && line.contains(&format!("\"point\":\"{point}\""))
                    && line.contains(&format!("\"object\":\"{object}\""))
            });
            assert!(
                aborted_here,
                "the replica exited without reaching {armed}; its log:\n{log}"
            );
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the operator never reached {armed}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn killing_the_operator_at_each_signing_key_step_makes_no_second_key() {
    use crate::{
        harness::{client, namespace},
        hsm::token,
        signing::{create_key, current_generation, pin_secret, real_pin, signing_key},
    };
    use k8s_openapi::api::core::v1::Secret;
    use kube::{
        ResourceExt,
        api::{Patch, PatchParams},
    };
    use pec_operator::{api::SigningKey, hsm::key_id};

    let client = client().await;
    let ns = namespace(&client, "sk-crash").await;
    pin_secret(&client, &ns, &real_pin()).await;
    let ports = main_ports();
    let leader = leader_index(&ports).await;
    let (identity, port) = (IDENTITIES[leader], ports[leader].as_str());
    // Stop the leader; its restarts take the Lease back at once under the
    // same identity, before any other replica could.
    signal_listener(port, "KILL");
    stops_answering(port).await;

    let manifest = signing_key(
        "crash",
        serde_json::json!({"selfSigned": {}}),
        serde_json::json!({"publication": {"delay": "24h"}}),
    );
    let api = create_key(&client, &ns, &manifest).await;
    let uid = api.get("crash").await.expect("get").uid().expect("uid");
    let keys = |n| token().count_keys(&key_id(&uid, n)).expect("count");
    let secrets = kube::Api::<Secret>::namespaced(client.clone(), &ns);

    for point in ["key", "issued", "published", "activated"] {
        let armed = format!("{point}@{ns}/crash");
        crashes(
            start_replica(identity, port, &[("PEC_CRASH_AFTER", &armed)]),
            &armed,
        )
        .await;
        assert_eq!(keys(1), 1, "one key object for generation 1 after {point}");
        let sk = api.get("crash").await.expect("get");
        println!(
            "after {point}: current {:?}, next {:?}",
            sk.status
                .as_ref()
                .and_then(|s| s.current.as_ref())
                .map(|g| &g.phase),
            sk.status
                .as_ref()
                .and_then(|s| s.next.as_ref())
                .map(|g| &g.phase)
        );
        if point == "published" {
            let published = secrets.get("crash-certificates").await.expect("published");
            assert!(published.data.expect("data").contains_key("g1.crt"));
        }
    }
    let sk = api.get("crash").await.expect("get");
    assert_eq!(
        current_generation(Some(&sk)),
        Some(1),
        "activation was recorded before the last crash"
    );

    // An emergency rotation interrupted right after the new key is made.
    let armed = format!("key@{ns}/crash");
    let replica = start_replica(identity, port, &[("PEC_CRASH_AFTER", &armed)]);
    api.patch(
        "crash",
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"spec": {"revoke": {"reason": "KeyCompromise", "generation": 1}}}),
        ),
    )
    .await
    .expect("declare a compromise");
    // The key of generation 2 is made, then the replica dies.
    crashes(replica, &armed).await;
    eventually("the generation 2 key", || async {
        (keys(2) == 1).then_some(())
    })
    .await;

    // A plain restart converges.
    // Left running as a replica for the rest of the run; e2e/test.sh stops it.
    #[allow(clippy::zombie_processes)]
    let _survivor = start_replica(identity, port, &[]);
    let sk = crate::harness::wait_for(
        &api,
        "crash",
        "generation 2 active",
        |s: Option<&SigningKey>| {
            current_generation(s) == Some(2)
                && s.and_then(|s| s.status.as_ref()).is_some_and(|st| {
                    st.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
        },
    )
    .await;
    assert_eq!(
        (keys(1), keys(2), keys(3)),
        (1, 1, 0),
        "never a second key object, never a generation too many"
    );
    assert_eq!(
        sk.status.expect("status").revoked.len(),
        1,
        "the compromise was recorded once"
    );
}
