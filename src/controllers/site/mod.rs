//! The Site controller: counts each data center's nodes and their readiness.
//!
//! Reads Nodes and Sites; writes only Site status and Events.

mod status;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        Controller, controller::Action, events::EventType, reflector::ObjectRef, watcher::Config,
    },
};
use serde_json::json;

use super::Context;
use crate::{api::Site, conditions};

const CONTROLLER: &str = "site";
const FIELD_MANAGER: &str = "pec-operator/site";
/// Node changes trigger a reconcile; this is only the safety net.
const RESYNC: Duration = Duration::from_secs(300);

/// Why a Site reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Listing the site's nodes failed.
    #[error("listing the nodes of site {site} failed: {source}")]
    ListNodes {
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
            Error::ListNodes { .. } => "ListNodesFailed",
            Error::WriteStatus { .. } => "StatusWriteFailed",
        }
    }
}

/// Reconciles one Site.
#[tracing::instrument(skip_all, fields(site = %site.name_any()))]
pub async fn reconcile(site: Arc<Site>, ctx: Arc<Context>) -> Result<Action, Error> {
    let now = ctx.clock.now();
    let name = site.name_any();
    ctx.metrics
        .reconciles
        .with_label_values(&[CONTROLLER])
        .inc();
    let _timer = ctx
        .metrics
        .reconcile_duration
        .with_label_values(&[CONTROLLER])
        .start_timer();

    let selector = status::label_selector(&site.spec.node_selector);
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::ListNodes {
            site: name.clone(),
            source,
        })?;

    let new = status::compute(&site, &nodes.items, now);
    let old = site.status.clone().unwrap_or_default();
    if new != old {
        Api::<Site>::all(ctx.client.clone())
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(
                    json!({"apiVersion": "pec.dev/v1alpha1", "kind": "Site", "status": new}),
                ),
            )
            .await
            .map_err(|source| Error::WriteStatus {
                site: name.clone(),
                source,
            })?;
        let was_ready = conditions::is_true(&old.conditions, status::READY);
        let is_ready = conditions::is_true(&new.conditions, status::READY);
        if was_ready != is_ready || site.status.is_none() {
            let (type_, reason) = if is_ready {
                (EventType::Normal, "SiteReady")
            } else {
                (EventType::Warning, "SiteNotReady")
            };
            let note = format!("{} of {} nodes ready", new.nodes_ready, new.nodes_total);
            ctx.event(site.as_ref(), type_, reason, note).await;
        }
    }
    Ok(Action::requeue(RESYNC))
}

fn error_policy(_site: Arc<Site>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %error, "site reconcile failed");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[CONTROLLER, error.reason()])
        .inc();
    Action::requeue(Duration::from_secs(10))
}

/// Runs the Site controller until shutdown.
pub async fn run(ctx: Arc<Context>) {
    let sites = Api::<Site>::all(ctx.client.clone());
    let controller = Controller::new(sites, Config::default().any_semantic());
    let store = controller.store();
    controller
        // Any node change may change any site's counts; sites are few.
        .watches(
            Api::<Node>::all(ctx.client.clone()),
            Config::default(),
            move |_node: Node| {
                store
                    .state()
                    .iter()
                    .map(|s| ObjectRef::from_obj(s.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}
