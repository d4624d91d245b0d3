//! The reconcilers, one folder per kind, and what they share.
//!
//! Each reconcile runs the same pipeline: read (the watch caches, and the
//! client for the few objects not cached) -> observe and plan (pure) ->
//! build (pure) -> apply what changed (client) -> status (pure, then one
//! write when it changed, see `status_write`). Only `mod.rs` and the
//! fetch/apply code of each controller await.

pub mod backoff;
pub mod events;
pub mod finalizer;
pub mod handover;
pub mod mail_domain;
pub mod names;
pub mod signing_key;
pub mod site;
pub mod sla_target;
pub mod status_write;
pub mod watch_cache;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use futures::future;
use kube::{
    Client, Resource,
    runtime::controller::Action,
    runtime::events::{Event, EventType, Reporter},
};

use crate::{clock::Clock, failover::health::ProbeState, metrics::Metrics};

pub use names::MANAGED_BY;

/// What every reconcile gets: the client, the one clock, metrics and events.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The one clock; reconciles read `now` once from it.
    pub clock: Arc<dyn Clock>,
    /// The operator's metrics.
    pub metrics: Metrics,
    /// Publishes Kubernetes Events.
    pub events: Arc<events::Events>,
    /// Health-check memory of each Site, between checks.
    site_probes: Mutex<HashMap<String, ProbeState>>,
    /// Whether external-dns DNSEndpoints can be written.
    pub dns: mail_domain::dns::DnsSupport,
    /// The SLA controller's ledgers and latest evaluations.
    pub sla: Arc<sla_target::SlaState>,
    /// The PKCS#11 module, when the operator was given one (`--pkcs11-module`).
    pub hsm: Option<Arc<crate::hsm::Hsm>>,
    /// What every gateway pod gets (image, PKCS#11 module, token store).
    pub gateway: mail_domain::gateway::GatewayDefaults,
    /// The platform routes of each namespace, as last written.
    pub routes: mail_domain::routes::PlatformRoutes,
    /// The MailDomain statuses written that the watch cache may not hold yet.
    pub domain_statuses: status_write::Written<crate::api::MailDomainStatus>,
    /// Failures in a row of each failing object, for the retry delays.
    pub backoff: backoff::Backoff,
    /// Watch caches one controller fills and others read.
    pub stores: SharedStores,
    /// The longest a MailDomain or SigningKey waits between reconciles
    /// when nothing triggers one (the safety net under the watches).
    pub resync: std::time::Duration,
    /// How many reconciles each controller runs at once.
    pub concurrency: u16,
    /// How long the MailDomain controller waits for a domain to stop
    /// changing before it reconciles it. The other controllers do not wait:
    /// a Site is triggered by every node's change, and a trailing debounce
    /// would hold it back for as long as some node keeps changing.
    pub debounce: std::time::Duration,
}

/// The longest a MailDomain or Site reconcile may take: one stuck request
/// (the client's own read timeout is minutes, for watches) must not hold
/// that object's reconciles, and so its failover, behind it. It is
/// abandoned, counted as an error and retried.
pub const RECONCILE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The default [`Context::concurrency`]: enough to keep a failover of many
/// domains moving, few enough that a new leader's first pass over every
/// object does not flood the API server and starve its own Lease renewals
/// (1,000 domains reconciled all at once did, on a small control plane).
pub const DEFAULT_CONCURRENCY: u16 = 16;

/// The default [`Context::debounce`]: none. kube's debounce is trailing
/// with no upper bound, so a domain changed more often than the debounce
/// (a test touching it every 250 ms did) is never reconciled; and the
/// rollout benchmark gained little from 500 ms (25.3 instead of 30.7
/// requests per domain, the same convergence within noise).
pub const DEFAULT_DEBOUNCE: std::time::Duration = std::time::Duration::ZERO;

/// The default [`Context::resync`].
pub const DEFAULT_RESYNC: std::time::Duration = std::time::Duration::from_secs(300);

/// Watch caches the MailDomain controller fills and the SlaTarget
/// controller reads; unset until the MailDomain controller starts.
#[derive(Default)]
pub struct SharedStores {
    /// Every MailDomain.
    pub mail_domains: std::sync::OnceLock<watch_cache::Cache<crate::api::MailDomain>>,
    /// Every domain's children, the EndpointSlices this operator made
    /// among them.
    pub children: std::sync::OnceLock<mail_domain::by_domain::ByDomain>,
}

impl Context {
    /// A context for `client`, reporting events as `pec-operator` from `instance`.
    pub fn new(client: Client, clock: Arc<dyn Clock>, metrics: Metrics, instance: &str) -> Self {
        let reporter = Reporter {
            controller: MANAGED_BY.into(),
            instance: Some(instance.into()),
        };
        Self {
            events: Arc::new(events::Events::new(client.clone(), reporter)),
            client,
            clock,
            metrics,
            site_probes: Mutex::default(),
            dns: mail_domain::dns::DnsSupport::default(),
            sla: Arc::default(),
            hsm: None,
            gateway: mail_domain::gateway::GatewayDefaults::default(),
            routes: mail_domain::routes::PlatformRoutes::default(),
            domain_statuses: status_write::Written::default(),
            backoff: backoff::Backoff::default(),
            stores: SharedStores::default(),
            resync: DEFAULT_RESYNC,
            concurrency: DEFAULT_CONCURRENCY,
            debounce: DEFAULT_DEBOUNCE,
        }
    }

