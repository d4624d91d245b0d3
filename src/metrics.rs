//! The operator's Prometheus metrics.
//!
//! Labels are bounded: a controller name and a static error reason (see each
//! controller's `Error::reason`), never a formatted error or an object name
//! that could grow without limit. Secrets never become a label or a value.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
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
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
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
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            leader,
        })
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
    }
}
