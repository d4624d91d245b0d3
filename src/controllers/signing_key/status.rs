//! Pure translation between the SigningKey status and the lifecycle state,
//! the policy read from the spec, and the conditions.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};

use crate::{
    api::{BackoffStatus, KeyGeneration, SigningKey, SigningKeySpec, SigningKeyStatus},
    conditions::{self, Verdict},
    signing::lifecycle::{Backoff, Generation, KeyState, Phase, Policy},
    sla::evaluate::parse_duration,
    time::{from_k8s, to_k8s},
};

/// Condition: a certificate is active and usable.
pub const READY: &str = "Ready";
/// Condition: a new generation is on its way in.
pub const ISSUING: &str = "Issuing";
/// Condition: the active certificate is within `renewBefore` of expiry without a successor.
pub const EXPIRING: &str = "Expiring";
/// Condition: a certificate of this key was revoked.
pub const REVOKED: &str = "Revoked";

/// Retry delays of failed steps.
const BACKOFF_BASE: Duration = Duration::seconds(30);
const BACKOFF_MAX: Duration = Duration::hours(1);

/// The rotation policy of `spec`, or what to fix.
pub fn policy(spec: &SigningKeySpec) -> Result<Policy, String> {
    let cert = &spec.certificate;
    let duration = parse_duration(&cert.duration)
        .filter(|d| *d > Duration::zero())
        .ok_or("certificate.duration must be a positive duration such as 17520h")?;
    let renew_before = match (&cert.renew_before, cert.renew_before_percentage) {
        (Some(r), None) => {
            parse_duration(r).ok_or("certificate.renewBefore must be a duration such as 1440h")?
        }
        (None, Some(p)) => duration * p / 100,
        _ => {
            return Err(
                "set exactly one of certificate.renewBefore and certificate.renewBeforePercentage"
                    .into(),
            );
        }
    };
    let publication_delay = parse_duration(&spec.publication.delay)
        .ok_or("publication.delay must be a duration such as 24h")?;
    let policy = Policy {
        duration,
        renew_before,
        publication_delay,
        backoff_base: BACKOFF_BASE,
        backoff_max: BACKOFF_MAX,
    };
    match policy.problem() {
        Some(problem) => Err(problem),
        None => Ok(policy),
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "Pending",
        Phase::Issued => "Issued",
        Phase::Published => "Published",
        Phase::Active => "Active",
        Phase::Retired => "Retired",
    }
}

fn phase_of(s: &str) -> Phase {
    match s {
        "Issued" => Phase::Issued,
        "Published" => Phase::Published,
        "Active" => Phase::Active,
        "Retired" => Phase::Retired,
        _ => Phase::Pending,
    }
}

fn generation_of(k: &KeyGeneration) -> Generation {
    Generation {
        number: u32::try_from(k.generation).unwrap_or(0),
        phase: phase_of(&k.phase),
        not_before: k.not_before.as_ref().map(from_k8s),
        not_after: k.not_after.as_ref().map(from_k8s),
        published_at: k.published_at.as_ref().map(from_k8s),
        emergency: k.emergency,
    }
}

/// The lifecycle state recorded in `status`.
pub fn state(status: &SigningKeyStatus) -> KeyState {
    KeyState {
        current: status.current.as_ref().map(generation_of),
        next: status.next.as_ref().map(generation_of),
        previous: status.previous.as_ref().map(generation_of),
        backoff: status
            .backoff
            .as_ref()
            .map(|b| Backoff {
                failures: u32::try_from(b.failures).unwrap_or(0),
                retry_at: b.retry_at.as_ref().map(from_k8s),
                reason: b.reason.clone(),
            })
            .unwrap_or_default(),
        revoked: status
            .revoked
            .iter()
            .filter_map(|r| u32::try_from(r.generation).ok())
            .collect(),
    }
}

/// What status records about each generation beyond its lifecycle (key id,
/// certificate, CSR), by generation number.
pub fn details(status: &SigningKeyStatus) -> BTreeMap<u32, KeyGeneration> {
    [&status.previous, &status.current, &status.next]
        .into_iter()
        .flatten()
        .filter_map(|k| Some((u32::try_from(k.generation).ok()?, k.clone())))
        .collect()
}

