//! Figures over measured durations, shared by the e2e tests and the
//! benchmarks (both include this file with `#[path]`).

use std::time::Duration;

/// The nearest-rank `p`th percentile (0 < p <= 100) of `sorted`, which is
/// in ascending order; zero when there is nothing to rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
