//! A Site's health phase, decided by an ordered list of checks.

use chrono::{DateTime, Duration, Utc};

use crate::{
    api::{SitePhase, SiteSpec, SiteStatus},
    time::{from_k8s, to_k8s},
};

/// What the controller remembers between checks of one site (in memory: a
/// restart begins counting again, which only delays a declaration of Down).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeState {
    /// Failed checks in a row.
    pub consecutive_failures: u32,
    /// When the last counted check ran.
    pub last_check: Option<DateTime<Utc>>,
}

/// Node counts seen by one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// Nodes matching the site's selector.
    pub nodes_total: u32,
    /// Of those, nodes whose Ready condition is True.
    pub nodes_ready: u32,
}

/// The decision for one check.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The new phase.
    pub phase: SitePhase,
    /// Why, for people.
    pub reason: String,
    /// Probe memory to keep.
    pub probe: ProbeState,
    /// When the phase last changed (now if it changed).
    pub last_transition: DateTime<Utc>,
    /// Since when the site has been healthy without interruption.
    pub healthy_since: Option<DateTime<Utc>>,
    /// Recent down transitions within the flap window.
    pub down_events: Vec<DateTime<Utc>>,
    /// The site just flapped too often: the controller sets `spec.fenced`.
    pub fence_now: bool,
}

/// Counted checks may come this much early (a requeue is never exact).
const CHECK_SLACK: Duration = Duration::milliseconds(250);

/// Decides the site's phase for a check at `now`. `maintenance_refused`
/// names the domains that would be left without a site (maintenance is then
/// not entered).
pub fn decide(
    spec: &SiteSpec,
    previous: &SiteStatus,
    probe: ProbeState,
    seen: Observation,
    maintenance_refused: bool,
    now: DateTime<Utc>,
) -> Decision {
    let healthy_now = i64::from(seen.nodes_ready) >= i64::from(spec.health.min_ready_nodes);
    let period = Duration::seconds(i64::from(spec.health.period_seconds));
    let due = probe
        .last_check
        .is_none_or(|t| now - t >= period - CHECK_SLACK);
    let probe = match (healthy_now, due) {
        (true, _) => ProbeState {
            consecutive_failures: 0,
            last_check: if due { Some(now) } else { probe.last_check },
        },
        (false, true) => ProbeState {
            consecutive_failures: probe.consecutive_failures + 1,
            last_check: Some(now),
        },
        (false, false) => probe,
    };
    let before = previous.phase;
    let window = Duration::seconds(i64::from(spec.health.flap_window_seconds));
    let mut down_events: Vec<DateTime<Utc>> = if before == Some(SitePhase::Fenced) && !spec.fenced {
        // A person cleared the fence: the flap history goes with it.
        Vec::new()
    } else {
        previous
            .down_events
            .iter()
            .map(from_k8s)
            .filter(|t| now - *t < window)
            .collect()
    };

    let counts = format!("{}/{} nodes ready", seen.nodes_ready, seen.nodes_total);
    let (mut phase, mut reason) = if spec.fenced {
        let reason = match (before, &previous.phase_reason) {
            (Some(SitePhase::Fenced), Some(r)) => r.clone(),
            _ => "fenced by hand (spec.fenced)".to_string(),
        };
        (SitePhase::Fenced, reason)
    } else if spec.maintenance && !maintenance_refused {
        (
            SitePhase::Maintenance,
            "in maintenance (spec.maintenance)".to_string(),
        )
    } else if i64::from(probe.consecutive_failures) >= i64::from(spec.health.failure_threshold) {
        let reason = format!(
            "{counts}, fewer than minReadyNodes {} for {} checks",
            spec.health.min_ready_nodes, probe.consecutive_failures
        );
        (SitePhase::Down, reason)
    } else if !healthy_now {
        match before {
            // Not declared down until failureThreshold checks have failed.
            Some(p) if p.is_healthy() => (
                p,
                format!(
                    "{counts}; check failing ({} so far)",
                    probe.consecutive_failures
                ),
            ),
            _ => (SitePhase::Down, counts.clone()),
        }
    } else if seen.nodes_ready < seen.nodes_total {
        (SitePhase::Degraded, counts.clone())
    } else {
        (SitePhase::Serving, counts.clone())
    };

    let mut fence_now = false;
    // A flap is a healthy site going down; a new site whose nodes are still
    // registering, or one leaving maintenance, has not flapped.
    if phase == SitePhase::Down && before.is_some_and(SitePhase::is_healthy) {
        down_events.push(now);
        let limit = usize::try_from(spec.health.fence_after_flaps).unwrap_or(0);
        if limit > 0 && down_events.len() >= limit {
            fence_now = true;
            phase = SitePhase::Fenced;
            reason = format!(
                "went down {} times within {}s; fenced until a person sets spec.fenced to false",
                down_events.len(),
                spec.health.flap_window_seconds
            );
        }
    }

    let last_transition = match (before, &previous.last_transition_time) {
        (Some(b), Some(t)) if b == phase => from_k8s(t),
        _ => now,
    };
    // Rounded up to the second the API keeps, so "healthy since" never
    // claims a moment before the site was healthy.
    let healthy_since = if !phase.is_healthy() {
        None
    } else if before.is_some_and(SitePhase::is_healthy) {
        previous
            .healthy_since
            .as_ref()
            .map(from_k8s)
            .or(Some(ceil_second(now)))
    } else {
        Some(ceil_second(now))
    };
    Decision {
        phase,
        reason,
        probe,
        last_transition,
        healthy_since,
        down_events,
        fence_now,
    }
}

