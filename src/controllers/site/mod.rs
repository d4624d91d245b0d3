//! The Site controller: checks each data center's health every
//! `spec.health.periodSeconds` and decides its phase (see
//! `crate::failover::health`): declares it down after `failureThreshold`
//! failed checks, fences it when it flaps, and enters or refuses maintenance.
//! A Site that MailDomains still list cannot be deleted: its finalizer
//! [`FINALIZER`] stays (and the condition `DeletionRefused` names them) until
//! no MailDomain lists it, as Kubernetes keeps a claim that a pod still uses.
//!
//! Reads Nodes, Sites and MailDomains; writes Site status, `spec.fenced` of a
//! flapping site, the Site's finalizer, and Events.

mod metrics;
mod status;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeStatus};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        Controller, controller::Action, events::EventType, reflector::ObjectRef, watcher::Config,
    },
};
use serde_json::json;

use super::{Context, finalizer, watch_cache::Cache};
use crate::{
    api::{MailDomain, Site, SitePhase, SiteStatus},
    conditions,
    failover::health,
};

const CONTROLLER: &str = "site";
const FIELD_MANAGER: &str = "pec-operator/site";
/// Keeps a Site that MailDomains list from being deleted.
pub const FINALIZER: &str = "pec.dev/site-in-use";
/// How often a refused deletion looks again for MailDomains that list the site.
const DELETION_RECHECK: Duration = Duration::from_secs(5);

/// Why a Site reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Listing the site's nodes (the cache not being ready) failed.
    #[error("listing the nodes of site {site} failed: {source}")]
    ListNodes {
        site: String,
        #[source]
        source: kube::Error,
    },
    /// The reconcile took longer than [`super::RECONCILE_TIMEOUT`].
    #[error("the health check took longer than {0:?}; retrying")]
    TimedOut(Duration),
    /// The node cache was dropped (the controller is shutting down).
    #[error("the node cache is gone: {0}")]
    NodeCache(#[source] super::watch_cache::Stopped),
    /// Listing MailDomains (for a maintenance or deletion check) failed.
    #[error("listing the MailDomains that list site {site} failed: {source}")]
    ListDomains {
        site: String,
        #[source]
        source: kube::Error,
    },
    /// Setting `spec.fenced` on a flapping site failed.
    #[error("fencing site {site} failed: {source}")]
    Fence {
        site: String,
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the finalizer failed.
    #[error("writing the finalizer of site {site} failed: {source}")]
    Finalizer {
        site: String,
        #[source]
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("writing the status of site {site} failed: {source}")]
    WriteStatus {
        site: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// A short, bounded reason for metrics and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NodeCache(_) => "CacheGone",
            Error::TimedOut(_) => "TimedOut",
            Error::ListNodes { .. } => "ListNodesFailed",
            Error::ListDomains { .. } => "ListDomainsFailed",
            Error::Fence { .. } => "FenceFailed",
            Error::Finalizer { .. } => "FinalizerFailed",
            Error::WriteStatus { .. } => "StatusWriteFailed",
        }
    }
}

