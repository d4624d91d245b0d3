//! The MailDomain controller: redundant gateways for a PEC domain in every site.
//!
//! For each (domain, site) pair it applies a ConfigMap, Deployment, Service,
//! PodDisruptionBudget and NetworkPolicy (see `build`), deletes the children
//! of sites no longer listed, and reports per-site gateway counts. Reads
//! Sites, SigningKeys and its children from its watch caches (see `cache`;
//! the children are filed by domain, see `by_domain`);
//! writes only objects it owns, and only when they change, MailDomain status
//! and Events.

mod apply;
pub mod build;
pub mod by_domain;
pub mod cache;
pub mod cached;
pub mod dns;
mod fetch;
pub mod gateway;
pub mod metrics;
pub mod observe;
pub mod references;
pub mod routes;
pub mod status;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{api::apps::v1::Deployment, apimachinery::pkg::apis::meta::v1::Condition};
use kube::{
    Api, ResourceExt,
    runtime::{Controller, controller::Action, events::EventType},
};

use super::Context;
use crate::{
    api::{MailDomain, Site},
    conditions,
    failover::serving,
};

const CONTROLLER: &str = "maildomain";
/// How soon a domain looks again while it is not Ready or something it
/// names is wrong (a claim or providers' ConfigMap, or a domain name
/// another holds). Secrets, Sites, SigningKeys and gateway pods trigger a
/// reconcile when they change; claims and those ConfigMaps are read, not
/// watched, so a fix there is noticed within this.
const RECHECK: Duration = Duration::from_secs(10);

