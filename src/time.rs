//! The adapter between Kubernetes timestamps (`jiff`, through k8s-openapi)
//! and the `chrono` values our own logic uses. No other module converts.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

/// A Kubernetes `Time` for a chrono instant (second precision, as the API keeps it).
pub fn to_k8s(t: DateTime<Utc>) -> Time {
    Time(to_jiff(t))
}

/// A Kubernetes `MicroTime` for a chrono instant.
pub fn to_k8s_micro(t: DateTime<Utc>) -> MicroTime {
    MicroTime(to_jiff(t))
}

/// The chrono instant of a Kubernetes `Time`.
pub fn from_k8s(t: &Time) -> DateTime<Utc> {
    from_jiff(t.0)
}

/// The chrono instant of a Kubernetes `MicroTime`.
pub fn from_k8s_micro(t: &MicroTime) -> DateTime<Utc> {
    from_jiff(t.0)
}

fn to_jiff(t: DateTime<Utc>) -> jiff::Timestamp {
    // Every chrono UTC instant within jiff's range (years -9999..=9999) converts;
    // outside it we clamp rather than fail, since these are display timestamps.
    jiff::Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32).unwrap_or(
        if t.timestamp() < 0 {
            jiff::Timestamp::MIN
        } else {
            jiff::Timestamp::MAX
        },
    )
}

fn from_jiff(t: jiff::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond().max(0) as u32).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_kubernetes_time() {
        let t = DateTime::from_timestamp(1_767_225_600, 123_000_000).expect("valid");
        assert_eq!(from_k8s(&to_k8s(t)), t);
        assert_eq!(from_k8s_micro(&to_k8s_micro(t)), t);
    }
}
