//! Calendar measurement periods: four-month periods ("quadrimestri":
//! January-April, May-August, September-December), quarters and months,
//! starting at local midnight in the SLA's time zone.
//!
//! Period lengths differ (a Europe/Rome January-April period is 120 or 121
//! days less the hour lost in March; September-December is 122 days plus the
//! hour gained in October), so every budget is computed from the real length.

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

use crate::api::PeriodKind;

/// One measurement period, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Period {
    /// The first instant of the period (local midnight of its first day).
    pub start: DateTime<Utc>,
    /// The first instant of the next period.
    pub end: DateTime<Utc>,
}

impl Period {
    /// The period of `kind` in `tz` that contains `t`.
    pub fn containing(kind: PeriodKind, tz: Tz, t: DateTime<Utc>) -> Self {
        let local = t.with_timezone(&tz);
        let months = kind.months();
        let first_month = (local.month0() / months) * months + 1;
        let start = local_midnight(tz, local.year(), first_month);
        let (ny, nm) = add_months(local.year(), first_month, months);
        Self {
            start,
            end: local_midnight(tz, ny, nm),
        }
    }

    /// The period after this one.
    pub fn next(&self, kind: PeriodKind, tz: Tz) -> Self {
        Self::containing(kind, tz, self.end)
    }

    /// Its length.
    pub fn length(&self) -> Duration {
        self.end - self.start
    }

    /// Whether `t` falls in it.
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.start <= t && t < self.end
    }

    /// A short name such as `2026-05/08` (months of the period, local time).
    pub fn label(&self, tz: Tz) -> String {
        let start = self.start.with_timezone(&tz);
        let last = (self.end - Duration::seconds(1)).with_timezone(&tz);
        if start.month() == last.month() {
            format!("{}-{:02}", start.year(), start.month())
        } else {
            format!("{}-{:02}/{:02}", start.year(), start.month(), last.month())
        }
    }
}

/// The allowed unavailability of a period for `objective` percent, in
/// milliseconds (the error budget).
pub fn budget_millis(period: &Period, objective: f64) -> i64 {
    let allowed = (100.0 - objective) / 100.0;
    (period.length().num_milliseconds() as f64 * allowed).round() as i64
}

impl PeriodKind {
    fn months(self) -> u32 {
        match self {
            PeriodKind::Quadrimester => 4,
            PeriodKind::Quarter => 3,
            PeriodKind::Month => 1,
        }
    }
}

fn add_months(year: i32, month: u32, n: u32) -> (i32, u32) {
    let zero_based = month - 1 + n;
    (year + (zero_based / 12) as i32, zero_based % 12 + 1)
}

/// Local midnight of the first day of `month`. Midnight can fall in a
/// daylight-saving gap in some zones; the first instant after the gap counts.
fn local_midnight(tz: Tz, year: i32, month: u32) -> DateTime<Utc> {
    let date = NaiveDate::from_ymd_opt(year, month, 1).unwrap_or_default();
    let mut naive = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    loop {
        match tz.from_local_datetime(&naive) {
            LocalResult::Single(t) => return t.with_timezone(&Utc),
            LocalResult::Ambiguous(earliest, _) => return earliest.with_timezone(&Utc),
            LocalResult::None => naive += Duration::minutes(15),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Europe::Rome;

    fn utc(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0)
            .single()
            .expect("valid")
    }

    const DAY: i64 = 86_400;

    #[test]
    fn quadrimesters_of_a_non_leap_year_in_rome() {
        let q1 = Period::containing(PeriodKind::Quadrimester, Rome, utc(2026, 2, 10, 12));
        // Local midnight in winter is 23:00 UTC of the day before.
        assert_eq!(q1.start, utc(2025, 12, 31, 23));
        assert_eq!(q1.end, utc(2026, 4, 30, 22));
        // 120 days less the hour lost on 29 March 2026.
        assert_eq!(q1.length().num_seconds(), 120 * DAY - 3600);
        let q2 = q1.next(PeriodKind::Quadrimester, Rome);
        assert_eq!(
            (q2.start, q2.end),
            (utc(2026, 4, 30, 22), utc(2026, 8, 31, 22))
        );
        assert_eq!(q2.length().num_seconds(), 123 * DAY);
        let q3 = q2.next(PeriodKind::Quadrimester, Rome);
        assert_eq!(
            (q3.start, q3.end),
            (utc(2026, 8, 31, 22), utc(2026, 12, 31, 23))
        );
        // 122 days plus the hour gained on 25 October 2026.
        assert_eq!(q3.length().num_seconds(), 122 * DAY + 3600);
        assert_eq!(q3.label(Rome), "2026-09/12");
    }

    #[test]
    fn quadrimesters_of_a_leap_year_in_rome() {
        let q1 = Period::containing(PeriodKind::Quadrimester, Rome, utc(2028, 4, 30, 21));
        assert_eq!(q1.length().num_seconds(), 121 * DAY - 3600);
        let q2 = q1.next(PeriodKind::Quadrimester, Rome);
        assert_eq!(q2.length().num_seconds(), 123 * DAY);
        let q3 = q2.next(PeriodKind::Quadrimester, Rome);
        assert_eq!(q3.length().num_seconds(), 122 * DAY + 3600);
        assert_eq!(
            q3.next(PeriodKind::Quadrimester, Rome).start,
            utc(2028, 12, 31, 23)
        );
    }

    #[test]
    fn boundaries_belong_to_the_period_they_start() {
        let boundary = utc(2026, 4, 30, 22);
        let p = Period::containing(PeriodKind::Quadrimester, Rome, boundary);
        assert_eq!(p.start, boundary);
        let before = Period::containing(
            PeriodKind::Quadrimester,
            Rome,
            boundary - Duration::seconds(1),
        );
        assert_eq!(before.end, boundary);
    }

    #[test]
    fn budgets_and_caps_to_the_second() {
        let q1 = Period::containing(PeriodKind::Quadrimester, Rome, utc(2026, 1, 15, 0));
        // 0.2% of 10,364,400 s = 20,728.8 s; the single-outage cap is half of it.
        assert_eq!(budget_millis(&q1, 99.8), 20_728_800);
        let q2 = q1.next(PeriodKind::Quadrimester, Rome);
        assert_eq!(budget_millis(&q2, 99.8), 21_254_400);
        let q3 = q2.next(PeriodKind::Quadrimester, Rome);
        assert_eq!(budget_millis(&q3, 99.8), 21_088_800);
    }

    #[test]
    fn months_and_quarters_cross_daylight_saving_changes() {
        let march = Period::containing(PeriodKind::Month, Rome, utc(2026, 3, 29, 12));
        assert_eq!(march.length().num_seconds(), 31 * DAY - 3600);
        let q4 = Period::containing(PeriodKind::Quarter, Rome, utc(2026, 11, 1, 0));
        assert_eq!(q4.length().num_seconds(), 92 * DAY + 3600);
        assert_eq!(q4.label(Rome), "2026-10/12");
        assert_eq!(march.label(Rome), "2026-03");
    }
}
