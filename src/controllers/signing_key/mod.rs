//! The SigningKey controller: HSM-backed keys and their certificates, issued,
//! published, activated and retired on schedule (see `signing::lifecycle`).
//!
//! Each reconcile performs lifecycle steps until the next one is in the
//! future, writing status after every step: status is the commit point, and
//! every step is idempotent (the key's `CKA_ID` is derived from the UID and
//! generation, publication is a server-side apply), so a crash between a step
//! and its status write repeats the step without making anything twice.
//!
//! Reads: SigningKeys, MailDomains, the PIN and CA Secrets (get only),
//! cert-manager CertificateRequests. Writes: SigningKey status and
//! finalizer, the publication Secret and index ConfigMap, the CSR and CRL
//! Secrets, CertificateRequests, Events.

pub mod issue;
pub mod metrics;
pub mod publish;
pub mod status;

use std::{collections::BTreeMap, fmt::Debug, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::{NamespaceResourceScope, api::core::v1::ConfigMap};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        Controller, controller::Action, events::EventType, reflector::ObjectRef, watcher::Config,
    },
};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::{
    Context, finalizer,
    handover::{self, Part},
};
use crate::{
    api::{
        KeyGeneration, MailDomain, RetiredKeyPolicy, RevokedCertificate, SigningKey,
        SigningKeyStatus,
    },
    conditions,
    hsm::key_id,
    signing::lifecycle::{KeyState, Policy, Step, decide},
    time::to_k8s,
};

const CONTROLLER: &str = "signingkey";
/// Protects the HSM objects: removed only after cleanup.
pub const FINALIZER: &str = "pec.dev/hsm-keys";
/// The field manager of every write this controller applies, named like
/// the other controllers' (`pec-operator/<kind>`).
const FIELD_MANAGER: &str = "pec-operator/signingkey";
/// The field manager this controller applied under before it was named like
/// the others. What that name still holds is handed over to
/// [`FIELD_MANAGER`] at the next write of each object (see `handover`), so
/// a field the controller no longer sets is removed, not kept by the old
/// name forever.
const LEGACY_FIELD_MANAGER: &str = "pec-operator";
/// How often a request waiting for a person or cert-manager is looked at again.
const POLL: Duration = Duration::from_secs(5);

/// Why a SigningKey reconcile failed (as opposed to a lifecycle step, whose
/// failures are recorded in status and retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object has no namespace.
    #[error("SigningKey {0} has no namespace")]
    NoNamespace(String),
    /// An API call failed.
    #[error("{what} failed: {source}")]
    Api {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    /// The CA that signs the CRL could not be read.
    #[error("reading the CA for the CRL failed: {0}")]
    Ca(#[source] issue::IssueError),
    /// Building the CRL failed.
    #[error("building the CRL failed: {0}")]
    Crl(#[source] crate::signing::x509::X509Error),
}

impl Error {
    /// A short, bounded reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NoNamespace(_) => "NoNamespace",
            Error::Api { .. } => "ApiError",
            Error::Ca(e) => e.reason(),
            Error::Crl(_) => "CrlFailed",
        }
    }
}

fn api(what: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Api { what, source }
}

/// The owner reference that ties children to `sk` (garbage-collected with it).
pub fn owner_reference(sk: &SigningKey) -> serde_json::Value {
    json!({
        "apiVersion": "pec.dev/v1alpha1",
        "kind": "SigningKey",
        "name": sk.name_any(),
        "uid": sk.uid().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// Labels of everything made for `sk`.
pub fn labels(sk: &SigningKey) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            super::MANAGED_BY.to_string(),
        ),
        ("pec.dev/signingkey".to_string(), sk.name_any()),
    ])
}

/// Server-side applies `value` as `K` named `name` in `ns`.
pub async fn apply_json<K>(
    client: &Client,
    ns: &str,
    name: &str,
    value: serde_json::Value,
) -> Result<K, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    let applied = api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(value),
        )
        .await?;
    if handover::held_by(applied.meta(), LEGACY_FIELD_MANAGER, Part::Object) {
        return handover::release(&api, name, LEGACY_FIELD_MANAGER, Part::Object).await;
    }
    Ok(applied)
}

/// What one reconcile carries besides the lifecycle state.
struct Work {
    state: KeyState,
    details: BTreeMap<u32, KeyGeneration>,
    revoked: Vec<RevokedCertificate>,
    pending_action: Option<String>,
    waiting: Option<status::Waiting>,
    /// The status as last written in this reconcile.
    written: SigningKeyStatus,
}

