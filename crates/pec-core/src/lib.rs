//! What the PEC operator and the PEC gateway share, so that neither copies
//! the other:
//!
//! - [`hsm`]: signing keys inside a PKCS#11 token (SoftHSM2 in tests);
//!   [`der`]: the little DER a token needs around it.
//! - [`smime`]: S/MIME `multipart/signed` messages whose CMS signature is
//!   made in the token, and their verification against a set of trusted
//!   certificates (the providers' index).
//! - [`config`]: `gateway.yaml`, the configuration the operator renders and
//!   the gateway reads.
//!
//! Nothing here talks to Kubernetes.
#![forbid(unsafe_code)]

pub mod config;
pub mod der;
pub mod hsm;
pub mod smime;
