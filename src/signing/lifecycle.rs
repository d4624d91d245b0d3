//! The lifecycle of a signing key's generations: `Pending` -> `Issued` ->
//! `Published` -> `Active` -> `Retired`.
//!
//! A new generation starts at the current certificate's renewal time (or at
//! once for an emergency rotation after a compromise). Its certificate is
//! published (for the providers' index) and only after the publication delay
//! do the gateways switch to it, so other providers can verify the new
//! signatures first; an emergency rotation skips the delay. A failure never
//! touches the active generation: the step is retried with an exponential
//! backoff kept in [`KeyState`], and a certificate that gets within
//! `renewBefore` of expiry without a successor is `Expiring`.

use chrono::{DateTime, Duration, Utc};

/// Where one key generation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Key being made in the HSM, certificate being requested.
    Pending,
    /// Certificate issued, not yet published.
    Issued,
    /// Certificate published; waiting out the publication delay.
    Published,
    /// The gateways sign with it.
    Active,
    /// Replaced by a newer generation.
    Retired,
}

/// One generation of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// 1, 2, 3, ...
    pub number: u32,
    /// Its phase.
    pub phase: Phase,
    /// Certificate validity, once issued.
    pub not_before: Option<DateTime<Utc>>,
    /// Certificate expiry, once issued.
    pub not_after: Option<DateTime<Utc>>,
    /// When it was published.
    pub published_at: Option<DateTime<Utc>>,
    /// Made in an emergency (compromise): no publication delay.
    pub emergency: bool,
}

impl Generation {
    fn pending(number: u32, emergency: bool) -> Self {
        Self {
            number,
            phase: Phase::Pending,
            not_before: None,
            not_after: None,
            published_at: None,
            emergency,
        }
    }
}

/// Retry state of the step in progress; data, so it can live in status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Backoff {
    /// Failures in a row.
    pub failures: u32,
    /// Not before this instant.
    pub retry_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed (a bounded reason).
    pub reason: Option<String>,
}

/// Everything the lifecycle decides from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyState {
    /// The generation in use.
    pub current: Option<Generation>,
    /// The generation on its way in.
    pub next: Option<Generation>,
    /// The generation last retired.
    pub previous: Option<Generation>,
    /// Retry state of the step in progress.
    pub backoff: Backoff,
    /// Generations whose certificates were revoked.
    pub revoked: Vec<u32>,
}

/// The rotation policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Certificate lifetime.
    pub duration: Duration,
    /// Start renewing this long before expiry.
    pub renew_before: Duration,
    /// Publish a new certificate this long before the gateways use it.
    pub publication_delay: Duration,
    /// First retry delay after a failure; doubles each time.
    pub backoff_base: Duration,
    /// The longest retry delay.
    pub backoff_max: Duration,
}

impl Policy {
    /// Why the policy cannot work, if it cannot: renewal must come before
    /// expiry and leave time to publish the successor.
    pub fn problem(&self) -> Option<String> {
        if self.renew_before >= self.duration {
            return Some("renewBefore must be shorter than certificate.duration".into());
        }
        if self.renew_before <= self.publication_delay {
            return Some("renewBefore must be longer than publication.delay, or a new certificate could not be published before the old one expires".into());
        }
        None
    }

    /// When a generation's certificate should be replaced.
    pub fn renewal_time(&self, g: &Generation) -> Option<DateTime<Utc>> {
        g.not_after.map(|end| end - self.renew_before)
    }

    fn backoff_delay(&self, failures: u32) -> Duration {
        let factor = 2i32.saturating_pow(failures.saturating_sub(1).min(30));
        (self.backoff_base * factor).min(self.backoff_max)
    }
}

/// What the controller should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Make the key of generation `n` in the HSM (idempotent) and get its certificate.
    Issue(u32),
    /// Publish the certificate of generation `n` (Secret and index ConfigMap).
    Publish(u32),
    /// Point the gateways at generation `n`; the current one retires.
    Activate(u32),
    /// Nothing to do before this instant.
    WaitUntil(DateTime<Utc>),
}