/// Reconciles one SigningKey.
#[tracing::instrument(skip_all, fields(signingkey = %sk.name_any(), namespace = sk.namespace().unwrap_or_default()))]
pub async fn reconcile(sk: Arc<SigningKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.start_reconcile(CONTROLLER);
    let name = sk.name_any();
    let ns = sk
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    if sk.metadata.deletion_timestamp.is_some() {
        return finalize(&sk, &ctx, &ns).await;
    }
    if !sk.finalizers().iter().any(|f| f == FINALIZER) {
        let keys = Api::<SigningKey>::namespaced(ctx.client.clone(), &ns);
        finalizer::add(&keys, sk.as_ref(), FINALIZER)
            .await
            .map_err(api("adding the finalizer"))?;
        return Ok(Action::await_change());
    }
    let now = ctx.clock.now();
    let old = sk.status.clone().unwrap_or_default();
    if handover::held_by(&sk.metadata, LEGACY_FIELD_MANAGER, Part::Status) {
        take_status_over(&ctx, &sk, &ns, &old).await?;
    }
    let policy = match status::policy(&sk.spec) {
        Ok(p) => p,
        Err(problem) => {
            let state = status::state(&old);
            let mut new = old.clone();
            let (conds, phase) = status::conditions(
                &sk,
                &new,
                &state,
                None,
                Some(("InvalidSpec", problem)),
                None,
                now,
            );
            new.conditions = conds;
            new.phase = Some(phase);
            write_status(&ctx, &sk, &ns, &old, &new).await?;
            return Ok(Action::await_change());
        }
    };
    let mut work = Work {
        state: status::state(&old),
        details: status::details(&old),
        revoked: old.revoked.clone(),
        pending_action: old.pending_action.clone(),
        waiting: None,
        written: old.clone(),
    };

    if let Some(r) = &sk.spec.revoke
        && !work.revoked.iter().any(|x| x.generation == r.generation)
    {
        revoke(&ctx, &sk, &ns, &mut work, &policy, now).await?;
    }

    let action = loop {
        let step = decide(&work.state, &policy, now);
        match step {
            Step::WaitUntil(at) => break Action::requeue(until(at, now, ctx.resync)),
            Step::Issue(n) => {
                work.state.begin(n);
                let csr = work.details.get(&n).and_then(|d| d.csr.clone());
                let outcome =
                    issue::attempt(&ctx, &sk, n, policy.duration, csr, &mut work.details, now)
                        .await;
                match outcome {
                    Ok(issue::Outcome::Issued(info)) => {
                        crate::failpoint::hit("issued", &format!("{ns}/{name}"));
                        work.state.issued(n, info.not_before, info.not_after);
                        work.waiting = None;
                        let note = format!(
                            "generation {n}: certificate issued (serial {}, expires {})",
                            info.serial,
                            info.not_after.to_rfc3339()
                        );
                        ctx.event(sk.as_ref(), EventType::Normal, "Issued", note);
                    }
                    Ok(issue::Outcome::Waiting { reason, message }) => {
                        work.waiting = Some(status::Waiting { reason, message });
                        commit(&ctx, &sk, &ns, &mut work, &policy, now).await?;
                        break Action::requeue(POLL);
                    }
                    Err(e) => {
                        let reason = e.reason();
                        work.state.failed(&policy, reason, now);
                        ctx.metrics
                            .signing_key_failures
                            .with_label_values(&[ns.as_str(), sk.name_any().as_str(), reason])
                            .inc();
                        tracing::warn!(error = %e, generation = n, reason, "issuing failed; retrying with backoff");
                        let note = format!("generation {n}: {e}; retrying with backoff");
                        ctx.event(sk.as_ref(), EventType::Warning, reason, note);
                        commit(&ctx, &sk, &ns, &mut work, &policy, now).await?;
                        let at = work.state.backoff.retry_at.unwrap_or(now);
                        break Action::requeue(until(at, now, ctx.resync));
                    }
                }
            }
            Step::Publish(n) => {
                let mut published = work.state.clone();
                published.published(n, now);
                publish::apply(&ctx.client, &sk, &ns, &published, &work.details)
                    .await
                    .map_err(api("publishing the certificates"))?;
                crate::failpoint::hit("published", &format!("{ns}/{name}"));
                work.state = published;
                let note = format!(
                    "generation {n}: certificate published in Secret {} and ConfigMap {}",
                    publish::secret_name(&sk),
                    publish::index_name(&sk)
                );
                ctx.event(sk.as_ref(), EventType::Normal, "Published", note);
            }
            Step::Activate(n) => {
                let emergency = work.state.next.as_ref().is_some_and(|g| g.emergency);
                let first = work.state.current.is_none();
                work.state.activated(n);
                commit(&ctx, &sk, &ns, &mut work, &policy, now).await?;
                crate::failpoint::hit("activated", &format!("{ns}/{name}"));
                let kind = match (first, emergency) {
                    (true, _) => "Initial",
                    (false, true) => "Emergency",
                    (false, false) => "Scheduled",
                };
                ctx.metrics
                    .signing_key_rotations
                    .with_label_values(&[kind])
                    .inc();
                let note = format!(
                    "generation {n} is active; the gateways of the MailDomains using this key roll to it"
                );
                ctx.event(sk.as_ref(), EventType::Normal, "Activated", note);
                tracing::info!(generation = n, kind, "signing key generation activated");
            }
        }
        commit(&ctx, &sk, &ns, &mut work, &policy, now).await?;
    };

    if sk.spec.retired_key_policy == RetiredKeyPolicy::Destroy {
        destroy_retired(&ctx, &sk, &ns, &mut work, &policy, now).await?;
    }
    commit(&ctx, &sk, &ns, &mut work, &policy, now).await?;
    announce_expiring(&ctx, &sk, &old, &work.written).await;
    Ok(action)
}