/// Why a MailDomain reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object has no namespace (cannot happen for a namespaced kind).
    #[error("MailDomain {0} has no namespace")]
    NoNamespace(String),
    /// The reconcile took longer than [`super::RECONCILE_TIMEOUT`] (a request
    /// that never answers); it is abandoned and retried.
    #[error("the reconcile took longer than {0:?}; retrying")]
    TimedOut(Duration),
    /// A watch cache was dropped (the controller is shutting down).
    #[error("the watch caches are gone: {0}")]
    Cache(#[source] super::watch_cache::Stopped),
    /// Reading a Secret, claim or ConfigMap the spec names failed.
    #[error("reading {kind} {name} failed: {source}")]
    FetchReference {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Rendering the gateway configuration failed.
    #[error("rendering the gateway configuration failed: {0}")]
    Render(#[source] serde_yaml::Error),
    /// Server-side apply of a child failed.
    #[error("applying {kind} {name} failed: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Deleting a child no longer wanted failed.
    #[error("deleting {kind} {name} failed: {source}")]
    Delete {
        kind: &'static str,
        name: String,
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
            Error::Cache(_) => "CacheGone",
            Error::TimedOut(_) => "TimedOut",
            Error::FetchReference { .. } => "FetchReferenceFailed",
            Error::Render(_) => "RenderFailed",
            Error::Apply { .. } => "ApplyFailed",
            Error::Delete { .. } => "DeleteFailed",
            Error::WriteStatus(_) => "StatusWriteFailed",
        }
    }
}

/// Reconciles one MailDomain.
#[tracing::instrument(skip_all, fields(maildomain = %md.name_any(), namespace = md.namespace().unwrap_or_default()))]
pub async fn reconcile(
    md: Arc<MailDomain>,
    ctx: Arc<Context>,
    caches: &cache::Caches,
) -> Result<Action, Error> {
    caches.ready().await.map_err(Error::Cache)?;
    let now = ctx.clock.now();
    let name = md.name_any();
    let namespace = md
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    // The status this controller wrote last, if the cache does not hold it yet.
    let md =
        match ctx
            .domain_statuses
            .newer(&namespace, &name, md.metadata.resource_version.as_deref())
        {
            Some(written) => Arc::new(MailDomain {
                status: Some(written),
                ..(*md).clone()
            }),
            None => md,
        };
    let _timer = ctx.start_reconcile(CONTROLLER);

    // A domain name another MailDomain holds: nothing is applied for this one.
    let domains = caches.mail_domains.state();
    if let Some(holder) = references::domain_holder(&md, domains.iter().map(AsRef::as_ref)) {
        return refuse_duplicate(&ctx, &md, &namespace, holder).await;
    }

    // fetch
    let fetched: BTreeMap<String, Option<Site>> = md
        .spec
        .sites
        .iter()
        .map(|site| (site.clone(), caches.site(site)))
        .collect();
    let signing_key = md
        .spec
        .signing_key_ref
        .as_deref()
        .and_then(|key| caches.signing_key(&namespace, key));
    let this = kube::runtime::reflector::ObjectRef::from_obj(md.as_ref());
    let held = caches.held(&this);
    let before = held.deployments(&this);
    let pods = held.pods(&this);
    let referenced = fetch::references(&ctx.client, &namespace, &md, caches).await?;

    // observe and plan
    let resolution = observe::resolve_sites(&md, &fetched);
    let key = status::KeyResolution::of(&md, signing_key.as_ref());
    let problems = references::check(&md, &referenced, now);
    let gateways = observe::ready_gateways(&pods);
    let candidates = observe::candidates(&md, &fetched, &gateways);
    let previous = md
        .status
        .as_ref()
        .map(|s| s.serving_sites.clone())
        .unwrap_or_default();
    let stabilization =
        chrono::Duration::seconds(i64::from(md.spec.failover.stabilization_seconds));
    let plan = serving::plan(
        md.spec.failover.mode,
        stabilization,
        &candidates,
        &previous,
        now,
    );
    let served = md
        .status
        .as_ref()
        .map(status::served_sites)
        .unwrap_or_default();
    let switch = serving::change_reason(
        &previous,
        &plan.serving,
        &served,
        &candidates,
        stabilization,
        now,
    );

    // build
    let slices_for = (!plan.kept_last).then_some(plan.serving.as_slice());
    let children = build::children(
        &md,
        key.config(),
        &ctx.gateway,
        &resolution.present,
        slices_for,
        &gateways,
    )
    .map_err(Error::Render)?;

    // apply
    let applied = apply::apply_all(&ctx.client, &namespace, &this, &children, &held).await?;
    if applied.writes > 0 {
        tracing::debug!(writes = applied.writes, "applied changed children");
    }
    let removed = apply::prune(
        &ctx.client,
        &namespace,
        &children,
        &resolution.missing,
        &held,
    )
    .await?;
    let cached_routes = caches
        .routes
        .get(&kube::runtime::reflector::ObjectRef::new(routes::PLATFORM_ROUTES).within(&namespace));
    ctx.routes
        .sync(
            &ctx.client,
            &namespace,
            apply::FIELD_MANAGER,
            cached_routes.as_deref(),
            &domains,
        )
        .await
        .map_err(|source| Error::Apply {
            kind: "ConfigMap",
            name: routes::PLATFORM_ROUTES.into(),
            source,
        })?;
    if ctx.dns.available(&ctx.client).await {
        let sites: Vec<&Site> = fetched.values().flatten().collect();
        dns::apply(
            &ctx.client,
            &namespace,
            &dns::endpoint(&md, &plan.serving, &sites),
        )
        .await?;
    }
    // Server-side apply returned the Deployments with their status; the
    // gateways still running in listed-but-missing sites come from `before`.
    let deployments =
        observe::current_deployments(applied.deployments, &before, &resolution.missing);

    // status
    let resolved = status::Resolved {
        key: &key,
        references: &problems,
        sites: &resolution,
    };
    let new = status::compute(&md, &resolved, &deployments, &plan, switch, now);
    let old = md.status.clone().unwrap_or_default();
    write_status(&ctx, &md, &namespace, &old, &new).await?;
    if let Some(reason) = switch {
        // When each site that left became unable to serve, as the operator learned it.
        let detected: Vec<_> = previous
            .iter()
            .filter(|s| !plan.serving.contains(s))
            .filter_map(|s| {
                observe::unavailable_since(fetched.get(s).and_then(Option::as_ref), s, &pods)
            })
            .collect();
        record_switch(&ctx, &md, &previous, &plan.serving, reason, &detected, now).await;
    }
    publish_events(&ctx, &md, &old, &new, &before, &children, &removed).await;
    let after = requeue_after(plan.next_check, now, ctx.resync);
    // Not Ready: look again soon. Most causes (a Secret, Site, SigningKey
    // or gateway pod) trigger a reconcile when they change, but a claim or
    // providers' ConfigMap does not: those are read, never watched.
    if problems.is_empty() && conditions::is_true(&new.conditions, status::READY) {
        Ok(Action::requeue(after))
    } else {
        Ok(Action::requeue(after.min(RECHECK)))
    }
}

/// Writes `new` as `md`'s status unless it equals `old`.
async fn write_status(
    ctx: &Context,
    md: &MailDomain,
    namespace: &str,
    old: &crate::api::MailDomainStatus,
    new: &crate::api::MailDomainStatus,
) -> Result<(), Error> {
    let api = Api::<MailDomain>::namespaced(ctx.client.clone(), namespace);
    let name = md.name_any();
    let written = super::status_write::write(&api, apply::FIELD_MANAGER, &name, old, new)
        .await
        .map_err(Error::WriteStatus)?;
    if let Some(written) = written {
        ctx.domain_statuses.remember(
            namespace,
            &name,
            written.metadata.resource_version.as_deref(),
            new.clone(),
        );
    }
    Ok(())
}

/// `md` names a domain `holder` had first: Ready=False naming the holder,
/// nothing applied, the rest of the status kept; looked at again every
/// [`RECHECK`].
async fn refuse_duplicate(
    ctx: &Context,
    md: &MailDomain,
    namespace: &str,
    holder: &MailDomain,
) -> Result<Action, Error> {
    let old = md.status.clone().unwrap_or_default();
    let new = status::duplicate(md, holder, ctx.clock.now());
    write_status(ctx, md, namespace, &old, &new).await?;
    let ready = |s: &crate::api::MailDomainStatus| {
        conditions::find(&s.conditions, status::READY).map(|c| (c.status.clone(), c.reason.clone()))
    };
    if ready(&old) != ready(&new)
        && let Some(c) = conditions::find(&new.conditions, status::READY)
    {
        ctx.event(md, EventType::Warning, &c.reason, c.message.clone());
    }
    Ok(Action::requeue(RECHECK))
}

/// Requeue at the next stabilization deadline, capped by the resync period
/// `resync` (owned objects and Sites trigger reconciles; the resync is only
/// the safety net), never with a zero or negative delay.
fn requeue_after(
    next: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
    resync: Duration,
) -> Duration {
    next.and_then(|at| (at - now).to_std().ok())
        .map_or(resync, |d| d.clamp(Duration::from_secs(1), resync))
}

/// Counts a switch of the serving sites, times detection-to-switch for sites
/// declared down, and tells people.
async fn record_switch(
    ctx: &Context,
    md: &MailDomain,
    from: &[String],
    to: &[String],
    reason: &'static str,
    detected: &[chrono::DateTime<chrono::Utc>],
    now: chrono::DateTime<chrono::Utc>,
) {
    let namespace = md.namespace().unwrap_or_default();
    let name = md.name_any();
    ctx.metrics
        .failovers
        .with_label_values(&[
            namespace.as_str(),
            name.as_str(),
            md.spec.domain.as_str(),
            reason,
        ])
        .inc();
    for at in detected {
        let seconds = (now - *at).num_milliseconds().max(0) as f64 / 1000.0;
        ctx.metrics.detection_to_switch.observe(seconds);
    }
    let type_ = match reason {
        "SiteRejoined" | "PreferredSiteRejoined" => EventType::Normal,
        _ => EventType::Warning,
    };
    let note = format!(
        "serving sites [{}] -> [{}] ({reason})",
        from.join(", "),
        to.join(", ")
    );
    tracing::info!(domain = %md.spec.domain, %reason, from = ?from, to = ?to, "switched serving sites");
    ctx.event(md, type_, "Failover", note);
}

/// Events for what a person would want to know: readiness flips, missing
/// sites, configuration rollouts and removed sites.
async fn publish_events(
    ctx: &Context,
    md: &MailDomain,
    old: &crate::api::MailDomainStatus,
    new: &crate::api::MailDomainStatus,
    before: &[Deployment],
    children: &build::Children,
    removed: &std::collections::BTreeSet<String>,
) {
    if let Some((type_, ready)) = ready_event(old, new) {
        ctx.event(md, type_, &ready.reason, ready.message.clone());
    }
    let was_stranded = conditions::is_true(&old.conditions, status::NO_HEALTHY_SITE);
    if let Some(c) = conditions::find(&new.conditions, status::NO_HEALTHY_SITE)
        && c.status == "True"
        && !was_stranded
    {
        ctx.event(
            md,
            EventType::Warning,
            status::NO_HEALTHY_SITE,
            c.message.clone(),
        );
    }
    for site in &children.sites {
        let hash_of = |d: &Deployment| {
            d.spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get(build::CONFIG_HASH_ANNOTATION).cloned())
        };
        let previous = before
            .iter()
            .find(|d| d.metadata.name == site.deployment.metadata.name);
        if let Some(previous) = previous
            && hash_of(previous) != hash_of(&site.deployment)
        {
            let note = format!(
                "gateway configuration changed; rolling the gateways of site {}",
                site.site
            );
            ctx.event(md, EventType::Normal, "ConfigChanged", note);
        }
    }
    for site in removed {
        let note = format!("site {site} is no longer listed; its gateways were removed");
        ctx.event(md, EventType::Normal, "SiteRemoved", note);
    }
}

