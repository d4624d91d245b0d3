//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas can
//! run and only the leader reconciles.
//!
//! The algorithm is client-go's: the leader renews the Lease every retry
//! period; a candidate takes the Lease over once it has seen the same Lease
//! record unchanged for a whole lease duration (measured on its own monotonic
//! clock, so clock skew between machines does not matter). Writes use the
//! Lease's `resourceVersion`, so two candidates cannot both win. The leader
//! releases the Lease on shutdown, so a successor takes over at once.
//!
//! Leadership is bounded in time: the leader counts its tenure from the
//! moment it *sent* its last successful renewal, and every renewal attempt
//! is cut off at that moment plus the renew deadline ([`Elector::hold`]
//! returns then, and the process stops reconciling). A candidate takes over
//! only after seeing the record unchanged for the lease duration, measured
//! from when it saw the last write, which is after the leader sent it. With
//! the renew deadline shorter than the lease duration (10 s and 15 s), a
//! leader whose requests stall, or which is cut off from the API server,
//! has stopped before anyone else can lead.
//!
//! The renewals run on a thread of their own, with a runtime and an API
//! client of their own ([`Elector::lead`]), apart from the leader's work.
//! The controllers poll their reconciles inside their own streams, so when
//! thousands of reconciles are ready at once (after the initial lists of a
//! provider's platform) one poll of them can take seconds; and decoding
//! those lists keeps the runtime's other worker threads busy as long. A
//! renewal that waited for a worker, or for the client's connection task on
//! that runtime, would wait that long.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tokio::{sync::oneshot, time::Instant};

use crate::{clock::Clock, time::to_k8s_micro};

/// Timing of the election.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How long a Lease record stays valid without renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up leadership.
    pub renew_deadline: Duration,
    /// Pause between attempts.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// How a leader's tenure ended ([`Elector::lead`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Tenure {
    /// The work returned (a shutdown): the Lease is still ours to release.
    WorkDone,
    /// Leadership was lost: another holder, or no renewal within the
    /// deadline. The work has been stopped.
    Lost,
}

/// What a candidate should do with the Lease it read.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// No Lease exists: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// It is free or expired: take it over.
    TakeOver,
    /// Someone else holds a live Lease: wait.
    Wait,
}

/// Decides the step for `identity`, given the holder of the Lease (if any
/// Lease exists) and how long its record has been seen unchanged.
pub fn decide(
    identity: &str,
    holder: Option<Option<&str>>,
    unchanged_for: Duration,
    lease_duration: Duration,
) -> Step {
    match holder {
        None => Step::Create,
        Some(Some(h)) if h == identity => Step::Renew,
        Some(None) | Some(Some("")) => Step::TakeOver,
        Some(Some(_)) if unchanged_for >= lease_duration => Step::TakeOver,
        Some(Some(_)) => Step::Wait,
    }
}

/// A candidate for the leadership of one Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    observed: Option<(String, Instant)>,
    /// When the last successful write of the Lease by us was sent.
    renewed_at: Option<Instant>,
}

/// How long a leader that last renewed (sent its successful write) at
/// `renewed_at` may still try to renew at `now`; `None` once its renew
/// deadline has passed and it must stop.
pub fn renewal_budget(
    renewed_at: Instant,
    now: Instant,
    renew_deadline: Duration,
) -> Option<Duration> {
    (renewed_at + renew_deadline)
        .checked_duration_since(now)
        .filter(|left| !left.is_zero())
}