/// Decides the next step at `now`. `compromised` asks for an emergency rotation.
pub fn decide(state: &KeyState, policy: &Policy, now: DateTime<Utc>) -> Step {
    if let Some(at) = state.backoff.retry_at
        && now < at
    {
        return Step::WaitUntil(at);
    }
    if let Some(next) = &state.next {
        return match next.phase {
            Phase::Pending => Step::Issue(next.number),
            Phase::Issued => Step::Publish(next.number),
            Phase::Published => {
                let ready = next.emergency
                    || state.current.is_none()
                    || next
                        .published_at
                        .is_some_and(|p| now >= p + policy.publication_delay);
                if ready {
                    Step::Activate(next.number)
                } else {
                    Step::WaitUntil(next.published_at.unwrap_or(now) + policy.publication_delay)
                }
            }
            // Not reachable through the transitions below; nothing to do.
            Phase::Active | Phase::Retired => Step::WaitUntil(now + policy.backoff_max),
        };
    }
    match state.current.as_ref().and_then(|c| policy.renewal_time(c)) {
        Some(renew) if now < renew => Step::WaitUntil(renew),
        _ => Step::Issue(state.current.as_ref().map_or(1, |c| c.number + 1)),
    }
}

impl KeyState {
    /// Starts generation `n` if it is not under way yet (the Issue step).
    pub fn begin(&mut self, n: u32) {
        if self.next.as_ref().is_none_or(|g| g.number != n) {
            self.next = Some(Generation::pending(n, false));
        }
    }

    /// The compromise of the current generation: revoke it and rotate at once.
    pub fn compromise(&mut self) {
        if let Some(current) = &self.current
            && !self.revoked.contains(&current.number)
        {
            self.revoked.push(current.number);
            let n = self.next.as_ref().map_or(current.number + 1, |g| g.number);
            let mut next = self
                .next
                .take()
                .unwrap_or_else(|| Generation::pending(n, true));
            next.emergency = true;
            self.next = Some(next);
            self.backoff = Backoff::default();
        }
    }

    /// The certificate of generation `n` was issued.
    pub fn issued(&mut self, n: u32, not_before: DateTime<Utc>, not_after: DateTime<Utc>) {
        if let Some(next) = self.next.as_mut().filter(|g| g.number == n) {
            next.phase = Phase::Issued;
            next.not_before = Some(not_before);
            next.not_after = Some(not_after);
            self.backoff = Backoff::default();
        }
    }

    /// The certificate of generation `n` was published at `now`.
    pub fn published(&mut self, n: u32, now: DateTime<Utc>) {
        if let Some(next) = self.next.as_mut().filter(|g| g.number == n) {
            next.phase = Phase::Published;
            next.published_at = Some(now);
            self.backoff = Backoff::default();
        }
    }

    /// The gateways now sign with generation `n`.
    pub fn activated(&mut self, n: u32) {
        if self.next.as_ref().is_some_and(|g| g.number == n) {
            if let Some(mut old) = self.current.take() {
                old.phase = Phase::Retired;
                self.previous = Some(old);
            }
            self.current = self.next.take().map(|mut g| {
                g.phase = Phase::Active;
                g
            });
            self.backoff = Backoff::default();
        }
    }

    /// The step failed with `reason`: retry later, never touching the active generation.
    pub fn failed(&mut self, policy: &Policy, reason: &str, now: DateTime<Utc>) {
        let failures = self.backoff.failures + 1;
        self.backoff = Backoff {
            failures,
            retry_at: Some(now + policy.backoff_delay(failures)),
            reason: Some(reason.to_string()),
        };
    }

