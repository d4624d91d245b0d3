//! From a ledger and the targets to what SREs read: availability with its
//! bounds, budget total, used and left, the longest outage against the
//! single-outage cap, a projection for the period's end, and a state.
//! Also the round trip between a ledger and the status that persists it.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;

use super::{
    ledger::{Ledger, Outage, PeriodRecord},
    period::{Period, budget_millis},
};
use crate::{
    api::{OutageStatus, PeriodStatus, SlaObjectStatus, SlaTargetSpec},
    time::{from_k8s, to_k8s},
};

/// The state of an object against its SLA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// On track.
    Met,
    /// Budget burning faster than the period allows, or an ongoing outage past half the cap.
    AtRisk,
    /// Budget exceeded, or an outage longer than the cap.
    Breached,
}

impl State {
    /// The name used in status and conditions.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Met => "Met",
            State::AtRisk => "AtRisk",
            State::Breached => "Breached",
        }
    }
}

/// The targets of an SlaTarget, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Targets {
    /// Objective in percent.
    pub objective: f64,
    /// Share of the budget one outage may use.
    pub single_outage_fraction: f64,
    /// Recovery time objective.
    pub rto: Duration,
    /// Recovery point objective.
    pub rpo: Duration,
}

/// Why a spec cannot be measured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Not an IANA time zone.
    #[error("timeZone {0:?} is not an IANA time zone name such as Europe/Rome")]
    TimeZone(String),
    /// Not a duration.
    #[error("{field} {value:?} is not a duration such as 4h, 90m or 0s")]
    Duration {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
    },
}

impl Targets {
    /// Parses the targets and time zone of `spec`.
    pub fn parse(spec: &SlaTargetSpec) -> Result<(Self, Tz), SpecError> {
        let tz: Tz = spec
            .time_zone
            .parse()
            .map_err(|_| SpecError::TimeZone(spec.time_zone.clone()))?;
        let duration = |field: &'static str, value: &str| {
            parse_duration(value).ok_or_else(|| SpecError::Duration {
                field,
                value: value.to_string(),
            })
        };
        Ok((
            Self {
                objective: spec.objective,
                single_outage_fraction: spec.single_outage_budget_fraction,
                rto: duration("rto", &spec.rto)?,
                rpo: duration("rpo", &spec.rpo)?,
            },
            tz,
        ))
    }

    /// The single-outage cap of `period`, in milliseconds.
    pub fn cap_millis(&self, period: &Period) -> i64 {
        (budget_millis(period, self.objective) as f64 * self.single_outage_fraction).round() as i64
    }

    /// The provider's published targets contradict each other when an outage
    /// using the whole RTO already breaks the single-outage cap: say so, with
    /// the numbers (a warning, not a refusal).
    pub fn inconsistency(&self, period: &Period) -> Option<String> {
        let cap = self.cap_millis(period);
        (self.rto.num_milliseconds() > cap).then(|| {
            format!(
                "rto {} exceeds the single-outage cap of {} ({}% of the {:.1}-day period's {} budget): an outage that uses the whole RTO breaks the cap",
                human(self.rto.num_milliseconds()),
                human(cap),
                self.single_outage_fraction * 100.0,
                period.length().num_seconds() as f64 / 86_400.0,
                human(budget_millis(period, self.objective)),
            )
        })
    }
}

/// `4h`, `90m`, `30s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let unit = s.chars().last()?;
    let n: i64 = s[..s.len() - 1].parse().ok()?;
    match unit {
        's' => Some(Duration::seconds(n)),
        'm' => Some(Duration::minutes(n)),
        'h' => Some(Duration::hours(n)),
        _ => None,
    }
}

/// `2h 52m 44s` from milliseconds.
pub fn human(ms: i64) -> String {
    let s = ms / 1000;
    let (h, m, s) = (s / 3600, (s % 3600) / 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m {s}s"),
    }
}

fn secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

fn outage_status(o: &Outage, now: DateTime<Utc>) -> OutageStatus {
    OutageStatus {
        start: Some(to_k8s(o.start)),
        end: o.end.map(to_k8s),
        seconds: secs(o.length(now).num_milliseconds()),
        cause: o.cause.clone(),
    }
}

fn outage_from(s: &OutageStatus) -> Option<Outage> {
    Some(Outage {
        start: from_k8s(s.start.as_ref()?),
        end: s.end.as_ref().map(from_k8s),
        cause: s.cause.clone(),
    })
}

