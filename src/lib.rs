//! pec-operator: a Kubernetes operator for a multi-site PEC (Italian certified
//! e-mail) platform.
//!
//! - [`api`]: the `pec.dev/v1alpha1` custom resources, and nothing else.
//! - [`controllers`]: one reconciler per kind, and the shared [`controllers::Context`].
//! - [`clock`], [`time`]: the one clock, and the chrono/Kubernetes time adapter.
//! - [`failover`]: pure site-health and serving-site decisions.
//! - [`sla`]: pure SLA measurement: periods, outage ledgers, evaluation.
//! - [`signing`]: pure signing-key lifecycle (generations, rotation, backoff).
//! - [`conditions`]: `metav1.Condition` bookkeeping.
//! - [`hsm`]: signing keys inside a PKCS#11 token; DER helpers (the
//!   `pec-core` crate, shared with the gateway).
//! - [`leader`]: Lease-based leader election.
//! - [`metrics`], [`http`], [`telemetry`]: what SREs scrape, probe and read.
//! - [`alerts`]: the operational alerting rules (`pec-operator rules`); the
//!   SLA ones are in [`sla::rules`].
#![forbid(unsafe_code)]

pub mod alerts;
pub mod api;
pub mod clock;
pub mod conditions;
pub mod controllers;
pub mod failover;
pub mod failpoint;
pub use pec_core::hsm;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod signing;
pub mod sla;
pub mod telemetry;
pub mod time;
