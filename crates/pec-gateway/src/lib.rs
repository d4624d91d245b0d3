//! pec-gateway: the reference PEC gateway the operator runs for every
//! MailDomain. It talks SMTP, PKCS#11 and files, never Kubernetes, and reads
//! its configuration from the `gateway.yaml` the operator renders.
//!
//! The three points of a PEC provider live in one process:
//! - the **access point** (port 465, `Standard` domains only): a mailbox
//!   owner's submission, checked ([`pec::checks`]), scanned
//!   ([`antivirus`]), answered with a signed acceptance or non-acceptance,
//!   and wrapped in a signed transport envelope for each recipient domain;
//! - the **incoming point** (port 25): envelopes and receipts from other
//!   providers, verified against the providers' index, answered with a
//!   taking-charge receipt, or wrapped in an anomaly envelope;
//! - the **delivery point**: envelopes into the mailboxes ([`store`]), with a
//!   delivery receipt or a non-delivery notice for the sender.
//!
//! Module map:
//! - [`pec`]: the pure PEC rules: formal checks, message kinds,
//!   `daticert.xml`, building receipts and envelopes, classifying what
//!   arrives. Functions of their inputs and `now`, tested without a socket.
//! - [`smtp`]: the SMTP server, one module per protocol step.
//! - [`queue`]: the spool and outbound queue that lose nothing; [`relay`]
//!   the SMTP client that empties it.
//! - [`signer`]: S/MIME signatures made in the HSM with the key generation
//!   `gateway.yaml` names.
//! - [`antivirus`], [`store`], [`credentials`], [`legal_log`]: clamd, the
//!   mailboxes, mailbox passwords, the hash-chained legal log.
//! - [`api`]: the message API on the `https` port, where mailbox owners
//!   read their mail.
//! - [`http`], [`metrics`]: `/healthz`, `/readyz`, `/metrics`.
#![forbid(unsafe_code)]

pub mod antivirus;
pub mod api;
pub mod clock;
pub mod credentials;
pub mod failpoint;
pub mod gateway;
pub mod http;
pub mod legal_log;
pub mod metrics;
pub mod pec;
pub mod queue;
pub mod relay;
pub mod signer;
pub mod smtp;
pub mod store;