/// The status of one period record; `ongoing` counts toward the longest outage.
pub fn period_status(
    record: &PeriodRecord,
    ongoing: Option<&Outage>,
    targets: &Targets,
    tz: Tz,
    now: DateTime<Utc>,
    closed: bool,
) -> PeriodStatus {
    let period = record.period();
    let budget = budget_millis(&period, targets.objective);
    let cap = targets.cap_millis(&period);
    let longest = match (&record.longest, ongoing) {
        (Some(l), Some(o)) if o.length(now) > l.length(now) => Some(o.clone()),
        (Some(l), _) => Some(l.clone()),
        (None, o) => o.cloned(),
    };
    let (lower, upper) = record.availability_bounds();
    let longest_ms = longest
        .as_ref()
        .map_or(0, |o| o.length(now).num_milliseconds());
    PeriodStatus {
        label: period.label(tz),
        start: Some(to_k8s(record.start)),
        end: Some(to_k8s(record.end)),
        measured_seconds: secs(record.measured_ms),
        down_seconds: secs(record.down_ms),
        unobserved_seconds: secs(record.unobserved_ms),
        availability: record.availability() * 100.0,
        availability_lower: lower * 100.0,
        availability_upper: upper * 100.0,
        budget_seconds: secs(budget),
        budget_used_seconds: secs(record.down_ms),
        budget_left_seconds: secs(budget - record.down_ms),
        single_outage_cap_seconds: secs(cap),
        longest_outage: longest.as_ref().map(|o| outage_status(o, now)),
        latest_outage: record.latest.as_ref().map(|o| outage_status(o, now)),
        outages: record.outages as i64,
        met: closed.then_some(record.down_ms <= budget && longest_ms <= cap),
    }
}

/// The state of the current period at `now`, and the projected availability
/// (percent) at its end if downtime keeps accruing at the rate seen so far.
pub fn judge(ledger: &Ledger, targets: &Targets, now: DateTime<Utc>) -> (State, f64) {
    let record = &ledger.current;
    let period = record.period();
    let budget = budget_millis(&period, targets.objective);
    let cap = targets.cap_millis(&period);
    let elapsed = (now - period.start).num_milliseconds().max(1);
    let projected_down =
        record.down_ms as f64 / elapsed as f64 * period.length().num_milliseconds() as f64;
    let projected = 100.0 * (1.0 - projected_down / period.length().num_milliseconds() as f64);
    let longest = ledger
        .longest(now)
        .map_or(0, |o| o.length(now).num_milliseconds());
    let ongoing = ledger
        .ongoing
        .as_ref()
        .map_or(0, |o| o.length(now).num_milliseconds());
    let state = if record.down_ms > budget || longest > cap {
        State::Breached
    } else if projected_down > budget as f64 || ongoing * 2 > cap {
        State::AtRisk
    } else {
        State::Met
    };
    (state, projected)
}

/// The status of one measured object.
pub fn object_status(
    name: &str,
    domain: &str,
    site: Option<&str>,
    ledger: &Ledger,
    targets: &Targets,
    tz: Tz,
    now: DateTime<Utc>,
) -> SlaObjectStatus {
    let (state, projected) = judge(ledger, targets, now);
    SlaObjectStatus {
        name: name.to_string(),
        domain: domain.to_string(),
        site: site.map(str::to_string),
        state: state.as_str().to_string(),
        period: period_status(
            &ledger.current,
            ledger.ongoing.as_ref(),
            targets,
            tz,
            now,
            false,
        ),
        ongoing_outage: ledger.ongoing.as_ref().map(|o| outage_status(o, now)),
        projected_availability: projected,
        history: ledger
            .history
            .iter()
            .map(|r| period_status(r, None, targets, tz, r.end, true))
            .collect(),
        last_observation: ledger
            .last
            .map(|(t, up)| format!("{} {}", t.to_rfc3339(), if up { "up" } else { "down" })),
    }
}

