//! Per-object exponential backoff after reconcile errors: each failure in a
//! row doubles the delay before the next attempt, from a controller's first
//! delay up to [`CAP`]; a success forgets the object's failures. A broken
//! object is retried often at first and then rarely, without flooding the
//! API server, and one broken object never slows another.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use kube::{Resource, ResourceExt};

/// The longest delay between attempts.
pub const CAP: Duration = Duration::from_secs(300);
/// The shortest: a requeue is never immediate.
pub const FLOOR: Duration = Duration::from_secs(1);

/// The delay after `failures` failures in a row (1 for the first), starting
/// at `first`: `first x 2^(failures-1)`, within [`FLOOR`] and [`CAP`].
pub fn delay(first: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    first
        .checked_mul(1u32 << doublings)
        .unwrap_or(CAP)
        .clamp(FLOOR, CAP)
}

/// The failures in a row of every object that is failing, by controller and object.
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

/// The key of `obj` for `controller`.
fn key<K: Resource>(controller: &str, obj: &K) -> String {
    format!(
        "{controller}/{}/{}",
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

impl Backoff {
    /// Counts one more failure of `obj` and returns how long to wait.
    pub fn failed<K: Resource>(&self, controller: &str, obj: &K, first: Duration) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key(controller, obj)).or_insert(0);
        *n = n.saturating_add(1);
        delay(first, *n)
    }

    /// Forgets `obj`'s failures: it reconciled.
    pub fn succeeded<K: Resource>(&self, controller: &str, obj: &K) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(&key(controller, obj));
    }

    /// The failures in a row of `obj` (0 when it is not failing).
    pub fn failures<K: Resource>(&self, controller: &str, obj: &K) -> u32 {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.get(&key(controller, obj)).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Site;

    fn site(name: &str) -> Site {
        Site::new(name, crate::api::SiteSpec::default())
    }

    #[test]
    fn the_delay_doubles_from_the_first_up_to_the_cap() {
        let first = Duration::from_secs(10);
        let delays: Vec<u64> = (1..=7).map(|n| delay(first, n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(delay(first, u32::MAX), CAP, "no overflow");
    }

    #[test]
    fn a_requeue_is_never_immediate() {
        assert_eq!(delay(Duration::ZERO, 1), FLOOR);
        assert_eq!(delay(Duration::from_millis(10), 1), FLOOR);
    }

    #[test]
    fn each_object_backs_off_alone_and_a_success_resets_it() {
        let backoff = Backoff::default();
        let (a, b) = (site("a"), site("b"));
        let first = Duration::from_secs(5);
        assert_eq!(backoff.failed("site", &a, first), Duration::from_secs(5));
        assert_eq!(backoff.failed("site", &a, first), Duration::from_secs(10));
        assert_eq!(
            backoff.failed("site", &b, first),
            Duration::from_secs(5),
            "b is not slowed by a"
        );
        assert_eq!(
            backoff.failed("maildomain", &a, first),
            Duration::from_secs(5),
            "another controller's count is its own"
        );
        backoff.succeeded("site", &a);
        assert_eq!(backoff.failures("site", &a), 0);
        assert_eq!(backoff.failed("site", &a, first), Duration::from_secs(5));
        assert_eq!(backoff.failures("site", &b), 1);
    }
}