    /// The same context with gateway defaults `gateway`.
    pub fn with_gateway_defaults(mut self, gateway: mail_domain::gateway::GatewayDefaults) -> Self {
        self.gateway = gateway;
        self
    }

    /// The same context running at most `concurrency` (at least 1)
    /// reconciles per controller at once.
    pub fn with_concurrency(mut self, concurrency: u16) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// The same context waiting `debounce` for a MailDomain to stop
    /// changing before reconciling it.
    pub fn with_debounce(mut self, debounce: std::time::Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// The controller settings every controller runs with.
    pub fn controller_config(&self) -> kube::runtime::controller::Config {
        kube::runtime::controller::Config::default().concurrency(self.concurrency)
    }

    /// The same context with the resync period `resync` (at least a second).
    pub fn with_resync(mut self, resync: std::time::Duration) -> Self {
        self.resync = resync.max(std::time::Duration::from_secs(1));
        self
    }

    /// The same context with the PKCS#11 module `hsm`.
    pub fn with_hsm(mut self, hsm: Option<Arc<crate::hsm::Hsm>>) -> Self {
        self.hsm = hsm;
        self
    }

    /// The health-check memory of `site`.
    pub fn site_probe(&self, site: &str) -> ProbeState {
        let probes = self.site_probes.lock().unwrap_or_else(|e| e.into_inner());
        probes.get(site).copied().unwrap_or_default()
    }

    /// Remembers the health-check state of `site`.
    pub fn set_site_probe(&self, site: &str, probe: ProbeState) {
        let mut probes = self.site_probes.lock().unwrap_or_else(|e| e.into_inner());
        probes.insert(site.to_string(), probe);
    }

    /// Counts a reconcile of `controller` and times it until the returned
    /// timer drops.
    pub fn start_reconcile(&self, controller: &str) -> prometheus::HistogramTimer {
        self.metrics
            .reconciles
            .with_label_values(&[controller])
            .inc();
        self.metrics
            .reconcile_duration
            .with_label_values(&[controller])
            .start_timer()
    }

    /// The error policy every controller shares: log, count by the error's
    /// bounded reason, and retry `obj` with exponential backoff from `first`
    /// (see [`backoff`]).
    pub fn retry_after_error<K: Resource>(
        &self,
        controller: &str,
        obj: &K,
        error: &dyn std::error::Error,
        reason: &str,
        first: std::time::Duration,
    ) -> Action {
        let delay = self.backoff.failed(controller, obj, first);
        tracing::warn!(error = %error, controller, reason, retry_in = ?delay, "reconcile failed");
        self.metrics
            .reconcile_errors
            .with_label_values(&[controller, reason])
            .inc();
        Action::requeue(delay)
    }

    /// Runs `reconcile` of `obj` for at most [`RECONCILE_TIMEOUT`] (then it
    /// is abandoned as `timed_out`), and forgets `obj`'s failures when it
    /// succeeds.
    pub async fn bounded<K: Resource, E>(
        &self,
        controller: &str,
        obj: &K,
        reconcile: impl std::future::Future<Output = Result<Action, E>>,
        timed_out: E,
    ) -> Result<Action, E> {
        let result = tokio::time::timeout(RECONCILE_TIMEOUT, reconcile)
            .await
            .unwrap_or(Err(timed_out));
        self.reset_backoff(controller, obj, result)
    }

    /// Forgets `obj`'s failures when `result` is a success; returns `result`.
    pub fn reset_backoff<K: Resource, E>(
        &self,
        controller: &str,
        obj: &K,
        result: Result<Action, E>,
    ) -> Result<Action, E> {
        if result.is_ok() {
            self.backoff.succeeded(controller, obj);
        }
        result
    }

    /// Publishes an Event about `obj`. Failing to publish is logged, never fatal:
    /// an Event is a story for people, not state.
    pub fn event<K>(&self, obj: &K, type_: EventType, reason: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        let (recorder, object, reason) = (
            self.events.recorder(tokio::time::Instant::now()),
            obj.object_ref(&()),
            reason.to_string(),
        );
        // In the background: a reconcile does not wait a round trip per
        // Event (a failed one is only logged, as before).
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &object).await {
                tracing::warn!(error = %e, %reason, "publishing an event failed");
            }
        });
    }
}

/// Runs every controller until they stop (on shutdown), and meanwhile
/// empties the Event recorder whenever it has been quiet (see [`events`]).
pub async fn run(ctx: Arc<Context>) {
    let forget = events::forget_while_idle(ctx.events.clone());
    let controllers = future::join4(
        site::run(ctx.clone()),
        mail_domain::run(ctx.clone()),
        sla_target::run(ctx.clone()),
        signing_key::run(ctx),
    );
    // The sweep never ends: it goes when the controllers stop, or when
    // this future is dropped (a lost Lease).
    tokio::select! {
        _ = controllers => {}
        () = forget => {}
    }
}