    /// The active certificate is within `renewBefore` of expiry and has no
    /// issued successor yet (the renewal is late or failing): say so
    /// (condition, Event, metric). A successor waiting out its publication
    /// delay is a normal rotation, not an alarm.
    pub fn expiring(&self, policy: &Policy, now: DateTime<Utc>) -> bool {
        self.current
            .as_ref()
            .and_then(|c| c.not_after)
            .is_some_and(|end| {
                end - now <= policy.renew_before
                    && self.next.as_ref().is_none_or(|n| n.phase == Phase::Pending)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    fn policy() -> Policy {
        Policy {
            duration: Duration::days(730),
            renew_before: Duration::days(60),
            publication_delay: Duration::hours(24),
            backoff_base: Duration::seconds(30),
            backoff_max: Duration::hours(1),
        }
    }

    fn start() -> DateTime<Utc> {
        DateTime::from_timestamp(1_767_225_600, 0).expect("valid")
    }

    /// A controller stand-in: performs each decided step, with `fail` deciding
    /// whether an issue attempt fails. Returns the steps taken.
    fn drive(
        state: &mut KeyState,
        clock: &ManualClock,
        until: DateTime<Utc>,
        mut fail: impl FnMut(u32, DateTime<Utc>) -> bool,
    ) -> Vec<Step> {
        let mut taken = Vec::new();
        while clock.now() < until {
            let now = clock.now();
            let step = decide(state, &policy(), now);
            match &step {
                Step::WaitUntil(at) => {
                    clock.advance((*at - now).max(Duration::seconds(1)).min(until - now))
                }
                Step::Issue(n) => {
                    state.begin(*n);
                    if fail(*n, now) {
                        state.failed(&policy(), "IssuerUnavailable", now);
                    } else {
                        state.issued(*n, now, now + policy().duration);
                    }
                }
                Step::Publish(n) => state.published(*n, now),
                Step::Activate(n) => state.activated(*n),
            }
            if !matches!(step, Step::WaitUntil(_)) {
                taken.push(step);
            }
        }
        taken
    }

    #[test]
    fn two_full_rotations_over_simulated_years() {
        let clock = ManualClock::new(start());
        let mut state = KeyState::default();
        let steps = drive(
            &mut state,
            &clock,
            start() + Duration::days(365 * 4),
            |_, _| false,
        );
        // Generation 1 at once, 2 at 730-60 days, 3 at (670 + 1) + 670 days.
        assert_eq!(
            steps,
            [
                Step::Issue(1),
                Step::Publish(1),
                Step::Activate(1),
                Step::Issue(2),
                Step::Publish(2),
                Step::Activate(2),
                Step::Issue(3),
                Step::Publish(3),
                Step::Activate(3),
            ]
        );
        let current = state.current.clone().expect("active");
        assert_eq!((current.number, current.phase), (3, Phase::Active));
        assert_eq!(
            state.previous.as_ref().map(|g| (g.number, g.phase)),
            Some((2, Phase::Retired))
        );
        // Each renewal starts renewBefore (60 days) before its certificate expires.
        let g3_issue = current.not_before.expect("issued");
        assert_eq!(
            g3_issue,
            start() + Duration::days(670) + Duration::days(670)
        );
        let g2 = state
            .previous
            .as_ref()
            .and_then(|g| g.not_after)
            .expect("g2 expiry");
        assert!(
            g3_issue + policy().publication_delay < g2,
            "the successor is active before the old certificate expires"
        );
    }

    /// A key whose first generation was issued, published and activated at `t0`.
    fn active_first_generation(t0: DateTime<Utc>) -> KeyState {
        let mut state = KeyState::default();
        state.begin(1);
        state.issued(1, t0, t0 + policy().duration);
        state.published(1, t0);
        state.activated(1);
        state
    }

    #[test]
    fn a_new_certificate_is_used_only_after_the_publication_delay() {
        let t0 = start();
        let mut state = active_first_generation(t0);
        let renew = t0 + policy().duration - policy().renew_before;
        assert_eq!(decide(&state, &policy(), renew), Step::Issue(2));
        state.begin(2);
        state.issued(2, renew, renew + policy().duration);
        state.published(2, renew);
        assert_eq!(
            decide(&state, &policy(), renew + Duration::hours(23)),
            Step::WaitUntil(renew + Duration::hours(24))
        );
        assert_eq!(
            decide(&state, &policy(), renew + Duration::hours(24)),
            Step::Activate(2)
        );
    }

    #[test]
    fn failures_back_off_exponentially_and_never_touch_the_active_key() {
        let clock = ManualClock::new(start());
        let mut state = KeyState::default();
        drive(&mut state, &clock, start() + Duration::days(1), |_, _| {
            false
        });
        let renew = start() + Duration::days(670);
        clock.advance(renew - clock.now());
        let mut attempts = Vec::new();
        drive(&mut state, &clock, renew + Duration::hours(2), |n, now| {
            attempts.push(now);
            n == 2 && attempts.len() <= 8
        });
        let gaps: Vec<i64> = attempts
            .windows(2)
            .map(|w| (w[1] - w[0]).num_seconds())
            .collect();
        assert_eq!(gaps, [30, 60, 120, 240, 480, 960, 1920]);
        assert_eq!(state.backoff.reason.as_deref(), Some("IssuerUnavailable"));
        assert_eq!(
            state.current.as_ref().map(|g| (g.number, g.phase)),
            Some((1, Phase::Active)),
            "failures leave the active key alone"
        );
        let steps = drive(&mut state, &clock, renew + Duration::days(2), |n, _| {
            attempts.push(clock.now());
            n == 2 && attempts.len() <= 8
        });
        let last: Vec<i64> = attempts
            .windows(2)
            .map(|w| (w[1] - w[0]).num_seconds())
            .skip(7)
            .collect();
        assert_eq!(last, [3600], "capped at backoffMax");
        assert_eq!(
            state.current.as_ref().map(|g| (g.number, g.phase)),
            Some((2, Phase::Active))
        );
        assert!(steps.contains(&Step::Activate(2)));
    }

    #[test]
    fn a_failure_schedules_the_retry_from_the_backoff_state_alone() {
        // The state is plain data; that it survives a restart through the
        // status subresource is checked by the status round-trip test of the
        // SigningKey controller.
        let mut state = KeyState::default();
        state.begin(1);
        state.failed(&policy(), "HsmLoginFailed", start());
        let restored = state;
        assert_eq!(
            decide(&restored, &policy(), start() + Duration::seconds(10)),
            Step::WaitUntil(start() + Duration::seconds(30))
        );
        assert_eq!(
            decide(&restored, &policy(), start() + Duration::seconds(30)),
            Step::Issue(1)
        );
    }

    #[test]
    fn a_compromise_rotates_at_once_without_the_publication_delay() {
        let t0 = start();
        let mut state = active_first_generation(t0);
        let later = t0 + Duration::days(100);
        state.compromise();
        assert_eq!(state.revoked, [1]);
        assert_eq!(decide(&state, &policy(), later), Step::Issue(2));
        state.issued(2, later, later + policy().duration);
        state.published(2, later);
        assert_eq!(
            decide(&state, &policy(), later),
            Step::Activate(2),
            "no publication delay in an emergency"
        );
        state.activated(2);
        assert_eq!(state.previous.as_ref().map(|g| g.number), Some(1));
    }

    #[test]
    fn expiring_when_close_to_expiry_without_a_successor() {
        let t0 = start();
        let state = active_first_generation(t0);
        assert!(!state.expiring(&policy(), t0 + Duration::days(600)));
        assert!(state.expiring(&policy(), t0 + Duration::days(700)));
        let mut failing = state.clone();
        failing.begin(2);
        failing.failed(&policy(), "IssuerRefused", t0 + Duration::days(700));
        assert!(
            failing.expiring(&policy(), t0 + Duration::days(700)),
            "a failing renewal is no successor"
        );
        let mut issued = failing;
        let t = t0 + Duration::days(701);
        issued.issued(2, t, t + policy().duration);
        assert!(
            !issued.expiring(&policy(), t),
            "an issued successor on its way in is a normal rotation"
        );
    }

    #[test]
    fn policies_that_cannot_work_are_named() {
        let mut p = policy();
        p.renew_before = Duration::days(800);
        assert!(
            p.problem()
                .is_some_and(|m| m.contains("shorter than certificate.duration"))
        );
        let mut p = policy();
        p.publication_delay = Duration::days(61);
        assert!(p.problem().is_some_and(|m| m.contains("publication.delay")));
        assert_eq!(policy().problem(), None);
    }
}
