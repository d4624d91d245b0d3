//! The SlaTarget controller: every `probe.intervalSeconds` it observes each
//! selected domain (or domain in a site), feeds the observation into that
//! object's outage ledger (`crate::sla`), and reports availability, budget,
//! the longest outage against the cap, and a state.
//!
//! Ledgers live in memory between ticks and in status across restarts and
//! leader changes; a ledger resumed from status counts the time since its
//! last persisted observation as unobserved, never guessed. Status is written
//! on a state change, otherwise at most every `statusIntervalSeconds`.
//! Reads MailDomains and EndpointSlices (and, for `PecRoundTrip`, the probe
//! password Secret, each domain's TLS Secret and its SigningKey's published
//! certificates); writes SlaTarget status and Events.

pub mod metrics;
pub mod probe;
pub mod round_trip;
pub mod status;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{Controller, controller::Action, events::EventType, watcher::Config},
};

use super::Context;
use crate::{
    api::{
        MailDomain, PecRoundTripProbe, ProbeKind, Profile, SlaObjectStatus, SlaTarget,
        SlaTargetStatus,
    },
    conditions,
    controllers::{
        mail_domain::cached::CachedSlice,
        names::{NO_HEALTHY_SITE, domain_service_name, index_name_of},
    },
    sla::{
        evaluate::{self, Targets},
        ledger::Ledger,
        period::Period,
    },
};

const CONTROLLER: &str = "slatarget";
const FIELD_MANAGER: &str = "pec-operator/slatarget";

/// Why an SlaTarget reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object has no namespace.
    #[error("SlaTarget {0} has no namespace")]
    NoNamespace(String),
    /// Listing MailDomains or EndpointSlices failed.
    #[error("listing {kind} failed: {source}")]
    List {
        kind: &'static str,
        #[source]
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("writing the status failed: {0}")]
    WriteStatus(#[source] kube::Error),
}

impl Error {
    /// A short, bounded reason for metrics and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NoNamespace(_) => "NoNamespace",
            Error::List { .. } => "ListFailed",
            Error::WriteStatus(_) => "StatusWriteFailed",
        }
    }
}

/// What the SLA controller keeps between ticks.
#[derive(Default)]
pub struct SlaState {
    ledgers: Mutex<HashMap<String, Ledger>>,
    written: Mutex<HashMap<String, (DateTime<Utc>, String)>>,
    /// The latest evaluation of every SlaTarget, by `namespace/name`, with its
    /// objective: what `/metrics` shows.
    pub latest: Mutex<BTreeMap<String, (f64, Vec<SlaObjectStatus>)>>,
}

impl SlaState {
    fn take_ledger(&self, key: &str) -> Option<Ledger> {
        self.ledgers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
    }

    fn put_ledger(&self, key: String, ledger: Ledger) {
        self.ledgers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, ledger);
    }

    /// Whether to write `status` now: on a change of what people act on, or
    /// when `interval` has passed since the last write.
    fn should_write(
        &self,
        key: &str,
        status: &SlaTargetStatus,
        now: DateTime<Utc>,
        interval: chrono::Duration,
    ) -> bool {
        let signature = signature(status);
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let due = match written.get(key) {
            Some((at, sig)) => *sig != signature || now - *at >= interval,
            None => true,
        };
        if due {
            written.insert(key.to_string(), (now, signature));
        }
        due
    }
}

/// What, when it changes, must reach status at once.
fn signature(status: &SlaTargetStatus) -> String {
    let objects: Vec<String> = status
        .objects
        .iter()
        .map(|o| {
            format!(
                "{}:{}:{}:{}:{}",
                o.name,
                o.state,
                o.ongoing_outage.is_some(),
                o.period.outages,
                o.history.len()
            )
        })
        .collect();
    let conditions: Vec<String> = status
        .conditions
        .iter()
        .map(|c| format!("{}={}", c.type_, c.status))
        .collect();
    format!("{}|{}", objects.join(","), conditions.join(","))
}