/// Rebuilds the ledger a status was written from (after a restart or a
/// leader change). `None` if the status holds no measurement.
pub fn ledger_from(status: &SlaObjectStatus) -> Option<Ledger> {
    let record = |p: &PeriodStatus| -> Option<PeriodRecord> {
        Some(PeriodRecord {
            start: from_k8s(p.start.as_ref()?),
            end: from_k8s(p.end.as_ref()?),
            measured_ms: (p.measured_seconds * 1000.0).round() as i64,
            down_ms: (p.down_seconds * 1000.0).round() as i64,
            unobserved_ms: (p.unobserved_seconds * 1000.0).round() as i64,
            outages: p.outages.max(0) as u64,
            longest: p
                .longest_outage
                .as_ref()
                .and_then(outage_from)
                .filter(|o| o.end.is_some()),
            latest: p.latest_outage.as_ref().and_then(outage_from),
        })
    };
    let last = status.last_observation.as_deref().and_then(|s| {
        let (time, state) = s.split_once(' ')?;
        let t = DateTime::parse_from_rfc3339(time).ok()?.with_timezone(&Utc);
        Some((t, state == "up"))
    });
    Some(Ledger {
        current: record(&status.period)?,
        ongoing: status.ongoing_outage.as_ref().and_then(outage_from),
        last,
        history: status.history.iter().filter_map(record).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::PeriodKind;
    use chrono::TimeZone;
    use chrono_tz::Europe::Rome;

    fn targets() -> Targets {
        Targets {
            objective: 99.8,
            single_outage_fraction: 0.5,
            rto: Duration::hours(4),
            rpo: Duration::zero(),
        }
    }

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0)
            .single()
            .expect("valid")
            + Duration::seconds(secs)
    }

    #[test]
    fn the_published_rto_breaks_the_single_outage_cap() {
        let q1 = Period::containing(PeriodKind::Quadrimester, Rome, t(0));
        let message = targets().inconsistency(&q1).expect("inconsistent");
        assert!(
            message.contains("rto 4h 0m 0s") && message.contains("2h 52m 44s"),
            "{message}"
        );
        let relaxed = Targets {
            rto: Duration::hours(2),
            ..targets()
        };
        assert_eq!(relaxed.inconsistency(&q1), None);
    }

    #[test]
    fn single_outage_caps_of_each_period_to_the_millisecond() {
        let q1 = Period::containing(PeriodKind::Quadrimester, Rome, t(0));
        let q2 = q1.next(PeriodKind::Quadrimester, Rome);
        let q3 = q2.next(PeriodKind::Quadrimester, Rome);
        let caps: Vec<i64> = [q1, q2, q3]
            .iter()
            .map(|p| targets().cap_millis(p))
            .collect();
        assert_eq!(caps, [10_364_400, 10_627_200, 10_544_400]);
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("4h"), Some(Duration::hours(4)));
        assert_eq!(parse_duration("90m"), Some(Duration::minutes(90)));
        assert_eq!(parse_duration("0s"), Some(Duration::zero()));
        assert_eq!(parse_duration("4d"), None);
    }

    #[test]
    fn states_follow_budget_and_cap() {
        let q = PeriodKind::Quadrimester;
        let gap = Duration::seconds(30);
        let mut l = Ledger::new(q, Rome, t(0));
        l.observe(q, Rome, t(0), true, "", gap);
        l.observe(q, Rome, t(10), true, "", gap);
        assert_eq!(judge(&l, &targets(), t(10)).0, State::Met);
        // Down since t(10): at t(10 + 5300) the ongoing outage is past half the cap (5182.2 s).
        let mut s = 10;
        while s < 5310 {
            s += 10;
            l.observe(q, Rome, t(s), false, "NoReadyEndpoint", gap);
        }
        assert_eq!(judge(&l, &targets(), t(s)).0, State::AtRisk);
        while s < 10_400 {
            s += 10;
            l.observe(q, Rome, t(s), false, "NoReadyEndpoint", gap);
        }
        assert_eq!(
            judge(&l, &targets(), t(s)).0,
            State::Breached,
            "past the 10,364.4 s cap"
        );
    }

    #[test]
    fn status_round_trips_the_ledger() {
        let q = PeriodKind::Quadrimester;
        let gap = Duration::seconds(30);
        let mut l = Ledger::new(q, Rome, t(0));
        for (s, up) in [(0, true), (10, false), (20, false), (30, true), (40, false)] {
            l.observe(q, Rome, t(s), up, "NoReadyEndpoint", gap);
        }
        let status = object_status("acme", "pec.acme.it", None, &l, &targets(), Rome, t(40));
        assert_eq!(ledger_from(&status), Some(l));
        assert_eq!(status.period.label, "2026-01/04");
        assert_eq!(status.period.budget_seconds, 20_728.8);
    }
}
