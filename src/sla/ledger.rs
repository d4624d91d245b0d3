//! The outage ledger of one measured object (a domain, or a domain in a
//! site): intervals, not samples.
//!
//! Each observation attributes the time since the previous one to the state
//! seen then (up or down), or to `unobserved` when the gap is longer than the
//! probe allows (the operator was down, or had no leader). Outages are
//! intervals with a start, an end and a cause; a period keeps aggregates and
//! the longest and latest outage only, so the cost of an observation and the
//! size of the record do not grow with the number of outages. At a period
//! boundary the period closes into the history and an ongoing outage is split.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;

use super::period::Period;
use crate::api::PeriodKind;

/// How many closed periods the history keeps (two years of quadrimesters).
pub const HISTORY: usize = 6;

/// An outage, or the part of one that fell in a period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outage {
    /// When it started (or when its period started, for a split outage).
    pub start: DateTime<Utc>,
    /// When it ended; `None` while it goes on.
    pub end: Option<DateTime<Utc>>,
    /// Why the object was unavailable.
    pub cause: String,
}

impl Outage {
    /// Its length up to `now` (or its end).
    pub fn length(&self, now: DateTime<Utc>) -> Duration {
        self.end.unwrap_or(now) - self.start
    }
}

/// Aggregates of one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodRecord {
    /// The period.
    pub start: DateTime<Utc>,
    /// Its end.
    pub end: DateTime<Utc>,
    /// Observed time, in milliseconds.
    pub measured_ms: i64,
    /// Observed time the object was down, in milliseconds.
    pub down_ms: i64,
    /// Time not observed (operator down, no leader), in milliseconds.
    pub unobserved_ms: i64,
    /// Outages that started or continued in the period.
    pub outages: u64,
    /// The longest outage (or part of one) in the period.
    pub longest: Option<Outage>,
    /// The latest closed outage in the period.
    pub latest: Option<Outage>,
}

impl PeriodRecord {
    fn new(period: Period) -> Self {
        Self {
            start: period.start,
            end: period.end,
            measured_ms: 0,
            down_ms: 0,
            unobserved_ms: 0,
            outages: 0,
            longest: None,
            latest: None,
        }
    }

    /// The period.
    pub fn period(&self) -> Period {
        Period {
            start: self.start,
            end: self.end,
        }
    }

    /// Availability counting only observed time.
    pub fn availability(&self) -> f64 {
        if self.measured_ms == 0 {
            return 1.0;
        }
        1.0 - self.down_ms as f64 / self.measured_ms as f64
    }

    /// Availability bounds over all elapsed time: unobserved time counted as
    /// down (lower) and as up (upper).
    pub fn availability_bounds(&self) -> (f64, f64) {
        let elapsed = self.measured_ms + self.unobserved_ms;
        if elapsed == 0 {
            return (1.0, 1.0);
        }
        let up = (self.measured_ms - self.down_ms) as f64;
        (
            up / elapsed as f64,
            (up + self.unobserved_ms as f64) / elapsed as f64,
        )
    }

    fn count_outage_part(&mut self, part: &Outage, now: DateTime<Utc>) {
        let longer = self
            .longest
            .as_ref()
            .is_none_or(|l| part.length(now) > l.length(now));
        if longer {
            self.longest = Some(part.clone());
        }
    }
}

/// Everything measured about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    /// The current period.
    pub current: PeriodRecord,
    /// The outage in progress, if any (its start may be the period start).
    pub ongoing: Option<Outage>,
    /// The last observation and what it saw (`true`: available).
    pub last: Option<(DateTime<Utc>, bool)>,
    /// Closed periods, newest last, at most [`HISTORY`].
    pub history: Vec<PeriodRecord>,
}

impl Ledger {
    /// A new ledger whose first period contains `now`.
    pub fn new(kind: PeriodKind, tz: Tz, now: DateTime<Utc>) -> Self {
        Self {
            current: PeriodRecord::new(Period::containing(kind, tz, now)),
            ongoing: None,
            last: None,
            history: Vec::new(),
        }
    }