/// The delay until `at`, at least a second, at most the resync period `resync`.
fn until(at: DateTime<Utc>, now: DateTime<Utc>, resync: Duration) -> Duration {
    (at - now)
        .to_std()
        .unwrap_or_default()
        .clamp(Duration::from_secs(1), resync)
}

/// Writes the status `work` describes, if it changed since the last write.
async fn commit(
    ctx: &Context,
    sk: &SigningKey,
    ns: &str,
    work: &mut Work,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    let mut new = status::with_state(work.written.clone(), &work.state, &work.details, policy);
    new.observed_generation = sk.metadata.generation;
    new.revoked = work.revoked.clone();
    new.pending_action = work.pending_action.clone();
    let (conds, phase) = status::conditions(
        sk,
        &new,
        &work.state,
        Some(policy),
        None,
        work.waiting.as_ref(),
        now,
    );
    new.conditions = conds;
    new.phase = Some(phase);
    write_status(ctx, sk, ns, &work.written, &new).await?;
    work.written = new;
    Ok(())
}

async fn write_status(
    ctx: &Context,
    sk: &SigningKey,
    ns: &str,
    old: &SigningKeyStatus,
    new: &SigningKeyStatus,
) -> Result<(), Error> {
    let keys = Api::<SigningKey>::namespaced(ctx.client.clone(), ns);
    super::status_write::write(&keys, FIELD_MANAGER, &sk.name_any(), old, new)
        .await
        .map_err(api("writing the status"))?;
    Ok(())
}

/// Applies the status as it is under [`FIELD_MANAGER`], then has
/// [`LEGACY_FIELD_MANAGER`] give it up: the status is unchanged, and owned
/// by the current name only.
async fn take_status_over(
    ctx: &Context,
    sk: &SigningKey,
    ns: &str,
    status: &SigningKeyStatus,
) -> Result<(), Error> {
    let keys = Api::<SigningKey>::namespaced(ctx.client.clone(), ns);
    let name = sk.name_any();
    super::status_write::apply(&keys, FIELD_MANAGER, &name, status)
        .await
        .map_err(api("taking the status over"))?;
    handover::release(&keys, &name, LEGACY_FIELD_MANAGER, Part::Status)
        .await
        .map_err(api("releasing the status from the old field manager"))?;
    tracing::info!(
        from = LEGACY_FIELD_MANAGER,
        to = FIELD_MANAGER,
        "status handed over to the current field manager"
    );
    Ok(())
}

