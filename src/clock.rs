//! The one clock of the operator.
//!
//! `Context` holds a [`Clock`]; each reconcile reads `now` once and passes it
//! down to pure functions. Only [`SystemClock`] reads the wall clock (clippy's
//! `disallowed-methods` enforces it), so tests can move time by hand.

use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the single place that may read the wall clock
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The wall clock moved by a fixed offset: it reads `start` at the moment it
/// is made and then runs at the wall clock's pace. The operator uses it only
/// when `PEC_CLOCK_START` is set, which no deployment does: the period-close
/// test starts a replica just before the end of a measurement period.
#[derive(Debug, Clone, Copy)]
pub struct OffsetClock(Duration);

impl OffsetClock {
    /// A clock that reads `start` now.
    pub fn starting_at(start: DateTime<Utc>) -> Self {
        Self(start - SystemClock.now())
    }

    /// The clock `PEC_CLOCK_START` (an RFC 3339 instant) asks for, if set.
    pub fn from_env() -> Result<Option<Self>, String> {
        let Ok(start) = std::env::var("PEC_CLOCK_START") else {
            return Ok(None);
        };
        DateTime::parse_from_rfc3339(&start)
            .map(|start| Some(Self::starting_at(start.with_timezone(&Utc))))
            .map_err(|e| format!("PEC_CLOCK_START={start:?} is not an RFC 3339 instant: {e}"))
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> DateTime<Utc> {
        SystemClock.now() + self.0
    }
}

/// A clock that only moves when told to, for tests and simulations.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self(Mutex::new(start))
    }

    /// Moves the clock forward (or back, with a negative duration).
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_clock_starts_where_told_and_runs_with_the_wall_clock() {
        let start = DateTime::from_timestamp(1_777_586_340, 0).expect("valid timestamp");
        let clock = OffsetClock::starting_at(start);
        let first = clock.now();
        assert!(
            (first - start).num_seconds().abs() <= 1,
            "starts at {first}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        let later = clock.now();
        assert!(later - first >= Duration::milliseconds(20), "runs: {later}");
        assert!(later - first < Duration::seconds(5));
    }

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let start = DateTime::from_timestamp(1_700_000_000, 0).expect("valid timestamp");
        let clock = ManualClock::new(start);
        assert_eq!(clock.now(), start);
        clock.advance(Duration::days(730));
        assert_eq!(clock.now(), start + Duration::days(730));
    }
}
