//! Signing keys: the pure lifecycle and the X.509 work.
//!
//! - [`lifecycle`]: when to make, issue, publish, activate and retire each key
//!   generation, with failures retried by an exponential backoff whose state
//!   is data (so it lives in status and survives restarts).
//! - [`x509`]: certificates, CSRs and CRLs whose signatures by a SigningKey
//!   are made inside the HSM.
//!
//! The HSM side is `crate::hsm`; the SigningKey controller
//! (`crate::controllers::signing_key`) drives both.

pub mod lifecycle;
pub mod x509;