/// The Event the change of `Ready` from `old` to `new` asks for: one when
/// its status or reason changes, a warning unless it turned true. A new
/// domain whose gateways are starting gets none: like a new Deployment, it
/// raises no warning while its pods start, and the Event that it turned
/// ready says the rest.
fn ready_event<'a>(
    old: &crate::api::MailDomainStatus,
    new: &'a crate::api::MailDomainStatus,
) -> Option<(EventType, &'a Condition)> {
    let ready = conditions::find(&new.conditions, status::READY)?;
    let Some(old) = conditions::find(&old.conditions, status::READY) else {
        return (ready.reason != status::reason::GATEWAYS_NOT_READY)
            .then_some((event_type(ready), ready));
    };
    (old.status != ready.status || old.reason != ready.reason).then_some((event_type(ready), ready))
}

fn event_type(c: &Condition) -> EventType {
    if c.status == "True" {
        EventType::Normal
    } else {
        EventType::Warning
    }
}

fn error_policy(obj: Arc<MailDomain>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry_after_error(
        CONTROLLER,
        obj.as_ref(),
        error,
        error.reason(),
        Duration::from_secs(10),
    )
}

/// Runs the MailDomain controller until shutdown.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    // The caches' watches are the triggers: each change asks for its
    // reconciles once the cache holds it (see `cache::caches`), the
    // MailDomains' own changes included, so the controller needs no watch
    // of its own.
    let (caches, requests) = cache::caches(&client);
    ctx.metrics.install(
        "serving sites",
        metrics::ServingCollector::new(caches.mail_domains.store().clone()),
    );
    let _ = ctx.stores.children.set(caches.children.clone());
    let _ = ctx.stores.mail_domains.set(caches.mail_domains.clone());
    Controller::for_stream(
        futures::stream::pending(),
        caches.mail_domains.store().clone(),
    )
    .reconcile_on(requests)
    .with_config(ctx.controller_config().debounce(ctx.debounce))
    .shutdown_on_signal()
    .run(
        move |obj, ctx| {
            let caches = caches.clone();
            async move {
                let timed_out = Error::TimedOut(super::RECONCILE_TIMEOUT);
                let run = reconcile(obj.clone(), ctx.clone(), &caches);
                ctx.bounded(CONTROLLER, obj.as_ref(), run, timed_out).await
            }
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
    use crate::api::MailDomainStatus;

    fn at(s: i64) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_800_000_000 + s, 0).expect("time")
    }

    fn with_ready(value: &str, reason: &str) -> MailDomainStatus {
        MailDomainStatus {
            conditions: vec![Condition {
                type_: status::READY.into(),
                status: value.into(),
                reason: reason.into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: crate::time::to_k8s(at(0)),
            }],
            ..MailDomainStatus::default()
        }
    }

    #[test]
    fn ready_events_skip_a_new_domain_whose_gateways_start() {
        let none = MailDomainStatus::default();
        let starting = with_ready("False", status::reason::GATEWAYS_NOT_READY);
        let ready = with_ready("True", status::reason::ALL_SITES_READY);
        let missing = with_ready("False", status::reason::SITE_NOT_FOUND);
        let kind = |old, new| ready_event(old, new).map(|(t, c)| (t, c.reason.clone()));
        assert_eq!(kind(&none, &starting), None, "a new domain starting");
        assert_eq!(
            kind(&none, &missing),
            Some((EventType::Warning, "SiteNotFound".into())),
            "a new domain that cannot start is told at once"
        );
        assert_eq!(
            kind(&starting, &ready),
            Some((EventType::Normal, "AllSitesReady".into()))
        );
        assert_eq!(kind(&ready, &ready), None, "no change");
        assert_eq!(
            kind(&ready, &starting),
            Some((EventType::Warning, "GatewaysNotReady".into())),
            "a ready domain losing gateways"
        );
    }

    #[test]
    fn the_requeue_is_the_next_deadline_within_a_second_and_the_resync() {
        let resync = Duration::from_secs(300);
        assert_eq!(requeue_after(None, at(0), resync), resync, "nothing due");
        assert_eq!(
            requeue_after(Some(at(42)), at(0), resync),
            Duration::from_secs(42)
        );
        assert_eq!(
            requeue_after(Some(at(0)), at(0), resync),
            Duration::from_secs(1),
            "never at zero"
        );
        assert_eq!(
            requeue_after(Some(at(-5)), at(0), resync),
            resync,
            "a deadline already past is no deadline"
        );
        assert_eq!(requeue_after(Some(at(3600)), at(0), resync), resync);
        assert_eq!(
            requeue_after(None, at(0), Duration::from_secs(60)),
            Duration::from_secs(60),
            "the resync given"
        );
    }
}