/// Reconciles one Site: one health check.
#[tracing::instrument(skip_all, fields(site = %site.name_any()))]
pub async fn reconcile(
    site: Arc<Site>,
    ctx: Arc<Context>,
    nodes: &Cache<Node>,
) -> Result<Action, Error> {
    let now = ctx.clock.now();
    let name = site.name_any();
    let _timer = ctx.start_reconcile(CONTROLLER);

    // deletion: refused while a MailDomain lists the site
    let api = Api::<Site>::all(ctx.client.clone());
    let finalizer_error = |source| Error::Finalizer {
        site: name.clone(),
        source,
    };
    let users = if site.metadata.deletion_timestamp.is_some() {
        let domains = list_domains(&ctx, &name).await?;
        let users = status::users(&name, &domains);
        if users.is_empty() {
            finalizer::remove(&api, site.as_ref(), FINALIZER)
                .await
                .map_err(finalizer_error)?;
            return Ok(Action::await_change());
        }
        users
    } else {
        finalizer::add(&api, site.as_ref(), FINALIZER)
            .await
            .map_err(finalizer_error)?;
        Vec::new()
    };

    // fetch
    let nodes = site_nodes(&ctx, &site, nodes).await?;
    let blocking = if site.spec.maintenance && !site.spec.maintenance_force {
        let domains = list_domains(&ctx, &name).await?;
        let already_drained =
            site.status.as_ref().and_then(|s| s.phase) == Some(SitePhase::Maintenance);
        if already_drained {
            Vec::new()
        } else {
            status::blocking_domains(&name, &domains)
        }
    } else {
        Vec::new()
    };

    // decide
    let seen = status::observe(&nodes);
    let old = site.status.clone().unwrap_or_default();
    let probe = ctx.site_probe(&name);
    let decision = health::decide(&site.spec, &old, probe, seen, !blocking.is_empty(), now);
    ctx.set_site_probe(&name, decision.probe);
    let mut new = status::compute(&site, seen, &decision, &blocking, &users, now);
    new.nodes_schedulable = status::nodes_taking_pods(&nodes);

    // apply
    if decision.fence_now {
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"fenced": true}})),
        )
        .await
        .map_err(|source| Error::Fence {
            site: name.clone(),
            source,
        })?;
        let note = format!(
            "{}; clear with: kubectl patch site {name} --type merge -p '{{\"spec\":{{\"fenced\":false}}}}'",
            decision.reason
        );
        ctx.event(site.as_ref(), EventType::Warning, "SiteFenced", note);
    }
    let written = super::status_write::write(&api, FIELD_MANAGER, &name, &old, &new)
        .await
        .map_err(|source| Error::WriteStatus {
            site: name.clone(),
            source,
        })?;
    if written.is_some() {
        publish_events(&ctx, &site, &old, &new).await;
    }
    let next = next_check(&site, decision.probe, now);
    if users.is_empty() {
        Ok(Action::requeue(next))
    } else {
        Ok(Action::requeue(next.min(DELETION_RECHECK)))
    }
}

/// The nodes `site` selects: from the node cache once it holds a full list;
/// listed when it does not within [`CACHE_WAIT`] (a watch whose first list
/// hangs, as around an etcd leader election, must not stop health checks).
async fn site_nodes(ctx: &Context, site: &Site, nodes: &Cache<Node>) -> Result<Vec<Node>, Error> {
    let selector = &site.spec.node_selector;
    match tokio::time::timeout(CACHE_WAIT, nodes.ready()).await {
        Ok(ready) => {
            ready.map_err(Error::NodeCache)?;
            Ok(nodes
                .state()
                .iter()
                .filter(|n| status::selected(selector, n.labels()))
                .map(|n| n.as_ref().clone())
                .collect())
        }
        Err(_) => {
            tracing::warn!(site = %site.name_any(), "the node cache holds no full list yet; listing the nodes");
            Api::<Node>::all(ctx.client.clone())
                .list(&ListParams::default().labels(&status::label_selector(selector)))
                .await
                .map(|l| l.items)
                .map_err(|source| Error::ListNodes {
                    site: site.name_any(),
                    source,
                })
        }
    }
}

/// How long a health check waits for the node cache before listing.
const CACHE_WAIT: Duration = Duration::from_secs(2);

/// Every MailDomain, in all namespaces (`site` names the Site in errors):
/// from the MailDomain controller's cache once it holds a full list, else
/// listed.
async fn list_domains(ctx: &Context, site: &str) -> Result<Vec<MailDomain>, Error> {
    if let Some(store) = ctx.stores.mail_domains.get()
        && store.ready().await.is_ok()
    {
        return Ok(store.state().iter().map(|d| d.as_ref().clone()).collect());
    }
    Api::<MailDomain>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map(|list| list.items)
        .map_err(|source| Error::ListDomains {
            site: site.to_string(),
            source,
        })
}

