//! Data-center failover: pure decisions, no client.
//!
//! - [`health`]: from a Site's nodes and its previous status, its phase
//!   (`Serving`, `Degraded`, `Down`, `Maintenance`, `Fenced`), with a failure
//!   threshold over periodic checks and fencing of flapping sites.
//! - [`serving`]: from the sites of a MailDomain, which of them serve its
//!   traffic now, with a stabilization window before a recovered site rejoins.

pub mod health;
pub mod serving;