/// The MailDomains and this operator's EndpointSlices in `namespace`, from
/// the MailDomain controller's caches once they hold a full list; `None`
/// before.
async fn cached_inputs(
    ctx: &Context,
    namespace: &str,
) -> Option<(Vec<MailDomain>, Vec<CachedSlice>)> {
    let domains = ctx.stores.mail_domains.get()?;
    let children = ctx.stores.children.get()?;
    domains.ready().await.ok()?;
    children.ready().await.ok()?;
    Some((
        domains
            .state()
            .iter()
            .filter(|o| o.namespace().as_deref() == Some(namespace))
            .map(|d| d.as_ref().clone())
            .collect(),
        children.endpoint_slices_in(namespace),
    ))
}

/// Reconciles one SlaTarget: one observation of every object it measures.
#[tracing::instrument(skip_all, fields(slatarget = %sla.name_any(), namespace = sla.namespace().unwrap_or_default()))]
pub async fn reconcile(sla: Arc<SlaTarget>, ctx: Arc<Context>) -> Result<Action, Error> {
    let now = ctx.clock.now();
    let name = sla.name_any();
    let namespace = sla
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let _timer = ctx.start_reconcile(CONTROLLER);
    let interval =
        Duration::from_secs(sla.spec.probe.interval_seconds.max(1).unsigned_abs().into());
    let api = Api::<SlaTarget>::namespaced(ctx.client.clone(), &namespace);

    // validate
    let (targets, tz) = match Targets::parse(&sla.spec) {
        Ok(parsed) => parsed,
        Err(e) => {
            let previous = sla.status.clone().unwrap_or_default();
            let verdict =
                conditions::Verdict::new(status::READY, false, "InvalidSpec", e.to_string());
            let new = SlaTargetStatus {
                observed_generation: sla.metadata.generation,
                conditions: conditions::merge(
                    &previous.conditions,
                    &[verdict],
                    sla.metadata.generation,
                    now,
                ),
                ..previous.clone()
            };
            if new != previous {
                write_status(&api, &name, &new).await?;
                ctx.event(
                    sla.as_ref(),
                    EventType::Warning,
                    "InvalidSpec",
                    e.to_string(),
                );
            }
            return Ok(Action::await_change());
        }
    };

    // fetch, from the MailDomain controller's watch caches
    let Some((domains, slices)) = cached_inputs(&ctx, &namespace).await else {
        // The MailDomain controller has not filled them yet.
        tracing::debug!("the MailDomain caches are not filled yet; again in 1 s");
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let measured = status::select(&sla, &domains);
    let missing: Vec<String> = sla
        .spec
        .selector
        .names
        .iter()
        .filter(|n| !domains.iter().any(|d| d.name_any() == **n))
        .cloned()
        .collect();
    // Why some objects cannot be measured: the first one is Ready's reason.
    let mut problems: Vec<(&'static str, String)> = Vec::new();
    if !missing.is_empty() {
        problems.push((
            "MailDomainNotFound",
            format!(
                "MailDomain {} not found in this namespace; fix spec.selector.names",
                missing.join(", ")
            ),
        ));
    }

    // observe: every object at once (a round trip may take its whole timeout)
    let timeout = Duration::from_secs(sla.spec.probe.timeout_seconds.max(1).unsigned_abs().into());
    let kind = sla.spec.probe.kind;
    let observations = futures::future::join_all(measured.iter().map(|m| {
        let service = domain_service_name(&m.maildomain);
        let stranded = domains
            .iter()
            .find(|d| d.name_any() == m.maildomain)
            .and_then(|d| d.status.as_ref())
            .is_some_and(|s| conditions::is_true(&s.conditions, NO_HEALTHY_SITE));
        let slices = &slices;
        let namespace = &namespace;
        async move {
            match kind {
                ProbeKind::Endpoints => Some(probe::endpoints(
                    slices,
                    &service,
                    m.site.as_deref(),
                    stranded,
                )),
                ProbeKind::Tcp => {
                    Some(probe::tcp(&format!("{service}.{namespace}.svc:25"), timeout).await)
                }
                ProbeKind::Http => {
                    Some(probe::http(&format!("{service}.{namespace}.svc:443"), timeout).await)
                }
                ProbeKind::PecRoundTrip => None,
            }
        }
    }))
    .await;
    let observations = match (sla.spec.probe.kind, &sla.spec.probe.pec_round_trip) {
        (ProbeKind::PecRoundTrip, Some(spec)) => {
            round_trips(
                &ctx,
                &sla,
                &namespace,
                spec,
                &domains,
                &measured,
                timeout,
                &mut problems,
            )
            .await
        }
        _ => observations,
    };
    // The observations are of now, after the probes, not of the tick's start.
    let now = ctx.clock.now();

    // evaluate
    let previous = sla.status.clone().unwrap_or_default();
    let max_gap =
        chrono::Duration::from_std(interval * 3).unwrap_or_else(|_| chrono::Duration::seconds(30));
    let mut objects = Vec::with_capacity(measured.len());
    for (m, seen) in measured.iter().zip(observations) {
        let key = format!("{namespace}/{name}/{}", m.name);
        // In memory, else resumed from status (the gap since is unobserved), else new.
        let (mut ledger, gap) = match ctx.sla.take_ledger(&key) {
            Some(l) => (l, max_gap),
            None => match previous
                .objects
                .iter()
                .find(|o| o.name == m.name)
                .and_then(evaluate::ledger_from)
            {
                Some(l) => (l, chrono::Duration::zero()),
                None => (Ledger::new(sla.spec.period, tz, now), max_gap),
            },
        };
        let closed_before = ledger.history.last().map(|p| p.start);
        // Measurement starts once the object is first seen available: a
        // domain still rolling out is not in service yet, so not in outage.
        // An object the probe could not be pointed at is not observed: the
        // time counts as unobserved, never as up or down.
        if let Some(seen) = seen
            && (ledger.last.is_some() || seen.available)
        {
            ledger.observe(sla.spec.period, tz, now, seen.available, seen.cause, gap);
        }
        let object = evaluate::object_status(
            &m.name,
            &m.domain,
            m.site.as_deref(),
            &ledger,
            &targets,
            tz,
            now,
        );
        if ledger.history.last().map(|p| p.start) != closed_before
            && let Some(closed) = object.history.last()
        {
            let met = closed.met.unwrap_or(false);
            let note = format!(
                "period {} closed for {}: availability {:.4}% (objective {}%), longest outage {:.0}s (cap {:.0}s): {}",
                closed.label,
                m.name,
                closed.availability_lower,
                targets.objective,
                closed.longest_outage.as_ref().map_or(0.0, |o| o.seconds),
                closed.single_outage_cap_seconds,
                if met { "met" } else { "missed" }
            );
            tracing::info!(object = %m.name, period = %closed.label, met, "{note}");
            let type_ = if met {
                EventType::Normal
            } else {
                EventType::Warning
            };
            ctx.event(sla.as_ref(), type_, "PeriodClosed", note);
        }
        ctx.sla.put_ledger(key, ledger);
        objects.push(object);
    }
    let period = Period::containing(sla.spec.period, tz, now);
    let new = status::compute(
        &sla,
        objects,
        targets.inconsistency(&period),
        &problems,
        now,
    );

    // status
    let status_every = chrono::Duration::seconds(sla.spec.status_interval_seconds.max(1).into());
    let due = ctx
        .sla
        .should_write(&format!("{namespace}/{name}"), &new, now, status_every);
    tracing::debug!(objects = new.objects.len(), write = due, "observed");
    if due {
        write_status(&api, &name, &new).await?;
    }
    if previous.state != new.state
        && let Some(state) = &new.state
    {
        let type_ = if state == "Met" {
            EventType::Normal
        } else {
            EventType::Warning
        };
        let note = format!(
            "SLA state {} -> {state}",
            previous.state.as_deref().unwrap_or("none")
        );
        ctx.event(sla.as_ref(), type_, state, note);
    }
    ctx.sla
        .latest
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            format!("{namespace}/{name}"),
            (sla.spec.objective, new.objects),
        );
    Ok(Action::requeue(interval))
}

/// Runs a `PecRoundTrip` probe against every measured domain at once. A
/// domain the probe cannot be pointed at (see [`round_trip_of`]) is not
/// observed, and says why in `problems`.
#[allow(clippy::too_many_arguments)]
async fn round_trips(
    ctx: &Context,
    sla: &SlaTarget,
    namespace: &str,
    spec: &PecRoundTripProbe,
    domains: &[MailDomain],
    measured: &[status::Measured],
    timeout: Duration,
    problems: &mut Vec<(&'static str, String)>,
) -> Vec<Option<probe::Seen>> {
    let secret_ref = &spec.password_secret_ref;
    let password = Api::<Secret>::namespaced(ctx.client.clone(), namespace)
        .get_opt(&secret_ref.name)
        .await
        .ok()
        .flatten()
        .and_then(|s| s.data?.remove(&secret_ref.key))
        .and_then(|v| String::from_utf8(v.0).ok());
    let Some(password) = password else {
        problems.push((
            "ProbeSecretNotFound",
            format!(
                "Secret {} with key {} (probe.pecRoundTrip.passwordSecretRef) not found in this namespace; create it with the probe mailbox's password",
                secret_ref.name, secret_ref.key
            ),
        ));
        return measured.iter().map(|_| None).collect();
    };
    let tag = format!("sla-probe.{namespace}.{}", sla.name_any());
    let mut plans = Vec::with_capacity(measured.len());
    for m in measured {
        let Some(md) = domains.iter().find(|d| d.name_any() == m.maildomain) else {
            plans.push(None);
            continue;
        };
        match round_trip_of(ctx, namespace, spec, md, &password, &tag, timeout).await {
            Ok(rt) => plans.push(Some(rt)),
            Err(why) => {
                problems.push(("ProbeNotPossible", why));
                plans.push(None);
            }
        }
    }
    futures::future::join_all(plans.iter().map(|plan| async move {
        match plan {
            Some(rt) => Some(round_trip::run(rt).await),
            None => None,
        }
    }))
    .await
}

/// What a round trip to `md` needs: its probe address, the certificate its
/// gateways present (from its TLS Secret) and the certificates its receipts
/// are signed with (its SigningKey's index). `Err` says what to fix.
async fn round_trip_of(
    ctx: &Context,
    namespace: &str,
    spec: &PecRoundTripProbe,
    md: &MailDomain,
    password: &str,
    tag: &str,
    timeout: Duration,
) -> Result<round_trip::RoundTrip, String> {
    let name = md.name_any();
    if md.spec.profile == Profile::ReceiveOnly {
        return Err(format!(
            "MailDomain {name} is ReceiveOnly: it has no access point a PecRoundTrip probe can submit to"
        ));
    }
    let tls_secret = md
        .spec
        .gateway
        .tls_secret_ref
        .as_deref()
        .ok_or_else(|| format!("MailDomain {name} has no gateway.tlsSecretRef"))?;
    let pinned: Vec<Vec<u8>> = Api::<Secret>::namespaced(ctx.client.clone(), namespace)
        .get_opt(tls_secret)
        .await
        .ok()
        .flatten()
        .and_then(|s| s.data?.remove("tls.crt"))
        .and_then(|v| String::from_utf8(v.0).ok())
        .map(|pem| pec_core::smime::pem_certificates(&pem))
        .unwrap_or_default()
        .into_iter()
        .take(1)
        .collect();
    if pinned.is_empty() {
        return Err(format!(
            "the TLS Secret {tls_secret} of MailDomain {name} has no certificate in tls.crt"
        ));
    }
    let key = md.spec.signing_key_ref.as_deref().ok_or_else(|| {
        format!("MailDomain {name} has no signingKeyRef: nothing signs its receipts")
    })?;
    let index = index_name_of(key);
    let bundle = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace)
        .get_opt(&index)
        .await
        .ok()
        .flatten()
        .and_then(|c| c.data?.remove("bundle.crt"))
        .unwrap_or_default();
    let mut trusted = pec_core::smime::TrustedSigners::default();
    if trusted.add_pem(&bundle) == 0 {
        return Err(format!(
            "SigningKey {key} of MailDomain {name} has published no certificate yet (ConfigMap {index})"
        ));
    }
    let service = domain_service_name(&name);
    let domain = md.spec.domain.clone();
    Ok(round_trip::RoundTrip {
        address: format!("{}@{domain}", spec.mailbox),
        password: password.to_string(),
        submission: spec
            .submission_address
            .clone()
            .unwrap_or_else(|| format!("{service}.{namespace}.svc:465")),
        api: spec
            .api_address
            .clone()
            .unwrap_or_else(|| format!("{service}.{namespace}.svc:443")),
        pinned,
        trusted,
        tag: tag.to_string(),
        message_id: format!(
            "{tag}.{}@{domain}",
            ctx.clock.now().timestamp_nanos_opt().unwrap_or_default()
        ),
        timeout,
        domain,
    })
}

async fn write_status(
    api: &Api<SlaTarget>,
    name: &str,
    status: &SlaTargetStatus,
) -> Result<(), Error> {
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(super::status_write::body::<SlaTarget, _>(status)),
    )
    .await
    .map(|_| ())
    .map_err(Error::WriteStatus)
}

