//! A data center losing power under PEC traffic, on the real nodes: while a
//! client submits a PEC message every 200 ms through the domain Service's
//! ClusterIP, every process of dc-it1's two real nodes dies at once
//! (kubelet, containerd, the containers), and the platform must move the
//! traffic to dc-it2 by itself. Prints how many sessions failed, for how
//! long, and when every session succeeded again. Runs last in e2e/test.sh's
//! real-node lane: it leaves dc-it1 dead.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kube::Api;
use lettre::{
    Message,
    transport::smtp::{
        authentication::{Credentials, Mechanism},
        client::{AsyncSmtpConnection, TlsParameters},
        extension::ClientId,
    },
};
use pec_operator::api::MailDomain;

use crate::{harness::wait_for, real_nodes::real_domain};

/// One session of the traffic client.
#[derive(Debug, Clone)]
pub struct Session {
    pub started: Instant,
    /// How long it lasted, to the timeout at most.
    pub took: Duration,
    pub result: Result<(), String>,
}

/// A client that opens a session every 200 ms and submits a PEC message on
/// it, each on a task of its own, keeping when each started and how it ended.
pub struct Traffic {
    log: Arc<Mutex<Vec<Session>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    /// Starts sending to `ip:465` as `sla-probe` with `password`.
    pub fn start(ip: &str, password: &str) -> Traffic {
        let log: Arc<Mutex<Vec<Session>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (l, s, ip, password) = (
            log.clone(),
            stop.clone(),
            ip.to_string(),
            password.to_string(),
        );
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let mut sessions = Vec::new();
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                tick.tick().await;
                let (log, ip, password) = (l.clone(), ip.clone(), password.clone());
                sessions.push(tokio::spawn(async move {
                    let started = Instant::now();
                    let step = Mutex::new("connect");
                    let result = tokio::time::timeout(
                        Duration::from_secs(10),
                        submit(&ip, &password, &step),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        let step = *step.lock().unwrap_or_else(|e| e.into_inner());
                        Err(format!("timed out after 10 s in {step}"))
                    });
                    log.lock().unwrap_or_else(|e| e.into_inner()).push(Session {
                        started,
                        took: started.elapsed(),
                        result,
                    });
                }));
            }
            for s in sessions {
                let _ = s.await;
            }
        });
        Traffic { log, stop, task }
    }

    /// The sessions so far.
    pub fn sessions(&self) -> Vec<Session> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until 10 sessions in a row have succeeded.
    pub async fn steady(&self) {
        crate::harness::eventually("10 sessions in a row succeed", || async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let log = self.sessions();
            (log.len() >= 10 && log[log.len() - 10..].iter().all(|s| s.result.is_ok()))
                .then_some(())
        })
        .await;
    }

    /// Stops sending, waits for the sessions in flight, returns them all.
    pub async fn stop(self) -> Vec<Session> {
        let Traffic { log, stop, task } = self;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = task.await;
        log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One submission on `ip:465` as `sla-probe`, on a connection of its own,
/// naming in `step` the step under way (for a session that times out).
async fn submit(ip: &str, password: &str, step: &Mutex<&'static str>) -> Result<(), String> {
    let address = "sla-probe@real.pec.example.it";
    submit_in_steps(ip, address, address, password, step).await
}

/// One PEC message from `from` to `to`, submitted on `ip:465` with `from`'s
/// password, on a connection of its own (the server's certificate is not
/// checked: the test domains' are self-signed).
pub async fn submit_as(ip: &str, from: &str, to: &str, password: &str) -> Result<(), String> {
    submit_in_steps(ip, from, to, password, &Mutex::new("connect")).await
}

/// [`submit_as`], keeping in `step` which step is under way: "connect"
/// (TCP and the TLS handshake), "AUTH", "send" (envelope and DATA up to the
/// 250) or "QUIT".
async fn submit_in_steps(
    ip: &str,
    from: &str,
    to: &str,
    password: &str,
    step: &Mutex<&'static str>,
) -> Result<(), String> {
    let enter = |name: &'static str| *step.lock().unwrap_or_else(|e| e.into_inner()) = name;
    let address = from;
    let domain = from.rsplit_once('@').map_or(from, |(_, d)| d);
    let tls = TlsParameters::builder(domain.into())
        .dangerous_accept_invalid_certs(true)
        .build_rustls()
        .map_err(|e| e.to_string())?;
    let mut smtp = AsyncSmtpConnection::connect_tokio1(
        (ip, 465),
        Some(Duration::from_secs(5)),
        &ClientId::default(),
        Some(tls),
        None,
    )
    .await
    .map_err(|e| format!("connect: {e}"))?;
    enter("AUTH");
    smtp.auth(
        &[Mechanism::Plain],
        &Credentials::new(address.into(), password.into()),
    )
    .await
    .map_err(|e| format!("AUTH: {e}"))?;
    let message = Message::builder()
        .from(address.parse().map_err(|e| format!("{e}"))?)
        .to(to.parse().map_err(|e| format!("{e}"))?)
        .subject("traffic")
        .body("under traffic\r\n".to_string())
        .map_err(|e| e.to_string())?;
    enter("send");
    smtp.send(message.envelope(), &message.formatted())
        .await
        .map_err(|e| format!("send: {e}"))?;
    enter("QUIT");
    let _ = smtp.quit().await;
    Ok(())
}

/// Kills every process of a real node: those in its cgroup root (the
/// containers and their shims' children), its containerd and its kubelet.
fn power_off(node: &str) {
    let cluster =
        std::env::var("PEC_E2E_CLUSTER_DIR").expect("e2e/test.sh sets PEC_E2E_CLUSTER_DIR");
    let name = std::path::Path::new(&cluster)
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .expect("cluster name");
    let mut pids: Vec<String> = Vec::new();
    // The node's own processes, by the names cluster.sh recorded.
    let recorded = std::fs::read_to_string(format!("{cluster}/pids")).expect("pids");
    for line in recorded.lines() {
        if let Some((pid, component)) = line.split_once(' ')
            && (component == format!("kubelet-{node}") || component == format!("containerd-{node}"))
        {
            pids.push(pid.to_string());
        }
    }
    // Its containers, by cgroup (every hierarchy lists the same tasks).
    let root = ["pids/", ""]
        .iter()
        .map(|h| format!("/sys/fs/cgroup/{h}pec-{name}-{node}"))
        .find(|p| std::path::Path::new(p).is_dir())
        .expect("the node's cgroup root");
    let found = std::process::Command::new("find")
        .args([&root, "-name", "cgroup.procs"])
        .output()
        .expect("find");
    for file in String::from_utf8_lossy(&found.stdout).lines() {
        pids.extend(
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .map(str::to_string),
        );
    }
    // The shims, which outlive containerd.
    let shims = std::process::Command::new("pgrep")
        .args(["-f", &format!("containerd-shim.*nodes/{node}/")])
        .output()
        .expect("pgrep");
    pids.extend(
        String::from_utf8_lossy(&shims.stdout)
            .lines()
            .map(str::to_string),
    );
    assert!(pids.len() >= 2, "nothing to kill for {node}");
    // Some may be gone already (a container that exited): kill's status
    // says nothing useful, the test's wait on the failover does.
    let _ = std::process::Command::new("kill")
        .arg("-9")
        .args(&pids)
        .status()
        .expect("kill");
}

#[tokio::test]
async fn a_data_center_losing_power_under_traffic_fails_over_to_the_other() {
    crate::real_nodes::lane();
    let (client, ns, ip) = real_domain("real-dc-loss").await;
    let password = format!("probe-{}", std::process::id());
    let mds = Api::<MailDomain>::namespaced(client.clone(), &ns);
    wait_for(
        &mds,
        "real",
        "serving from both sites",
        |m: Option<&MailDomain>| {
            m.and_then(|m| m.status.as_ref())
                .is_some_and(|s| s.serving_sites.len() == 2)
        },
    )
    .await;

    let traffic = Traffic::start(&ip, &password);
    // Steady state first (kube-proxy has every endpoint), then 3 s in which
    // no session may fail.
    traffic.steady().await;
    let steady = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let failed_before: Vec<String> = traffic
        .sessions()
        .into_iter()
        .filter(|s| s.started >= steady)
        .filter_map(|s| s.result.err())
        .collect();
    assert!(
        failed_before.is_empty(),
        "sessions failed before the loss: {failed_before:?}"
    );

    let cut = Instant::now();
    for node in ["dc-it1-real-1", "dc-it1-real-2"] {
        power_off(node);
    }
    // The platform notices on its own and serves from dc-it2 only.
    wait_for(
        &mds,
        "real",
        "serving from dc-it2 only",
        |m: Option<&MailDomain>| {
            m.and_then(|m| m.status.as_ref())
                .is_some_and(|s| s.serving_sites == ["real-dc-it2"])
        },
    )
    .await;
    let switched = cut.elapsed();
    // Then a run of good sessions: 10 s of traffic with no failure.
    crate::harness::eventually("10 s of sessions without a failure", || async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = Instant::now();
        let recent: Vec<Session> = traffic
            .sessions()
            .into_iter()
            .filter(|s| {
                now.duration_since(s.started) <= Duration::from_secs(12)
                    && now.duration_since(s.started) >= Duration::from_secs(2)
            })
            .collect();
        (recent.len() >= 40 && recent.iter().all(|s| s.result.is_ok())).then_some(())
    })
    .await;
    let log = traffic.stop().await;
    let after: Vec<_> = log.iter().filter(|s| s.started >= cut).collect();
    let failures: Vec<_> = after.iter().filter(|s| s.result.is_err()).collect();
    let last_failure = failures
        .iter()
        .map(|s| s.started.duration_since(cut))
        .max()
        .unwrap_or_default();
    println!(
        "data-center loss under traffic: {} sessions after the cut, {} failed; last failed session started {:.1}s after the cut; endpoints switched after {:.1}s",
        after.len(),
        failures.len(),
        last_failure.as_secs_f64(),
        switched.as_secs_f64()
    );
    if let Some(Session { result: Err(e), .. }) = failures.first() {
        println!("first failure: {e}");
    }
    // Every session started after the switch succeeded.
    let late_failures = failures
        .iter()
        .filter(|s| s.started.duration_since(cut) > switched + Duration::from_secs(2))
        .count();
    assert_eq!(
        late_failures, 0,
        "sessions failed after the endpoints switched"
    );
}