fn ceil_second(t: DateTime<Utc>) -> DateTime<Utc> {
    if t.timestamp_subsec_nanos() == 0 {
        t
    } else {
        DateTime::from_timestamp(t.timestamp() + 1, 0).unwrap_or(t)
    }
}

impl Decision {
    /// Writes the decision into a status.
    pub fn apply_to(&self, status: &mut SiteStatus) {
        status.phase = Some(self.phase);
        status.phase_reason = Some(self.reason.clone());
        status.last_transition_time = Some(to_k8s(self.last_transition));
        status.healthy_since = self.healthy_since.map(to_k8s);
        status.down_events = self.down_events.iter().copied().map(to_k8s).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SiteSpec {
        SiteSpec {
            node_selector: [("zone".into(), "a".into())].into(),
            ..SiteSpec::default()
        }
    }

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("valid")
    }

    const UP: Observation = Observation {
        nodes_total: 3,
        nodes_ready: 3,
    };
    const DOWN: Observation = Observation {
        nodes_total: 3,
        nodes_ready: 0,
    };

    /// Runs checks every `period` seconds from `start`, feeding each result back.
    fn run(
        spec: &SiteSpec,
        mut status: SiteStatus,
        mut probe: ProbeState,
        seen: &[(i64, Observation)],
    ) -> (SiteStatus, ProbeState, Vec<Decision>) {
        let mut out = Vec::new();
        for &(at, obs) in seen {
            let d = decide(spec, &status, probe, obs, false, t(at));
            d.apply_to(&mut status);
            probe = d.probe;
            out.push(d);
        }
        (status, probe, out)
    }

    #[test]
    fn a_healthy_site_serves() {
        let d = decide(
            &spec(),
            &SiteStatus::default(),
            ProbeState::default(),
            UP,
            false,
            t(0),
        );
        assert_eq!(d.phase, SitePhase::Serving);
        assert_eq!(d.healthy_since, Some(t(0)));
    }

    #[test]
    fn declares_down_only_after_failure_threshold_checks() {
        let (_, _, ds) = run(
            &spec(),
            SiteStatus::default(),
            ProbeState::default(),
            &[(0, UP), (2, DOWN), (4, DOWN), (6, DOWN)],
        );
        let phases: Vec<SitePhase> = ds.iter().map(|d| d.phase).collect();
        assert_eq!(
            phases,
            [
                SitePhase::Serving,
                SitePhase::Serving,
                SitePhase::Serving,
                SitePhase::Down
            ]
        );
    }

    #[test]
    fn checks_closer_than_the_period_do_not_count() {
        // Node events may trigger extra reconciles; only one check per period counts.
        let (_, _, ds) = run(
            &spec(),
            SiteStatus::default(),
            ProbeState::default(),
            &[(0, UP), (2, DOWN), (2, DOWN), (3, DOWN)],
        );
        assert!(ds.iter().all(|d| d.phase == SitePhase::Serving));
        assert_eq!(ds[3].probe.consecutive_failures, 1);
    }