impl Elector {
    /// A candidate named `identity` for the Lease `name` that `api` reaches.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: Timing) -> Self {
        Self {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            observed: None,
            renewed_at: None,
        }
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One attempt to acquire or renew. `Ok(true)` while we hold the Lease.
    pub async fn try_acquire_or_renew(&mut self, clock: &dyn Clock) -> Result<bool, kube::Error> {
        let sent = Instant::now();
        let now = clock.now();
        let current = self.api.get_opt(&self.name).await?;
        let holder = current
            .as_ref()
            .map(|l| l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()));
        let unchanged_for = self.observe(current.as_ref());
        let step = decide(
            &self.identity,
            holder,
            unchanged_for,
            self.timing.lease_duration,
        );
        let duration_secs = self.timing.lease_duration.as_secs() as i32;
        let result = match (step, current) {
            (Step::Wait, _) => return Ok(false),
            (Step::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(duration_secs),
                        acquire_time: Some(to_k8s_micro(now)),
                        renew_time: Some(to_k8s_micro(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (step, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if step == Step::TakeOver {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(to_k8s_micro(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(duration_secs);
                spec.renew_time = Some(to_k8s_micro(now));
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
            (_, None) => return Ok(false),
        };
        match result {
            Ok(lease) => {
                self.observe(Some(&lease));
                self.renewed_at = Some(sent);
                Ok(true)
            }
            // Another candidate wrote first: not an error, just not us.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Keeps renewing; returns when leadership is lost: another holder
    /// took over, or no renewal succeeded within the renew deadline of the
    /// last one (an attempt still under way then is abandoned, so a stalled
    /// connection cannot stretch the tenure).
    pub async fn hold(&mut self, clock: &dyn Clock) {
        loop {
            tokio::time::sleep(self.timing.retry_period).await;
            let Some(left) = self
                .renewed_at
                .and_then(|at| renewal_budget(at, Instant::now(), self.timing.renew_deadline))
            else {
                tracing::error!(lease = %self.name, "could not renew the leader lease within the deadline");
                return;
            };
            match tokio::time::timeout(left, self.try_acquire_or_renew(clock)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    tracing::error!(lease = %self.name, "another replica took the leader lease");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.name, error = %e, "renewing the leader lease failed")
                }
                Err(_) => {
                    tracing::error!(lease = %self.name, "a renewal of the leader lease was still under way at the renew deadline");
                    return;
                }
            }
        }
    }

    /// Runs `work` in a task of the current runtime while the Lease is
    /// renewed on a thread of its own, with a runtime of its own and an API
    /// client made there from `config`: nothing the work does, not even
    /// holding every worker thread of this runtime, delays a renewal. Ends
    /// when either does; when the work ends first, the Lease is released.
    /// A panic in `work` goes on in the caller (and the Lease is released).
    pub async fn lead<W>(self, config: kube::Config, clock: Arc<dyn Clock>, work: W) -> Tenure
    where
        W: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let (lost_tx, lost) = oneshot::channel::<()>();
        let holder = match std::thread::Builder::new()
            .name("leader-lease".into())
            .spawn(move || self.hold_on_this_thread(config, clock, stopped, lost_tx))
        {
            Ok(holder) => holder,
            Err(e) => {
                tracing::error!(error = %e, "could not start the thread that renews the leader lease");
                return Tenure::Lost;
            }
        };
        let mut work = tokio::spawn(work);
        let tenure = tokio::select! {
            done = &mut work => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    // Dropping `stop` releases the Lease.
                    std::panic::resume_unwind(e.into_panic());
                }
                Tenure::WorkDone
            }
            _ = lost => {
                work.abort();
                Tenure::Lost
            }
        };
        let _ = stop.send(());
        // The holder releases the Lease (bounded by the renew deadline).
        let _ = tokio::task::spawn_blocking(move || holder.join()).await;
        tenure
    }

    /// What [`Elector::lead`]'s thread runs: renews until leadership is lost
    /// (then says so on `lost`) or `stopped` fires or is dropped (then
    /// releases the Lease).
    fn hold_on_this_thread(
        mut self,
        config: kube::Config,
        clock: Arc<dyn Clock>,
        stopped: oneshot::Receiver<()>,
        lost: oneshot::Sender<()>,
    ) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, "could not start the runtime that renews the leader lease");
                let _ = lost.send(());
                return;
            }
        };
        runtime.block_on(async move {
            // Made here, so that its connection tasks run on this thread.
            let namespace = self.api.namespace().unwrap_or_default().to_owned();
            match kube::Client::try_from(config) {
                Ok(client) => self.api = Api::namespaced(client, &namespace),
                Err(e) => {
                    tracing::error!(error = %e, "no API client to renew the leader lease with");
                    let _ = lost.send(());
                    return;
                }
            }
            tokio::select! {
                () = self.hold(clock.as_ref()) => {
                    let _ = lost.send(());
                }
                _ = stopped => self.release().await,
            }
        });
    }

    /// Gives the Lease up so a successor need not wait for it to expire.
    /// Bounded by the renew deadline: a shutdown never hangs on it.
    pub async fn release(&mut self) {
        let name = self.name.clone();
        if tokio::time::timeout(self.timing.renew_deadline, self.release_now())
            .await
            .is_err()
        {
            tracing::warn!(lease = %name, "releasing the leader lease timed out; it expires by itself");
        }
    }

    async fn release_now(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "released the leader lease"),
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "releasing the leader lease failed")
            }
        }
    }

    /// Records the Lease's version; returns how long it has stood unchanged.
    fn observe(&mut self, lease: Option<&Lease>) -> Duration {
        let version = lease
            .and_then(|l| l.metadata.resource_version.clone())
            .unwrap_or_default();
        match &self.observed {
            Some((seen, since)) if *seen == version => since.elapsed(),
            _ => {
                self.observed = Some((version, Instant::now()));
                Duration::ZERO
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(15);

    #[test]
    fn a_leader_may_renew_only_until_its_deadline() {
        let at = Instant::now();
        let deadline = Duration::from_secs(10);
        assert_eq!(
            renewal_budget(at, at + Duration::from_secs(4), deadline),
            Some(Duration::from_secs(6))
        );
        assert_eq!(renewal_budget(at, at + deadline, deadline), None);
        assert_eq!(
            renewal_budget(at, at + Duration::from_secs(11), deadline),
            None
        );
    }

    /// A leader whose API server accepts connections and never answers (a
    /// stalled connection) gives up leadership at its renew deadline, not
    /// when the request would time out.
    #[tokio::test]
    async fn a_stalled_renewal_ends_the_leadership_at_the_renew_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        // Accept and hold every connection, never answering.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let url: hyper::Uri = format!("http://{address}").parse().expect("url");
        let mut config = kube::Config::new(url);
        config.read_timeout = Some(Duration::from_secs(300));
        let client = kube::Client::try_from(config).expect("client");
        let timing = Timing {
            lease_duration: Duration::from_secs(6),
            renew_deadline: Duration::from_millis(1500),
            retry_period: Duration::from_millis(200),
        };
        let mut elector = Elector::new(Api::namespaced(client, "ns"), "lease", "me", timing);
        let renewed = Instant::now();
        elector.renewed_at = Some(renewed);
        let clock = crate::clock::SystemClock;
        tokio::time::timeout(Duration::from_secs(30), elector.hold(&clock))
            .await
            .expect("hold returned");
        let held = renewed.elapsed();
        assert!(
            held >= timing.renew_deadline && held < timing.lease_duration,
            "led for {held:?}: from the deadline {:?} and before the lease {:?} lets another in",
            timing.renew_deadline,
            timing.lease_duration
        );
    }

    /// An API server that answers every request with a Lease `holder`
    /// holds, and counts the requests it answered.
    async fn serve_lease(
        holder: &'static str,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = answered.clone();
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufReader::new(stream);
                    loop {
                        let mut length = 0;
                        loop {
                            let mut line = String::new();
                            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if let Some((name, value)) = line.split_once(':')
                                && name.eq_ignore_ascii_case("content-length")
                            {
                                length = value.trim().parse().unwrap_or(0);
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; length];
                        if stream.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let lease = serde_json::json!({
                            "apiVersion": "coordination.k8s.io/v1",
                            "kind": "Lease",
                            "metadata": {"name": "lease", "namespace": "ns", "resourceVersion": "1"},
                            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 6},
                        })
                        .to_string();
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{lease}",
                            lease.len()
                        );
                        if stream.get_mut().write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        (address, answered)
    }

    /// [`serve_lease`] on a thread and runtime of its own, so that nothing
    /// the test's runtime does delays its answers; and the number of
    /// requests it has answered.
    fn serve_lease_apart(
        holder: &'static str,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                tx.send(serve_lease(holder).await).expect("address");
                std::future::pending::<()>().await;
            });
        });
        rx.recv().expect("address")
    }

    /// Work that holds every worker thread of its runtime for longer than
    /// the renew deadline, as the controllers do when thousands of
    /// reconciles are ready at once and the watches decode their initial
    /// lists, does not cost the leadership: the renewals, and their API
    /// client's connection tasks, run on a thread of their own. (With the
    /// renewals in a task of the same runtime, or with the client made on
    /// it, no renewal is answered while the work holds the only worker, and
    /// the leadership is lost at the first deadline.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn work_that_holds_every_worker_thread_does_not_hold_back_the_renewals() {
        use std::sync::atomic::Ordering;
        let (address, answered) = serve_lease_apart("me");
        let url: hyper::Uri = format!("http://{address}").parse().expect("url");
        let config = kube::Config::new(url);
        let client = kube::Client::try_from(config.clone()).expect("client");
        let timing = Timing {
            lease_duration: Duration::from_secs(6),
            renew_deadline: Duration::from_millis(1500),
            retry_period: Duration::from_millis(200),
        };
        let mut elector = Elector::new(Api::namespaced(client, "ns"), "lease", "me", timing);
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        assert!(
            elector
                .try_acquire_or_renew(clock.as_ref())
                .await
                .expect("renewed"),
            "the fake API server's Lease is ours"
        );
        let before = answered.load(Ordering::Relaxed);
        let started = Instant::now();
        let work = async {
            for _ in 0..3 {
                std::thread::sleep(Duration::from_secs(2));
                tokio::task::yield_now().await;
            }
        };
        assert_eq!(
            elector.lead(config, clock, work).await,
            Tenure::WorkDone,
            "the leadership outlived the work"
        );
        assert!(
            started.elapsed() >= Duration::from_secs(6),
            "the work ran to its end"
        );
        // A renewal is a get and an update, every 200 ms, over 6 s.
        let during = answered.load(Ordering::Relaxed) - before;
        assert!(
            during >= 20,
            "renewals went on while the work held the worker: {during} requests"
        );
    }

    #[test]
    fn creates_a_missing_lease() {
        assert_eq!(decide("a", None, Duration::ZERO, LEASE), Step::Create);
    }

    #[test]
    fn renews_its_own_lease() {
        assert_eq!(
            decide("a", Some(Some("a")), Duration::from_secs(60), LEASE),
            Step::Renew
        );
    }

    #[test]
    fn waits_while_another_holder_renews() {
        assert_eq!(
            decide("a", Some(Some("b")), Duration::from_secs(14), LEASE),
            Step::Wait
        );
    }

    #[test]
    fn takes_over_an_expired_or_released_lease() {
        assert_eq!(decide("a", Some(Some("b")), LEASE, LEASE), Step::TakeOver);
        assert_eq!(
            decide("a", Some(None), Duration::ZERO, LEASE),
            Step::TakeOver
        );
        assert_eq!(
            decide("a", Some(Some("")), Duration::ZERO, LEASE),
            Step::TakeOver
        );
    }
}
