//! Status conditions shaped like `metav1.Condition`.
//!
//! `lastTransitionTime` changes only when a condition's status flips, so a
//! status recomputed with nothing new compares equal to the stored one and the
//! controller skips the write.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::time::to_k8s;

/// A condition as the pure status code decides it, before it is stamped with a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The condition type, such as `Ready`.
    pub type_: &'static str,
    /// Whether the condition holds.
    pub status: bool,
    /// A CamelCase reason constant.
    pub reason: &'static str,
    /// A sentence for people: what is happening and, when it is a problem, what to do.
    pub message: String,
}

impl Verdict {
    /// A verdict of `type_`.
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The conditions for `verdicts`, keeping each previous `lastTransitionTime`
/// whose status did not change. Conditions of other types are dropped.
pub fn merge(
    previous: &[Condition],
    verdicts: &[Verdict],
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Vec<Condition> {
    verdicts
        .iter()
        .map(|v| {
            let status = if v.status { "True" } else { "False" };
            let last_transition_time = previous
                .iter()
                .find(|c| c.type_ == v.type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| to_k8s(now));
            Condition {
                type_: v.type_.to_string(),
                status: status.to_string(),
                reason: v.reason.to_string(),
                message: v.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// The condition of `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is present and `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("valid")
    }

    #[test]
    fn keeps_transition_time_while_status_holds() {
        let first = merge(
            &[],
            &[Verdict::new("Ready", false, "Waiting", "a")],
            Some(1),
            at(0),
        );
        let second = merge(
            &first,
            &[Verdict::new("Ready", false, "Other", "b")],
            Some(2),
            at(60),
        );
        assert_eq!(
            second[0].last_transition_time,
            first[0].last_transition_time
        );
        assert_eq!(second[0].reason, "Other");
        assert_eq!(second[0].observed_generation, Some(2));
    }

    #[test]
    fn moves_transition_time_when_status_flips() {
        let first = merge(
            &[],
            &[Verdict::new("Ready", false, "Waiting", "")],
            None,
            at(0),
        );
        let later = at(0) + Duration::seconds(90);
        let flipped = merge(
            &first,
            &[Verdict::new("Ready", true, "Done", "")],
            None,
            later,
        );
        assert_eq!(flipped[0].last_transition_time, to_k8s(later));
        assert!(is_true(&flipped, "Ready"));
    }

    #[test]
    fn unchanged_verdicts_give_an_equal_status() {
        let v = [Verdict::new("Ready", true, "Done", "all good")];
        let first = merge(&[], &v, Some(3), at(0));
        assert_eq!(merge(&first, &v, Some(3), at(500)), first);
    }
}