fn record(g: &Generation, details: &BTreeMap<u32, KeyGeneration>) -> KeyGeneration {
    let mut k = details.get(&g.number).cloned().unwrap_or_default();
    k.generation = i64::from(g.number);
    k.phase = phase_name(g.phase).into();
    k.not_before = g.not_before.map(to_k8s);
    k.not_after = g.not_after.map(to_k8s);
    k.published_at = g.published_at.map(to_k8s);
    k.emergency = g.emergency;
    k
}

/// `status` with the lifecycle `state` and the generation `details` written in.
pub fn with_state(
    mut status: SigningKeyStatus,
    state: &KeyState,
    details: &BTreeMap<u32, KeyGeneration>,
    policy: &Policy,
) -> SigningKeyStatus {
    status.current = state.current.as_ref().map(|g| record(g, details));
    status.next = state.next.as_ref().map(|g| record(g, details));
    status.previous = state.previous.as_ref().map(|g| record(g, details));
    status.renewal_time = state
        .current
        .as_ref()
        .and_then(|g| policy.renewal_time(g))
        .map(to_k8s);
    status.backoff = (state.backoff != Backoff::default()).then(|| BackoffStatus {
        failures: i32::try_from(state.backoff.failures).unwrap_or(i32::MAX),
        retry_at: state.backoff.retry_at.map(to_k8s),
        reason: state.backoff.reason.clone(),
    });
    status
}

/// Why the step in progress is waiting, when it is not a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// CamelCase reason.
    pub reason: &'static str,
    /// What is awaited, and from whom.
    pub message: String,
}

