//! Signing-key lifecycle: pure decisions, no client, no HSM.
//!
//! - [`lifecycle`]: when to make, issue, publish, activate and retire each key
//!   generation, with failures retried by an exponential backoff whose state
//!   is data (so it can live in status and survive restarts).
//!
//! The HSM side is `crate::hsm`; the SigningKey resource and its controller
//! build on both (issue #4, in progress).

pub mod lifecycle;
pub mod x509;
