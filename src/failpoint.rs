//! Crash points for the restart tests.
//!
//! `PEC_CRASH_AFTER=<point>@<namespace>/<name>` in the operator's
//! environment makes the process abort right after the side effect named
//! `<point>` for that object, before the status write that records it: the
//! worst moment to die. The e2e test
//! `killing_the_operator_at_each_signing_key_step_makes_no_second_key` uses
//! it to prove a restart finds the work already done instead of repeating
//! it. The abort waits for token writes of other reconciles in flight (see
//! [`crate::hsm::quiesce`]). Unset (always, in production) it costs one
//! environment read.

use std::sync::OnceLock;

/// Aborts the process if `PEC_CRASH_AFTER` names `point` for `object`
/// (`namespace/name`).
pub fn hit(point: &str, object: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("PEC_CRASH_AFTER").ok());
    if armed.as_deref() == Some(&format!("{point}@{object}")) {
        tracing::error!(point, object, "PEC_CRASH_AFTER: aborting on purpose");
        // Not in the middle of another object's token write: SoftHSM2
        // cannot survive that, and it is not what the tests are about.
        let _quiet = crate::hsm::quiesce();
        std::process::abort();
    }
}