/// The conditions and summary phase of `sk` whose new status is `status`.
pub fn conditions(
    sk: &SigningKey,
    status: &SigningKeyStatus,
    state: &KeyState,
    policy: Option<&Policy>,
    problem: Option<(&'static str, String)>,
    waiting: Option<&Waiting>,
    now: DateTime<Utc>,
) -> (
    Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    String,
) {
    let expiring = policy.is_some_and(|p| state.expiring(p, now));
    let live = state
        .current
        .as_ref()
        .is_some_and(|c| c.not_after.is_some_and(|end| end > now));
    let ready = match (&problem, live) {
        (Some((reason, message)), _) => Verdict::new(READY, false, reason, message.clone()),
        (None, true) => {
            let c = status.current.as_ref();
            Verdict::new(
                READY,
                true,
                "Active",
                format!(
                    "generation {} is active (serial {})",
                    c.map_or(0, |c| c.generation),
                    c.and_then(|c| c.serial.as_deref()).unwrap_or("?")
                ),
            )
        }
        (None, false) => Verdict::new(
            READY,
            false,
            "NoActiveCertificate",
            "no certificate is active yet",
        ),
    };
    let issuing = match (&state.next, &state.backoff.reason, waiting) {
        (Some(next), Some(reason), _) => Verdict::new(
            ISSUING,
            true,
            "RetryingAfterFailure",
            format!(
                "generation {}: the last attempt failed ({reason}); attempt {} at {}",
                next.number,
                state.backoff.failures + 1,
                state
                    .backoff
                    .retry_at
                    .map_or_else(|| "once possible".to_string(), |t| t.to_rfc3339())
            ),
        ),
        (Some(next), None, Some(w)) => Verdict::new(
            ISSUING,
            true,
            w.reason,
            format!("generation {}: {}", next.number, w.message),
        ),
        (Some(next), None, None) => Verdict::new(
            ISSUING,
            true,
            match next.phase {
                Phase::Pending => "Issuing",
                Phase::Issued => "Publishing",
                _ => "AwaitingPublicationDelay",
            },
            format!("generation {} is {}", next.number, phase_name(next.phase)),
        ),
        (None, _, _) => Verdict::new(ISSUING, false, "Idle", "no rotation in progress"),
    };
    let expiring_v = if expiring {
        Verdict::new(
            EXPIRING,
            true,
            "NoSuccessorBeforeRenewal",
            format!(
                "the active certificate expires at {} and no successor is active",
                state
                    .current
                    .as_ref()
                    .and_then(|c| c.not_after)
                    .map_or_else(String::new, |t| t.to_rfc3339())
            ),
        )
    } else {
        Verdict::new(EXPIRING, false, "NotExpiring", "expiry is not near")
    };
    let revoked = match status.revoked.last() {
        Some(r) => Verdict::new(
            REVOKED,
            true,
            "CertificateRevoked",
            format!(
                "generation {} (serial {}) was revoked: {:?}",
                r.generation,
                r.serial.as_deref().unwrap_or("?"),
                r.reason
            ),
        ),
        None => Verdict::new(REVOKED, false, "NotRevoked", "no certificate was revoked"),
    };
    let phase = if problem.is_some() || state.backoff.failures > 0 {
        "Failed"
    } else if expiring {
        "Expiring"
    } else {
        match (&state.current, &state.next) {
            (None, Some(_)) | (None, None) => "Issuing",
            (Some(_), Some(_)) => "Rotating",
            (Some(_), None) => "Active",
        }
    };
    let conds = conditions::merge(
        &sk.status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default(),
        &[ready, issuing, expiring_v, revoked],
        sk.metadata.generation,
        now,
    );
    (conds, phase.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SigningKeySpec;

    fn spec(yaml: &str) -> SigningKeySpec {
        serde_yaml::from_str(yaml).expect("spec")
    }

    const BASE: &str = r#"
hsm: {tokenLabel: t, pinSecretRef: {name: pin}}
subject: {commonName: pec.example.it}
dnsNames: [pec.example.it]
issuer: {selfSigned: {}}
"#;

    #[test]
    fn renew_before_percentage_is_a_share_of_the_duration() {
        let s = spec(&format!(
            "{BASE}certificate: {{duration: 1000h, renewBeforePercentage: 10}}\n"
        ));
        let p = policy(&s).expect("valid");
        assert_eq!(p.renew_before, Duration::hours(100));
        assert_eq!(p.publication_delay, Duration::hours(24), "default delay");
    }

    #[test]
    fn a_renewal_that_leaves_no_time_to_publish_is_named() {
        let s = spec(&format!(
            "{BASE}certificate: {{duration: 100h, renewBeforePercentage: 10}}\n"
        ));
        let err = policy(&s).expect_err("10h < 24h");
        assert!(err.contains("publication.delay"), "{err}");
    }

    #[test]
    fn status_round_trips_the_lifecycle_state() {
        let s = spec(&format!(
            "{BASE}certificate: {{duration: 100h, renewBefore: 30h}}\n"
        ));
        let p = policy(&s).expect("valid");
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).expect("t");
        let mut st = KeyState::default();
        st.begin(1);
        st.issued(1, t0, t0 + p.duration);
        st.published(1, t0);
        st.activated(1);
        st.begin(2);
        st.failed(&p, "HsmLoginFailed", t0);
        let mut details = BTreeMap::new();
        details.insert(
            1,
            KeyGeneration {
                key_id: "aa".into(),
                serial: Some("01".into()),
                ..Default::default()
            },
        );
        let status = with_state(SigningKeyStatus::default(), &st, &details, &p);
        // Through JSON, as the API server keeps it across an operator restart.
        let stored = serde_json::to_string(&status).expect("serialize");
        let status: SigningKeyStatus = serde_json::from_str(&stored).expect("deserialize");
        assert_eq!(state(&status), st);
        assert_eq!(
            crate::signing::lifecycle::decide(&state(&status), &p, t0 + Duration::seconds(10)),
            crate::signing::lifecycle::Step::WaitUntil(t0 + Duration::seconds(30)),
            "the restored backoff waits out the retry the failure scheduled"
        );
        assert_eq!(
            status.current.as_ref().and_then(|c| c.serial.as_deref()),
            Some("01")
        );
        assert_eq!(
            status.renewal_time.as_ref().map(from_k8s),
            Some(t0 + Duration::hours(70))
        );
        assert_eq!(details_of(&status), vec![1, 2]);
    }

    fn details_of(s: &SigningKeyStatus) -> Vec<u32> {
        details(s).into_keys().collect()
    }
}
