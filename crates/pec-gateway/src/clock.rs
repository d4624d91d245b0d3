//! The one clock of the gateway: only this module reads the wall clock
//! (clippy's `disallowed-methods` enforces it). The PEC rules take `now` as
//! an argument, so their tests fix time by hand.

use chrono::{DateTime, Utc};

/// The current instant.
#[allow(clippy::disallowed_methods)] // the single place that may read the wall clock
pub fn now() -> DateTime<Utc> {
    Utc::now()
}

/// The current instant as a `SystemTime` (what CMS signing times take).
#[allow(clippy::disallowed_methods)] // the single place that may read the wall clock
pub fn system_now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}