    /// Records an observation at `now`. Time since the previous observation
    /// counts for what was seen then, or as unobserved past `max_gap`.
    pub fn observe(
        &mut self,
        kind: PeriodKind,
        tz: Tz,
        now: DateTime<Utc>,
        available: bool,
        cause: &str,
        max_gap: Duration,
    ) {
        let Some((since, was_up)) = self.last else {
            self.last = Some((now, available));
            self.transition(now, available, cause);
            return;
        };
        if now <= since {
            return;
        }
        let observed = now - since <= max_gap;
        let mut from = since;
        while now >= self.current.end {
            let boundary = self.current.end;
            self.attribute(from, boundary, observed, was_up);
            self.close_period(kind, tz, boundary);
            from = boundary;
        }
        self.attribute(from, now, observed, was_up);
        if !observed {
            // What happened in the gap is unknown: an outage seen before it
            // is not stretched over it; it ends where observation stopped.
            if let Some(mut outage) = self.ongoing.take() {
                outage.end = Some(since.max(self.current.start));
                self.finish(outage, now);
            }
        }
        self.last = Some((now, available));
        self.transition(now, available, cause);
    }

    fn attribute(&mut self, from: DateTime<Utc>, to: DateTime<Utc>, observed: bool, up: bool) {
        let ms = (to - from).num_milliseconds();
        if ms <= 0 {
            return;
        }
        if observed {
            self.current.measured_ms += ms;
            if !up {
                self.current.down_ms += ms;
            }
        } else {
            self.current.unobserved_ms += ms;
        }
    }

    fn transition(&mut self, now: DateTime<Utc>, available: bool, cause: &str) {
        match (&mut self.ongoing, available) {
            (None, false) => {
                self.ongoing = Some(Outage {
                    start: now,
                    end: None,
                    cause: cause.to_string(),
                });
                self.current.outages += 1;
            }
            (Some(_), true) => {
                if let Some(mut outage) = self.ongoing.take() {
                    outage.end = Some(now);
                    self.finish(outage, now);
                }
            }
            _ => {}
        }
    }

    fn finish(&mut self, outage: Outage, now: DateTime<Utc>) {
        self.current.count_outage_part(&outage, now);
        self.current.latest = Some(outage);
    }

    fn close_period(&mut self, kind: PeriodKind, tz: Tz, boundary: DateTime<Utc>) {
        let next = PeriodRecord::new(self.current.period().next(kind, tz));
        let mut closed = std::mem::replace(&mut self.current, next);
        if let Some(outage) = self.ongoing.as_mut() {
            // Split: the old period keeps its part, the new one counts the rest.
            let part = Outage {
                end: Some(boundary),
                ..outage.clone()
            };
            closed.count_outage_part(&part, boundary);
            closed.latest = Some(part);
            outage.start = boundary;
            self.current.outages += 1;
        }
        self.history.push(closed);
        if self.history.len() > HISTORY {
            self.history.remove(0);
        }
    }

