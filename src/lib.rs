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

#[cfg(test)]
mod docs_tests {
    use std::path::Path;

    /// The README and `docs/` stand alone: every link points at a file of
    /// this repository that exists.
    #[test]
    fn documentation_links_stay_inside_the_repository_and_resolve() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut pages = vec![root.join("README.md")];
        for entry in std::fs::read_dir(root.join("docs")).expect("docs/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "md") {
                pages.push(path);
            }
        }
        for page in pages {
            let text = std::fs::read_to_string(&page).expect("page");
            for (i, _) in text.match_indices("](") {
                let rest = &text[i + 2..];
                let target = &rest[..rest.find(')').unwrap_or(rest.len())];
                assert!(
                    !target.contains("://"),
                    "{} links outside the repository: {target}",
                    page.display()
                );
                let file = target.split('#').next().unwrap_or_default();
                if !file.is_empty() {
                    let resolved = page.parent().expect("dir").join(file);
                    assert!(
                        resolved.exists(),
                        "{} links to {target}, which does not exist",
                        page.display()
                    );
                }
            }
        }
    }
}