/// A declared compromise: record the revocation, tell the issuer, rotate at
/// once if it is the key in use.
async fn revoke(
    ctx: &Context,
    sk: &SigningKey,
    ns: &str,
    work: &mut Work,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    let Some(r) = &sk.spec.revoke else {
        return Ok(());
    };
    let Ok(n) = u32::try_from(r.generation) else {
        return Ok(());
    };
    let Some(detail) = work.details.get(&n).filter(|d| d.certificate.is_some()) else {
        let note = format!(
            "spec.revoke.generation {n} names no issued generation of this key (see status.current.generation)"
        );
        ctx.event(sk, EventType::Warning, "RevokeUnknownGeneration", note);
        return Ok(());
    };
    let serial = detail.serial.clone();
    if work.state.current.as_ref().is_some_and(|c| c.number == n) {
        work.state.compromise();
    } else if !work.state.revoked.contains(&n) {
        work.state.revoked.push(n);
    }
    work.revoked.push(RevokedCertificate {
        generation: i64::from(n),
        serial: serial.clone(),
        revoked_at: to_k8s(now),
        reason: r.reason,
    });
    if sk.spec.issuer.ca.is_some() {
        publish::crl(&ctx.client, sk, ns, &work.revoked, now).await?;
    } else if let Some(ext) = &sk.spec.issuer.external {
        work.pending_action = Some(format!(
            "ask the CA that signed the certificate in Secret {} to revoke serial {} ({:?})",
            ext.certificate_secret_name,
            serial.as_deref().unwrap_or("?"),
            r.reason
        ));
    } else if sk.spec.issuer.cert_manager.is_some() {
        work.pending_action = Some(format!(
            "ask the issuer of CertificateRequest {} to revoke serial {} ({:?})",
            issue::request_name(sk, n),
            serial.as_deref().unwrap_or("?"),
            r.reason
        ));
    }
    publish::apply(&ctx.client, sk, ns, &work.state, &work.details)
        .await
        .map_err(api("withdrawing the revoked certificate"))?;
    ctx.metrics.signing_key_revocations.inc();
    let note = format!(
        "generation {n} (serial {}) revoked ({:?}); rotating at once without the publication delay",
        serial.as_deref().unwrap_or("?"),
        r.reason
    );
    tracing::warn!(generation = n, reason = ?r.reason, "certificate revoked");
    ctx.event(sk, EventType::Warning, "Revoked", note);
    commit(ctx, sk, ns, work, policy, now).await
}

/// `retiredKeyPolicy: Destroy`: destroys the retired generation's key once
/// every MailDomain using this key runs the current generation.
async fn destroy_retired(
    ctx: &Context,
    sk: &SigningKey,
    ns: &str,
    work: &mut Work,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    let (Some(previous), Some(current)) = (&work.state.previous, &work.state.current) else {
        return Ok(());
    };
    let n = previous.number;
    if work.details.get(&n).is_some_and(|d| d.key_destroyed) {
        return Ok(());
    }
    let users = users(ctx, sk, ns).await?;
    let rolled = users.iter().all(|md| {
        md.status
            .as_ref()
            .and_then(|s| s.signing_key_generation)
            .is_some_and(|g| g >= i64::from(current.number))
    });
    if !rolled {
        return Ok(());
    }
    match destroy_keys(ctx, sk, [n]).await {
        Ok(()) => {
            work.details.entry(n).or_default().key_destroyed = true;
            let note = format!("generation {n}: retired key destroyed in the token");
            // In the log too, beside the Event (which expires): when a key
            // left the token is part of the record.
            tracing::info!(generation = n, "{note}");
            ctx.event(sk, EventType::Normal, "KeyDestroyed", note);
            commit(ctx, sk, ns, work, policy, now).await
        }
        Err(e) => {
            tracing::warn!(error = %e, generation = n, "destroying a retired key failed; will retry");
            Ok(())
        }
    }
}

async fn destroy_keys(
    ctx: &Context,
    sk: &SigningKey,
    generations: impl IntoIterator<Item = u32>,
) -> Result<(), issue::IssueError> {
    let hsm = ctx.hsm.clone().ok_or(issue::IssueError::NoModule)?;
    let pin = issue::pin(&ctx.client, sk).await?;
    let label = sk.spec.hsm.token_label.clone();
    let uid = sk.uid().unwrap_or_default();
    let ids: Vec<Vec<u8>> = generations.into_iter().map(|n| key_id(&uid, n)).collect();
    tokio::task::spawn_blocking(move || {
        let token = hsm.login(&label, &pin)?;
        for id in ids {
            token.destroy(&id)?;
        }
        Ok::<_, issue::IssueError>(())
    })
    .await
    .map_err(|e| issue::IssueError::Task(e.to_string()))?
}

