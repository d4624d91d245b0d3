//! The operator's Prometheus registry and the counters every controller
//! shares; the scrape-time gauges of each kind live beside its controller
//! (`controllers/<kind>/metrics.rs`).
//!
//! Labels are bounded: a controller name and a static error reason (see each
//! controller's `Error::reason`), never a formatted error or an object name
//! that could grow without limit. Secrets never become a label or a value.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder, core::Collector,
};

/// All metrics, registered in one registry served at `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles run, by controller.
    pub reconciles: IntCounterVec,
    /// Failed reconciles, by controller and bounded reason.
    pub reconcile_errors: IntCounterVec,
    /// Reconcile durations in seconds, by controller.
    pub reconcile_duration: HistogramVec,
    /// 1 while this replica holds the leader Lease, else 0.
    pub leader: IntGauge,
    /// Switches of a domain's serving sites, by domain and bounded reason.
    pub failovers: IntCounterVec,
    /// Seconds from a site being declared down to its endpoints leaving a domain.
    pub detection_to_switch: Histogram,
    /// Signing-key generations activated, by kind (Initial, Scheduled, Emergency).
    pub signing_key_rotations: IntCounterVec,
    /// Failed signing-key lifecycle steps, by SigningKey and bounded reason.
    pub signing_key_failures: IntCounterVec,
    /// Certificates revoked after a declared compromise.
    pub signing_key_revocations: IntCounter,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        // CPU, memory, open files and start time of this process (process_*).
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "pec_build_info",
                "Always 1; the operator's version is the label.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(build_info))?;
        let reconciles = IntCounterVec::new(
            Opts::new("pec_reconciles_total", "Reconciles run, by controller."),
            &["controller"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "pec_reconcile_errors_total",
                "Failed reconciles, by controller and reason.",
            ),
            &["controller", "reason"],
        )?;
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "pec_reconcile_duration_seconds",
                "Reconcile duration in seconds.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["controller"],
        )?;
        let leader = IntGauge::new("pec_leader", "1 while this replica holds the leader Lease.")?;
        let failovers = IntCounterVec::new(
            Opts::new(
                "pec_failovers_total",
                "Switches of a domain's serving sites, by MailDomain (namespace, name, PEC domain) and reason.",
            ),
            &["namespace", "maildomain", "domain", "reason"],
        )?;
        let detection_to_switch = Histogram::with_opts(
            HistogramOpts::new(
                "pec_failover_detection_to_switch_seconds",
                "Seconds from a site being declared down to its endpoints leaving a domain Service.",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
        )?;
        let signing_key_rotations = IntCounterVec::new(
            Opts::new(
                "pec_signing_key_rotations_total",
                "Signing-key generations activated, by kind (Initial, Scheduled, Emergency).",
            ),
            &["kind"],
        )?;
        let signing_key_failures = IntCounterVec::new(
            Opts::new(
                "pec_signing_key_failures_total",
                "Failed signing-key lifecycle steps, by SigningKey and reason.",
            ),
            &["namespace", "signingkey", "reason"],
        )?;
        let signing_key_revocations = IntCounter::new(
            "pec_signing_key_revocations_total",
            "Certificates revoked after a declared compromise.",
        )?;
        registry.register(Box::new(signing_key_rotations.clone()))?;
        registry.register(Box::new(signing_key_failures.clone()))?;
        registry.register(Box::new(signing_key_revocations.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(failovers.clone()))?;
        registry.register(Box::new(detection_to_switch.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            leader,
            failovers,
            detection_to_switch,
            signing_key_rotations,
            signing_key_failures,
            signing_key_revocations,
        })
    }

    /// Registers a collector that computes gauges at scrape time.
    pub fn register_collector(
        &self,
        collector: Box<dyn Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(collector)
    }

    /// Registers the scrape-time collector a controller `built` (its
    /// constructor's result). One that could not be built or registered is
    /// logged, and the operator runs on without those metrics: they are
    /// worth less than the reconciles.
    pub fn install<C: Collector + 'static>(&self, what: &str, built: Result<C, prometheus::Error>) {
        if let Err(e) = built.and_then(|c| self.register_collector(Box::new(c))) {
            tracing::warn!(error = %e, metrics = what, "installing scrape-time metrics failed");
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics() {
        let m = Metrics::new().expect("metrics register");
        m.reconciles.with_label_values(&["maildomain"]).inc();
        m.reconcile_errors
            .with_label_values(&["maildomain", "ApplyFailed"])
            .inc();
        let text = m.render().expect("renders");
        assert!(text.contains("pec_reconciles_total{controller=\"maildomain\"} 1"));
        assert!(text.contains("reason=\"ApplyFailed\""));
        assert!(text.contains("pec_leader 0"));
        assert!(text.contains(&format!(
            "pec_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        for process in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(process), "{process} missing");
        }
    }
}