    #[test]
    fn keeps_healthy_since_while_healthy_and_resets_it_after_an_outage() {
        let (status, _, ds) = run(
            &spec(),
            SiteStatus::default(),
            ProbeState::default(),
            &[(0, UP), (2, UP), (4, DOWN), (6, DOWN), (8, DOWN), (10, UP)],
        );
        assert_eq!(ds[1].healthy_since, Some(t(0)));
        assert_eq!(ds[4].healthy_since, None);
        assert_eq!(status.healthy_since.as_ref().map(from_k8s), Some(t(10)));
    }

    #[test]
    fn healthy_since_is_rounded_up_to_the_second_the_api_keeps() {
        let now = t(0) + Duration::milliseconds(400);
        let d = decide(
            &spec(),
            &SiteStatus::default(),
            ProbeState::default(),
            UP,
            false,
            now,
        );
        assert_eq!(d.healthy_since, Some(t(1)));
    }

    #[test]
    fn some_nodes_down_is_degraded_not_down() {
        let d = decide(
            &spec(),
            &SiteStatus::default(),
            ProbeState::default(),
            Observation {
                nodes_total: 3,
                nodes_ready: 1,
            },
            false,
            t(0),
        );
        assert_eq!(d.phase, SitePhase::Degraded);
    }

    #[test]
    fn fences_a_site_that_flaps() {
        let mut seen = vec![(0, UP)];
        for flap in 0..3 {
            let base = 10 + flap * 20;
            seen.extend([
                (base, DOWN),
                (base + 2, DOWN),
                (base + 4, DOWN),
                (base + 6, UP),
            ]);
        }
        let (_, _, ds) = run(&spec(), SiteStatus::default(), ProbeState::default(), &seen);
        assert_eq!(ds.iter().filter(|d| d.fence_now).count(), 1);
        let fenced_at = ds.iter().position(|d| d.fence_now).expect("fenced");
        assert_eq!(ds[fenced_at].phase, SitePhase::Fenced);
    }

    #[test]
    fn a_new_site_that_starts_not_ready_has_not_flapped() {
        let mut s = spec();
        s.health.fence_after_flaps = 2;
        let (status, _, ds) = run(
            &s,
            SiteStatus::default(),
            ProbeState::default(),
            &[(0, DOWN), (2, UP), (4, DOWN), (6, DOWN), (8, DOWN)],
        );
        assert_eq!(ds[0].phase, SitePhase::Down);
        assert!(ds.iter().all(|d| !d.fence_now), "only one real flap so far");
        assert_eq!(status.down_events.len(), 1);
    }

    #[test]
    fn a_fenced_site_stays_fenced_until_cleared_then_forgets_its_flaps() {
        let mut fenced = spec();
        fenced.fenced = true;
        let status = SiteStatus {
            phase: Some(SitePhase::Fenced),
            down_events: vec![to_k8s(t(0)), to_k8s(t(20)), to_k8s(t(40))],
            ..SiteStatus::default()
        };
        let d = decide(&fenced, &status, ProbeState::default(), UP, false, t(60));
        assert_eq!(d.phase, SitePhase::Fenced);
        let cleared = decide(&spec(), &status, ProbeState::default(), UP, false, t(70));
        assert_eq!(cleared.phase, SitePhase::Serving);
        assert!(cleared.down_events.is_empty());
        assert_eq!(cleared.healthy_since, Some(t(70)));
    }

    #[test]
    fn flaps_outside_the_window_are_forgotten() {
        let status = SiteStatus {
            phase: Some(SitePhase::Serving),
            down_events: vec![to_k8s(t(0)), to_k8s(t(10))],
            ..SiteStatus::default()
        };
        let probe = ProbeState {
            consecutive_failures: 2,
            last_check: Some(t(2000)),
        };
        let d = decide(&spec(), &status, probe, DOWN, false, t(2002));
        assert_eq!(d.phase, SitePhase::Down);
        assert_eq!(d.down_events, vec![t(2002)]);
        assert!(!d.fence_now);
    }

    #[test]
    fn maintenance_is_entered_unless_refused() {
        let mut s = spec();
        s.maintenance = true;
        let entered = decide(
            &s,
            &SiteStatus::default(),
            ProbeState::default(),
            UP,
            false,
            t(0),
        );
        assert_eq!(entered.phase, SitePhase::Maintenance);
        assert_eq!(entered.healthy_since, None);
        let refused = decide(
            &s,
            &SiteStatus::default(),
            ProbeState::default(),
            UP,
            true,
            t(0),
        );
        assert_eq!(refused.phase, SitePhase::Serving);
    }
}