/// The MailDomains of `sk`'s namespace that name it and are not being deleted.
async fn users(ctx: &Context, sk: &SigningKey, ns: &str) -> Result<Vec<MailDomain>, Error> {
    let name = sk.name_any();
    Ok(Api::<MailDomain>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(api("listing MailDomains"))?
        .items
        .into_iter()
        .filter(|md| {
            md.metadata.deletion_timestamp.is_none()
                && md.spec.signing_key_ref.as_deref() == Some(name.as_str())
        })
        .collect())
}

/// Deletion: refused while a MailDomain uses the key; otherwise keys are
/// destroyed or kept as `retiredKeyPolicy` says, and the finalizer goes.
async fn finalize(sk: &SigningKey, ctx: &Context, ns: &str) -> Result<Action, Error> {
    if !sk.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let users = users(ctx, sk, ns).await?;
    let old = sk.status.clone().unwrap_or_default();
    if !users.is_empty() {
        let names: Vec<String> = users.iter().map(|m| m.name_any()).collect();
        let message = format!(
            "deletion refused: still used by MailDomain {}; point their spec.signingKeyRef elsewhere or delete them first",
            names.join(", ")
        );
        let mut new = old.clone();
        let mut conds: Vec<_> = old
            .conditions
            .iter()
            .filter(|c| c.type_ != status::READY)
            .cloned()
            .collect();
        conds.extend(conditions::merge(
            &old.conditions,
            &[conditions::Verdict::new(
                status::READY,
                false,
                "InUse",
                message.clone(),
            )],
            sk.metadata.generation,
            ctx.clock.now(),
        ));
        new.conditions = conds;
        if new != old {
            ctx.event(sk, EventType::Warning, "DeletionRefused", message);
        }
        write_status(ctx, sk, ns, &old, &new).await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    if sk.spec.retired_key_policy == RetiredKeyPolicy::Destroy {
        let highest = status::details(&old).into_keys().max().unwrap_or(0);
        if let Err(e) = destroy_keys(ctx, sk, 1..=highest).await {
            // The PIN Secret or token may be gone with the namespace: say
            // which keys are left rather than block the deletion forever.
            let note = format!(
                "could not destroy the keys of generations 1-{highest} ({}); they remain in token {}",
                e.reason(),
                sk.spec.hsm.token_label
            );
            ctx.event(sk, EventType::Warning, "KeysLeftInToken", note);
        }
    }
    // The key's certificates leave the platform's trust with it (its index
    // ConfigMap goes with it by garbage collection). Best effort: the
    // namespace may be going away too.
    if let Err(e) = publish::platform(&ctx.client, ns, Some(&publish::index_name(sk))).await {
        tracing::warn!(error = %e, "rewriting the platform providers failed");
    }
    let keys = Api::<SigningKey>::namespaced(ctx.client.clone(), ns);
    finalizer::remove(&keys, sk, FINALIZER)
        .await
        .map_err(api("removing the finalizer"))?;
    Ok(Action::await_change())
}

/// An Event when the active certificate starts expiring without a successor.
async fn announce_expiring(
    ctx: &Context,
    sk: &SigningKey,
    old: &SigningKeyStatus,
    new: &SigningKeyStatus,
) {
    let was = conditions::is_true(&old.conditions, status::EXPIRING);
    if let Some(c) = conditions::find(&new.conditions, status::EXPIRING)
        && c.status == "True"
        && !was
    {
        ctx.event(sk, EventType::Warning, status::EXPIRING, c.message.clone());
    }
}

fn error_policy(obj: Arc<SigningKey>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry_after_error(
        CONTROLLER,
        obj.as_ref(),
        error,
        error.reason(),
        Duration::from_secs(10),
    )
}

/// Runs the SigningKey controller until shutdown.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let controller = Controller::new(Api::<SigningKey>::all(client.clone()), Config::default());
    ctx.metrics.install(
        "certificates",
        metrics::CertificateCollector::new(controller.store()),
    );
    let owned = || {
        Config::default().labels(&format!(
            "app.kubernetes.io/managed-by={}",
            super::MANAGED_BY
        ))
    };
    controller
        .owns(Api::<ConfigMap>::all(client.clone()), owned())
        // A MailDomain naming a key (or no longer naming it) matters to its
        // deletion and to destroying retired keys.
        .watches(
            Api::<MailDomain>::all(client.clone()),
            Config::default(),
            |md: MailDomain| {
                let ns = md.namespace()?;
                let key = md.spec.signing_key_ref.as_ref()?;
                Some(ObjectRef::<SigningKey>::new(key).within(&ns))
            },
        )
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
