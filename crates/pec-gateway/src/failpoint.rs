//! Crash points for the tests that kill the gateway at each step.
//!
//! `PEC_GATEWAY_CRASH_AT=<point>` makes the process abort (like SIGKILL: no
//! cleanup, no flush) the first time it passes that point, after printing
//! `crash point <point>` to stderr so a test can check it ran. Points:
//! `accepted` (a submission is spooled and logged, before the 250 is
//! written), `received` (likewise at the incoming point), `before-relay` (a
//! queued message is about to be handed to another provider). Unset in
//! production: then `hit` is one environment lookup.

/// Aborts the process if `point` is the configured crash point.
pub fn hit(point: &str) {
    if std::env::var("PEC_GATEWAY_CRASH_AT").is_ok_and(|p| p == point) {
        eprintln!("crash point {point}");
        std::process::abort();
    }
}
