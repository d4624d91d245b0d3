//! The control plane across three failure domains (`e2e/cluster.sh up NAME
//! --three-sites`): etcd members in dc-it1, dc-it2 and a witness, one API
//! server per data center on its own member. Each test starts two operator
//! replicas of its own, dc-it1's through a TCP proxy the test can freeze
//! (talking to dc-it1's API server) and dc-it2's (to dc-it2's), makes
//! dc-it1's the leader, then stops, partitions or stalls parts of the
//! control plane and checks who leads, what serves, and from the API
//! servers' audit logs that no two replicas ever wrote at once.
//!
//! `e2e/test.sh` runs them alone (one at a time) on a cluster of their own;
//! the data-center loss, which leaves dc-it1 dead, runs last.

use std::{
    path::PathBuf,
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use pec_operator::{
    api::{FailoverMode, SitePhase, SlaTarget},
    clock::{Clock, SystemClock},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::Instant,
};

use crate::{
    datacenter::{free_port, try_endpoints_by_site},
    failover::{World, fast_health, world},
    harness::{eventually, scrape, wait_for},
    sla::measure,
};

/// The lease duration and renew deadline of the operator (src/leader.rs).
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// The cluster's directory: component pids, kubeconfigs, audit logs.
fn cluster_dir() -> PathBuf {
    PathBuf::from(std::env::var("PEC_E2E_CP_DIR").expect("e2e/test.sh sets PEC_E2E_CP_DIR"))
}

/// Sends `signal` to the control-plane component `name` (as in `pids`).
fn signal(component: &str, signal: &str) {
    let pids = std::fs::read_to_string(cluster_dir().join("pids")).expect("pids");
    let pid = pids
        .lines()
        .find_map(|l| l.split_once(' ').filter(|(_, c)| *c == component))
        .map(|(pid, _)| pid.to_string())
        .unwrap_or_else(|| panic!("no component {component}"));
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -{signal} {component}");
}

/// A TCP proxy on loopback whose forwarding a test can freeze: bytes stop
/// flowing both ways and connections stay open, as on a stalled link.
struct Proxy {
    port: u16,
    frozen: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = frozen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, flag.clone()), pump(sr, cw, flag));
                });
            }
        });
        Self { port, frozen, task }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` while not `frozen`; while frozen nothing moves.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let n = match tokio::time::timeout(Duration::from_millis(100), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        // Bytes read just as the link froze are held until it thaws.
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// An operator replica run by a test, stopped (SIGKILL) when dropped.
struct Replica {
    identity: String,
    port: String,
    child: Child,
    log: PathBuf,
}

impl Replica {
    /// Starts the operator as `identity` with `kubeconfig`.
    fn start(identity: &str, kubeconfig: &std::path::Path) -> Self {
        Self::start_with(identity, kubeconfig, &[])
    }

    /// Starts the operator as `identity` with `kubeconfig` and `env` added.
    fn start_with(identity: &str, kubeconfig: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("e2e/test.sh sets {k}"));
        let port = free_port().to_string();
        let log = PathBuf::from(var("PEC_E2E_LOGS")).join(format!("cp-{identity}-{port}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(var("PEC_E2E_OPERATOR"))
            .arg("run")
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", "pec-system")
            .env("POD_NAME", identity)
            .env("PEC_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env("PEC_LOG_FORMAT", "json")
            .env_remove("PEC_CRASH_AFTER")
            .envs(env.iter().copied())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("start the operator");
        Self {
            identity: identity.to_string(),
            port,
            child,
            log,
        }
    }

    async fn leads(&self) -> bool {
        TcpStream::connect(format!("127.0.0.1:{}", self.port))
            .await
            .is_ok()
            && scrape(&self.port)
                .await
                .lines()
                .any(|l| l == "pec_leader 1")
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_some()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The operator's ServiceAccount kubeconfig for `site`'s API server, with
/// the server replaced by `127.0.0.1:port` when given (a proxy).
fn kubeconfig(site: &str, via: Option<u16>) -> PathBuf {
    let logs = std::env::var("PEC_E2E_LOGS").expect("e2e/test.sh sets PEC_E2E_LOGS");
    let original = PathBuf::from(&logs).join(format!("operator-{site}.kubeconfig"));
    let Some(port) = via else {
        return original;
    };
    let text = std::fs::read_to_string(&original).expect("kubeconfig");
    let rewritten: String = text
        .lines()
        .map(|l| {
            let Some(start) = l.find("https://127.0.0.1:") else {
                return l.to_string();
            };
            let end = l[start..].find('"').map_or(l.len(), |e| start + e);
            format!("{}https://127.0.0.1:{port}{}", &l[..start], &l[end..])
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = PathBuf::from(&logs).join(format!("operator-{site}-via-{port}.kubeconfig"));
    std::fs::write(&path, rewritten).expect("write kubeconfig");
    path
}

/// The API server address of `site`, from its admin kubeconfig.
fn api_server(site: &str) -> String {
    let text = std::fs::read_to_string(cluster_dir().join(format!("kubeconfig-{site}")))
        .expect("kubeconfig");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .expect("server")
        .to_string()
}

/// Ready endpoints of the domain Service by site, read again while the API
/// server answers with an error: when the etcd member that led the raft
/// group is lost, requests time out until the others elect a new leader
/// (a client's retry; not what the tests measure).
async fn endpoints_by_site(
    client: &kube::Client,
    ns: &str,
    md: &str,
) -> std::collections::BTreeMap<String, usize> {
    eventually("an answer from the API server", || async {
        try_endpoints_by_site(client, ns, md).await.ok()
    })
    .await
}

/// Two replicas: dc-it1's (through a proxy, the leader) and dc-it2's.
struct Pair {
    proxy: Proxy,
    dc_it1: Replica,
    dc_it2: Replica,
}

async fn start_pair(test: &str) -> Pair {
    let proxy = Proxy::start(api_server("dc-it1")).await;
    let dc_it1 = Replica::start(
        &format!("{test}-dc-it1"),
        &kubeconfig("dc-it1", Some(proxy.port)),
    );
    eventually("dc-it1's replica to lead", || async {
        dc_it1.leads().await.then_some(())
    })
    .await;
    let dc_it2 = Replica::start(&format!("{test}-dc-it2"), &kubeconfig("dc-it2", None));
    eventually("dc-it2's replica to answer", || async {
        TcpStream::connect(format!("127.0.0.1:{}", dc_it2.port))
            .await
            .is_ok()
            .then_some(())
    })
    .await;
    Pair {
        proxy,
        dc_it1,
        dc_it2,
    }
}

/// A replica pair (dc-it1's leading) and a world of this test's own: two
/// Sites with fast health checks and an active-active domain served from
/// both.
async fn converged(test: &str) -> (Pair, World) {
    let pair = start_pair(test).await;
    let world = world(
        &format!("cp-{test}"),
        &format!("cp{test}"),
        fast_health(),
        FailoverMode::ActiveActive,
        1,
    )
    .await;
    eventually("the domain served from both sites", || async {
        (endpoints_by_site(&world.client, &world.ns, &world.md)
            .await
            .len()
            == 2)
            .then_some(())
    })
    .await;
    (pair, world)
}

/// Waits until `replica` has exited and returns how long after `since`
/// that was seen, with its log.
async fn exit_of(replica: &mut Replica, since: Instant) -> Duration {
    let deadline = since + crate::datacenter::WAIT;
    loop {
        if replica.exited() {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{} never stopped",
            replica.identity
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn holder(client: &kube::Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), "pec-system")
        .get_opt("pec-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// One write the operator's ServiceAccount made through an API server (from
/// its audit log): when it was received and completed, and on what.
#[derive(Debug, Clone)]
struct Write {
    received: DateTime<Utc>,
    completed: DateTime<Utc>,
    what: String,
}

/// The successful writes of the operator's ServiceAccount through `site`'s
/// API server (Lease writes are not audited: candidates write them by design).
fn operator_writes(site: &str) -> Vec<Write> {
    let path = cluster_dir()
        .join("logs")
        .join(format!("kube-apiserver-{site}-audit.log"));
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| {
            e["user"]["username"] == "system:serviceaccount:pec-system:pec-operator"
                && e["stage"] == "ResponseComplete"
                && e["responseStatus"]["code"]
                    .as_i64()
                    .is_some_and(|c| c < 300)
        })
        .filter_map(|e| {
            let at = |k: &str| e[k].as_str()?.parse::<DateTime<Utc>>().ok();
            Some(Write {
                received: at("requestReceivedTimestamp")?,
                completed: at("stageTimestamp")?,
                what: format!(
                    "{} {}/{}",
                    e["verb"].as_str().unwrap_or(""),
                    e["objectRef"]["resource"].as_str().unwrap_or(""),
                    e["objectRef"]["name"].as_str().unwrap_or("")
                ),
            })
        })
        .collect()
}

/// After a handover at `since`: makes the new leader write (a changed pod
/// annotation on `md` rolls its gateways), waits for that write in dc-it2's
/// audit log, then checks that no write through dc-it1's API server
/// completed after the first write through dc-it2's began: the two replicas
/// never wrote at once. Returns the gap between them.
async fn no_overlapping_writes(
    client: &kube::Client,
    ns: &str,
    md: &str,
    since: DateTime<Utc>,
) -> chrono::Duration {
    Api::<pec_operator::api::MailDomain>::namespaced(client.clone(), ns)
        .patch(
            md,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"spec": {"gateway": {"podAnnotations": {"pec.dev/e2e-handover": "1"}}}}),
            ),
        )
        .await
        .expect("change the domain");
    let new = eventually(
        "a write by the new leader in dc-it2's audit log",
        || async {
            let new: Vec<Write> = operator_writes("dc-it2")
                .into_iter()
                .filter(|w| w.received >= since)
                .collect();
            (!new.is_empty()).then_some(new)
        },
    )
    .await;
    let old = operator_writes("dc-it1");
    let last_old = old
        .iter()
        .max_by_key(|w| w.completed)
        .expect("the old leader wrote");
    let first_new = new
        .iter()
        .min_by_key(|w| w.received)
        .expect("the new leader wrote");
    assert!(
        last_old.completed < first_new.received,
        "both replicas wrote at once: {} through dc-it1 completed at {}, {} through dc-it2 received at {}",
        last_old.what,
        last_old.completed,
        first_new.what,
        first_new.received
    );
    first_new.received - last_old.completed
}

/// dc-it1 is cut off but alive: its etcd member and API server stop
/// answering (SIGSTOP). The leader there cannot renew, stops within the
/// renew deadline, before the Lease expires; dc-it2's replica leads and the
/// domain keeps serving; the audit logs show no write by both. When the
/// partition heals, a dc-it1 replica rejoins as a follower.
#[tokio::test]
async fn a_partitioned_leader_stops_before_the_other_leads_and_rejoins_as_a_follower() {
    let (mut pair, World { client, ns, md, .. }) = converged("partition").await;

    let cut = Instant::now();
    let cut_at = SystemClock.now();
    signal("etcd-dc-it1", "STOP");
    signal("kube-apiserver-dc-it1", "STOP");
    let stopped = exit_of(&mut pair.dc_it1, cut).await;
    let led = eventually("dc-it2's replica to lead", || async {
        pair.dc_it2.leads().await.then(|| cut.elapsed())
    })
    .await;
    println!("partition: isolated leader stopped after {stopped:?}, dc-it2 led after {led:?}");
    assert!(
        stopped < LEASE_DURATION,
        "the isolated leader ran {stopped:?} after the cut, past the {LEASE_DURATION:?} lease"
    );
    assert!(
        pair.dc_it1.log().contains("renew"),
        "the isolated leader says it could not renew"
    );
    assert_eq!(
        endpoints_by_site(&client, &ns, &md).await.len(),
        2,
        "still served"
    );

    signal("etcd-dc-it1", "CONT");
    signal("kube-apiserver-dc-it1", "CONT");
    let rejoined = Replica::start("partition-dc-it1-again", &kubeconfig("dc-it1", None));
    eventually("the healed replica to answer", || async {
        TcpStream::connect(format!("127.0.0.1:{}", rejoined.port))
            .await
            .is_ok()
            .then_some(())
    })
    .await;
    // Several renewals of the leader: the healed replica stays a follower.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!rejoined.leads().await, "the healed replica took over");
    assert!(pair.dc_it2.leads().await, "dc-it2's replica still leads");
    assert_eq!(
        holder(&client).await.as_deref(),
        Some(pair.dc_it2.identity.as_str())
    );
    let gap = no_overlapping_writes(&client, &ns, &md, cut_at).await;
    println!("partition: last write through dc-it1 -> first through dc-it2: {gap}");
}

/// The leader's connection to its API server freezes (a proxy stops
/// forwarding, the connection stays open). It stops before its Lease
/// expires and the follower takes over; no write by both.
#[tokio::test]
async fn a_stalled_connection_stops_the_leader_before_its_lease_expires() {
    let (mut pair, World { client, ns, md, .. }) = converged("stall").await;

    let stalled = Instant::now();
    let stalled_at = SystemClock.now();
    pair.proxy.freeze();
    let stopped = exit_of(&mut pair.dc_it1, stalled).await;
    let led = eventually("the follower to lead", || async {
        pair.dc_it2.leads().await.then(|| stalled.elapsed())
    })
    .await;
    println!("stall: leader stopped after {stopped:?}, follower led after {led:?}");
    assert!(
        stopped <= RENEW_DEADLINE + Duration::from_secs(3),
        "the stalled leader ran {stopped:?}: past its renew deadline {RENEW_DEADLINE:?}"
    );
    assert!(
        stopped < led,
        "the follower led while the stalled leader still ran"
    );
    let gap = no_overlapping_writes(&client, &ns, &md, stalled_at).await;
    println!("stall: last write through dc-it1 -> first through dc-it2: {gap}");
}

/// The reconciles of a converged platform's resync make no write: the
/// replica runs with a 5 s resync, and over three periods the audit logs of
/// both API servers show no write by the operator (Lease renewals and
/// Events are not audited), while its reconcile counter shows the resyncs
/// ran.
#[tokio::test]
async fn a_converged_platform_makes_no_write_in_a_full_resync() {
    let replica = Replica::start_with(
        "resync-dc-it2",
        &kubeconfig("dc-it2", None),
        &[("PEC_RESYNC_SECONDS", "5")],
    );
    eventually("the replica to lead", || async {
        replica.leads().await.then_some(())
    })
    .await;
    let World { client, ns, md, .. } = world(
        "cp-resync",
        "cpresync",
        fast_health(),
        FailoverMode::ActiveActive,
        1,
    )
    .await;
    let mds = Api::<pec_operator::api::MailDomain>::namespaced(client.clone(), &ns);
    wait_for(
        &mds,
        &md,
        "Ready",
        crate::harness::has_condition("Ready", "True", None),
    )
    .await;
    // The last writes of the rollout (status as the gateways turn ready).
    let settled = eventually("no write for 3 s", || async {
        let last = ["dc-it1", "dc-it2"]
            .iter()
            .flat_map(|site| operator_writes(site))
            .map(|w| w.completed)
            .max();
        let now = SystemClock.now();
        last.is_none_or(|at| now - at > chrono::Duration::seconds(3))
            .then_some(now)
    })
    .await;
    let reconciles = || async {
        scrape(&replica.port)
            .await
            .lines()
            .find_map(|l| l.strip_prefix("pec_reconciles_total{controller=\"maildomain\"} "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = reconciles().await;
    tokio::time::sleep(Duration::from_secs(16)).await;
    let ran = reconciles().await - before;
    let writes: Vec<Write> = ["dc-it1", "dc-it2"]
        .iter()
        .flat_map(|site| operator_writes(site))
        .filter(|w| w.received >= settled)
        .collect();
    println!(
        "resync: {ran} MailDomain reconciles in 16 s, {} writes",
        writes.len()
    );
    assert!(ran >= 3.0, "the resyncs did not run: {ran} reconciles");
    assert!(
        writes.is_empty(),
        "a converged platform wrote during its resyncs: {:?}",
        writes.iter().map(|w| &w.what).collect::<Vec<_>>()
    );
}

/// The witness's etcd member stops: two of three members keep the quorum;
/// the leader, the serving sites and the domain's readiness do not change.
#[tokio::test]
async fn losing_the_witness_changes_nothing_for_the_domains() {
    let (pair, World { client, ns, md, .. }) = converged("witness").await;
    let before = eventually("the domain served from both sites", || async {
        let e = endpoints_by_site(&client, &ns, &md).await;
        (e.len() == 2).then_some(e)
    })
    .await;
    let leader = holder(&client).await;

    signal("etcd-witness", "STOP");
    // Longer than a lease and a site's health threshold.
    let until = Instant::now() + LEASE_DURATION + Duration::from_secs(5);
    while Instant::now() < until {
        assert_eq!(endpoints_by_site(&client, &ns, &md).await, before);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(pair.dc_it1.leads().await, "the leader changed");
    assert_eq!(holder(&client).await, leader);
    signal("etcd-witness", "CONT");
    let mds = Api::<pec_operator::api::MailDomain>::namespaced(client.clone(), &ns);
    wait_for(
        &mds,
        &md,
        "Ready",
        crate::harness::has_condition("Ready", "True", None),
    )
    .await;
}

/// dc-it1 loses power, control plane included: its etcd member, API
/// server and the leading replica die at once and its nodes fail. dc-it2's
/// replica takes the Lease, declares the site Down and moves the domain's
/// traffic within lease duration + retry period + health period x
/// threshold + 1 s (+ a margin); the SLA ledger counts the handover as
/// unobserved. Leaves dc-it1 dead: run last.
#[tokio::test]
async fn losing_dc_it1_with_its_control_plane_and_leader_fails_over() {
    let (
        mut pair,
        World {
            client,
            ns,
            sites,
            md,
        },
    ) = converged("dcloss").await;
    let sla = measure(&client, &ns, &md, json!({})).await;
    let [a, b] = sites.names.clone();
    // The leader has measured and persisted it: the handover's gap is then
    // time the ledger knows it did not see (a ledger the old leader never
    // wrote starts afresh with the new one, with nothing unobserved).
    let slas = Api::<SlaTarget>::namespaced(client.clone(), &ns);
    wait_for(
        &slas,
        &sla,
        "a measurement persisted by the leader",
        |s: Option<&SlaTarget>| {
            s.and_then(|s| s.status.as_ref())
                .and_then(|st| st.objects.first())
                .is_some_and(|o| o.period.measured_seconds > 0.0)
        },
    )
    .await;

    // The nodes' failure is written first, through dc-it2's API server,
    // while etcd still has its raft leader; then the rest of dc-it1 dies.
    let lost = Instant::now();
    sites.fail(&a).await;
    signal("etcd-dc-it1", "KILL");
    signal("kube-apiserver-dc-it1", "KILL");
    pair.dc_it1.child.kill().expect("kill the leader");
    let switched = eventually("site a to leave the domain Service", || async {
        let e = endpoints_by_site(&client, &ns, &md).await;
        (!e.contains_key(&a) && e.contains_key(&b)).then(|| lost.elapsed())
    })
    .await;
    let health = fast_health();
    let bound = LEASE_DURATION
        + Duration::from_secs(2)
        + Duration::from_secs((health.period_seconds * health.failure_threshold + 1) as u64);
    println!(
        "data-center loss with its control plane: endpoints switched after {switched:?} (bound {bound:?})"
    );
    assert!(
        switched <= bound + Duration::from_secs(3),
        "switched after {switched:?}, bound {bound:?}"
    );
    assert!(pair.dc_it2.leads().await);
    sites.wait_phase(&a, SitePhase::Down).await;
    wait_for(
        &slas,
        &sla,
        "the handover counted as unobserved",
        |s: Option<&SlaTarget>| {
            s.and_then(|s| s.status.as_ref())
                .and_then(|st| st.objects.first())
                .is_some_and(|o| o.period.unobserved_seconds > 0.0)
        },
    )
    .await;
    let _ = client;
}
