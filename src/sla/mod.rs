//! SLA measurement: pure, no client.
//!
//! - [`period`]: calendar periods in a time zone, and their error budgets.
//! - [`ledger`]: outages as intervals, unobserved time, period rollover.
//! - [`evaluate`]: availability bounds, budget, cap, projection and state.

pub mod evaluate;
pub mod ledger;
pub mod period;
pub mod report;
pub mod rules;