    /// The longest outage of the current period, counting the ongoing one.
    pub fn longest(&self, now: DateTime<Utc>) -> Option<Outage> {
        let ongoing = self.ongoing.clone();
        match (self.current.longest.clone(), ongoing) {
            (Some(l), Some(o)) if o.length(now) > l.length(now) => Some(o),
            (Some(l), _) => Some(l),
            (None, o) => o,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use chrono_tz::Europe::Rome;

    const Q: PeriodKind = PeriodKind::Quadrimester;

    fn t(secs: i64) -> DateTime<Utc> {
        // 2026-03-01T00:00:00Z, inside the January-April period.
        Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0)
            .single()
            .expect("valid")
            + Duration::seconds(secs)
    }

    fn gap() -> Duration {
        Duration::seconds(30)
    }

    /// Observes every 10 s from `from` to `to` with `up`.
    fn run(l: &mut Ledger, from: i64, to: i64, up: bool) {
        let mut s = from;
        while s <= to {
            l.observe(Q, Rome, t(s), up, "NoReadyEndpoint", gap());
            s += 10;
        }
    }

    #[test]
    fn an_outage_is_an_interval_with_its_downtime() {
        let mut l = Ledger::new(Q, Rome, t(0));
        run(&mut l, 0, 100, true);
        run(&mut l, 110, 200, false);
        run(&mut l, 210, 300, true);
        assert_eq!(l.current.outages, 1);
        assert_eq!(l.current.down_ms, 100_000);
        assert_eq!(l.current.measured_ms, 300_000);
        let o = l.current.latest.clone().expect("closed outage");
        assert_eq!((o.start, o.end), (t(110), Some(t(210))));
        assert_eq!(
            l.longest(t(300)).map(|o| o.length(t(300))),
            Some(Duration::seconds(100))
        );
        assert!((l.current.availability() - (1.0 - 100.0 / 300.0)).abs() < 1e-9);
    }

    #[test]
    fn a_gap_past_the_probe_is_unobserved_never_guessed() {
        let mut l = Ledger::new(Q, Rome, t(0));
        run(&mut l, 0, 100, true);
        l.observe(Q, Rome, t(400), true, "", gap());
        assert_eq!(l.current.unobserved_ms, 300_000);
        assert_eq!(l.current.down_ms, 0);
        let (lower, upper) = l.current.availability_bounds();
        assert!((lower - 100.0 / 400.0).abs() < 1e-9);
        assert!((upper - 1.0).abs() < 1e-9);
    }

    #[test]
    fn an_outage_before_a_gap_ends_where_observation_stopped() {
        let mut l = Ledger::new(Q, Rome, t(0));
        run(&mut l, 0, 50, true);
        run(&mut l, 60, 100, false);
        l.observe(Q, Rome, t(500), false, "NoReadyEndpoint", gap());
        // The first outage ends at the last observation before the gap; a new one starts after it.
        assert_eq!(l.current.latest.as_ref().map(|o| o.end), Some(Some(t(100))));
        assert_eq!(l.ongoing.as_ref().map(|o| o.start), Some(t(500)));
        assert_eq!(l.current.outages, 2);
        assert_eq!(l.current.unobserved_ms, 400_000);
    }

    #[test]
    fn an_outage_spanning_a_boundary_is_split_and_the_period_closes() {
        let boundary = Utc
            .with_ymd_and_hms(2026, 4, 30, 22, 0, 0)
            .single()
            .expect("valid");
        let start = boundary - Duration::seconds(60);
        let mut l = Ledger::new(Q, Rome, start);
        let mut s = start;
        while s <= boundary + Duration::seconds(120) {
            let up = s < boundary - Duration::seconds(30) || s >= boundary + Duration::seconds(90);
            l.observe(Q, Rome, s, up, "NoReadyEndpoint", gap());
            s += Duration::seconds(10);
        }
        assert_eq!(l.history.len(), 1);
        let closed = &l.history[0];
        assert_eq!(closed.down_ms, 30_000);
        assert_eq!(closed.longest.as_ref().map(|o| o.end), Some(Some(boundary)));
        assert_eq!(l.current.start, boundary);
        assert_eq!(l.current.down_ms, 90_000);
        assert_eq!(
            l.current.latest.as_ref().map(|o| (o.start, o.end)),
            Some((boundary, Some(boundary + Duration::seconds(90))))
        );
        assert_eq!(l.current.outages, 1);
    }

    #[test]
    fn history_keeps_the_last_six_periods() {
        let mut l = Ledger::new(Q, Rome, t(0));
        l.observe(Q, Rome, t(0), true, "", gap());
        for years in 1..=3 {
            l.observe(Q, Rome, t(0) + Duration::days(365 * years), true, "", gap());
        }
        assert_eq!(l.history.len(), HISTORY);
        // The whole three years were a gap: unobserved, never guessed up.
        assert!(
            l.history
                .iter()
                .all(|p| p.measured_ms == 0 && p.unobserved_ms > 0)
        );
    }
}