fn error_policy(obj: Arc<SlaTarget>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry_after_error(
        CONTROLLER,
        obj.as_ref(),
        error,
        error.reason(),
        Duration::from_secs(5),
    )
}

/// Runs the SlaTarget controller until shutdown.
pub async fn run(ctx: Arc<Context>) {
    let controller = Controller::new(
        Api::<SlaTarget>::all(ctx.client.clone()),
        Config::default().any_semantic(),
    );
    ctx.metrics.install(
        "SLA",
        metrics::SlaCollector::new(ctx.sla.clone(), controller.store()),
    );
    controller
        .with_config(ctx.controller_config())
        .shutdown_on_signal()
        .run(
            |obj, ctx| async move {
                let result = reconcile(obj.clone(), ctx.clone()).await;
                ctx.reset_backoff(CONTROLLER, obj.as_ref(), result)
            },
            error_policy,
            ctx,
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SlaObjectStatus;

    fn status(state: &str, outages: i64, measured: f64) -> SlaTargetStatus {
        let mut object = SlaObjectStatus {
            name: "acme".into(),
            state: state.into(),
            ..SlaObjectStatus::default()
        };
        object.period.outages = outages;
        object.period.measured_seconds = measured;
        SlaTargetStatus {
            objects: vec![object],
            ..SlaTargetStatus::default()
        }
    }

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).expect("time")
    }

    #[test]
    fn status_is_written_at_once_on_a_change_people_act_on_else_at_the_interval() {
        let state = SlaState::default();
        let every = chrono::Duration::seconds(30);
        let key = "ns/sla";
        assert!(
            state.should_write(key, &status("Met", 0, 1.0), at(0), every),
            "the first"
        );
        assert!(
            !state.should_write(key, &status("Met", 0, 5.0), at(5), every),
            "only the figures moved"
        );
        assert!(
            state.should_write(key, &status("Met", 1, 6.0), at(6), every),
            "an outage began"
        );
        assert!(!state.should_write(key, &status("Met", 1, 20.0), at(20), every));
        assert!(
            state.should_write(key, &status("Met", 1, 36.0), at(36), every),
            "the interval since the last write passed"
        );
        assert!(
            state.should_write(key, &status("AtRisk", 1, 37.0), at(37), every),
            "the state turned"
        );
        assert!(
            state.should_write("ns/other", &status("Met", 0, 1.0), at(37), every),
            "each SlaTarget on its own"
        );
    }
}