/// The next check is due one period after the last counted one, whatever
/// reconciles node events caused in between (they must not push it later).
fn next_check(
    site: &Site,
    probe: health::ProbeState,
    now: chrono::DateTime<chrono::Utc>,
) -> Duration {
    let period = Duration::from_secs(site.spec.health.period_seconds.max(1).unsigned_abs().into());
    let Some(last) = probe.last_check else {
        return period;
    };
    let due = last + chrono::Duration::seconds(i64::from(site.spec.health.period_seconds.max(1)));
    (due - now)
        .to_std()
        .map_or(Duration::from_millis(100), |d| {
            d.clamp(Duration::from_millis(100), period)
        })
}

async fn publish_events(ctx: &Context, site: &Site, old: &SiteStatus, new: &SiteStatus) {
    if old.phase != new.phase
        && let Some(phase) = new.phase
    {
        let was_healthy = old.phase.is_some_and(SitePhase::is_healthy);
        let (type_, reason) = match phase {
            SitePhase::Degraded if was_healthy => (EventType::Warning, "SiteDegraded"),
            SitePhase::Serving if was_healthy => (EventType::Normal, "SiteFullStrength"),
            SitePhase::Serving | SitePhase::Degraded if old.phase.is_some() => {
                (EventType::Normal, "SiteRecovered")
            }
            SitePhase::Serving | SitePhase::Degraded => (EventType::Normal, "SiteServing"),
            SitePhase::Down => (EventType::Warning, "SiteDown"),
            SitePhase::Maintenance => (EventType::Normal, "MaintenanceStarted"),
            SitePhase::Fenced => (EventType::Warning, "SiteFenced"),
        };
        let note = format!(
            "{:?} -> {phase:?}: {}",
            old.phase,
            new.phase_reason.clone().unwrap_or_default()
        );
        tracing::info!(site = %site.name_any(), from = ?old.phase, to = ?phase, %note, "site phase changed");
        ctx.event(site, type_, reason, note);
    }
    for (type_, reason) in [
        (status::MAINTENANCE_REFUSED, status::MAINTENANCE_REFUSED),
        (status::DELETION_REFUSED, status::DELETION_REFUSED),
    ] {
        let was_refused = conditions::is_true(&old.conditions, type_);
        if let Some(c) = conditions::find(&new.conditions, type_)
            && c.status == "True"
            && !was_refused
        {
            ctx.event(site, EventType::Warning, reason, c.message.clone());
        }
    }
}

fn error_policy(obj: Arc<Site>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry_after_error(
        CONTROLLER,
        obj.as_ref(),
        error,
        error.reason(),
        Duration::from_secs(10),
    )
}

/// A node as the health check reads it: labels, `unschedulable` and
/// conditions (the image list and the rest of the status can be large).
fn trim_node(node: &mut Node) {
    node.managed_fields_mut().clear();
    node.metadata.annotations = None;
    node.status = node.status.take().map(|s| NodeStatus {
        conditions: s.conditions,
        ..NodeStatus::default()
    });
}

/// Runs the Site controller until shutdown.
pub async fn run(ctx: Arc<Context>) {
    let sites = Api::<Site>::all(ctx.client.clone());
    let controller = Controller::new(sites, Config::default().any_semantic());
    let store = controller.store();
    ctx.metrics
        .install("sites", metrics::SiteCollector::new(store.clone()));
    // The nodes, cached: a health check reads them from memory. Any node
    // change may change any site's counts (sites are few), so each asks
    // for every site's reconcile, once the cache holds it.
    let (triggers, requests) = futures::channel::mpsc::unbounded();
    let nodes = super::watch_cache::spawn(
        Api::<Node>::all(ctx.client.clone()),
        Config::default(),
        trim_node,
        move |_node: &Node| {
            let sites = store.state();
            super::watch_cache::trigger(
                &triggers,
                sites.iter().map(|s| ObjectRef::from_obj(s.as_ref())),
            );
        },
    );
    controller
        .reconcile_on(requests)
        .with_config(ctx.controller_config())
        .shutdown_on_signal()
        .run(
            move |obj, ctx| {
                let nodes = nodes.clone();
                async move {
                    let timed_out = Error::TimedOut(super::RECONCILE_TIMEOUT);
                    let run = reconcile(obj.clone(), ctx.clone(), &nodes);
                    ctx.bounded(CONTROLLER, obj.as_ref(), run, timed_out).await
                }
            },
            error_policy,
            ctx,
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}
