//! The operator's Prometheus metrics.
//!
//! Labels are bounded: a controller name and a static error reason (see each
//! controller's `Error::reason`), never a formatted error or an object name
//! that could grow without limit. Secrets never become a label or a value.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder, core::Collector,
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
        let failovers = IntCounterVec::new(
            Opts::new(
                "pec_failovers_total",
                "Switches of a domain's serving sites, by domain and reason.",
            ),
            &["domain", "reason"],
        )?;
        let detection_to_switch = Histogram::with_opts(
            HistogramOpts::new(
                "pec_failover_detection_to_switch_seconds",
                "Seconds from a site being declared down to its endpoints leaving a domain Service.",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
        )?;
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
        })
    }

    /// Registers a collector that computes gauges at scrape time.
    pub fn register_collector(
        &self,
        collector: Box<dyn Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(collector)
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// Gauges about MailDomains computed at scrape time from the controller's
/// reflector store, so a deleted domain leaves no stale series.
pub struct ServingCollector {
    domains: kube::runtime::reflector::Store<crate::api::MailDomain>,
    gauges: ServingGauges,
}

/// The gauges of [`ServingCollector`], made afresh at each scrape.
struct ServingGauges {
    site_serving: prometheus::GaugeVec,
    serving_sites: prometheus::GaugeVec,
    no_healthy_site: prometheus::GaugeVec,
}

impl ServingCollector {
    /// A collector over `domains`.
    pub fn new(
        domains: kube::runtime::reflector::Store<crate::api::MailDomain>,
    ) -> Result<Self, prometheus::Error> {
        Ok(Self {
            domains,
            gauges: ServingGauges::new()?,
        })
    }
}

/// Labels identifying a MailDomain: several namespaces may hold a domain of
/// the same name (in tests), so the object is named as well as the FQDN.
const DOMAIN_LABELS: [&str; 3] = ["namespace", "maildomain", "domain"];

impl ServingGauges {
    fn new() -> Result<Self, prometheus::Error> {
        let site_labels = [DOMAIN_LABELS.as_slice(), &["site"]].concat();
        Ok(Self {
            site_serving: prometheus::GaugeVec::new(
                Opts::new(
                    "pec_site_serving",
                    "1 when the site serves the domain's traffic, else 0.",
                ),
                &site_labels,
            )?,
            serving_sites: prometheus::GaugeVec::new(
                Opts::new(
                    "pec_domain_serving_sites",
                    "Sites serving the domain's traffic.",
                ),
                &DOMAIN_LABELS,
            )?,
            no_healthy_site: prometheus::GaugeVec::new(
                Opts::new(
                    "pec_domain_no_healthy_site",
                    "1 while no listed site of the domain is healthy (the last endpoints are kept).",
                ),
                &DOMAIN_LABELS,
            )?,
        })
    }

    fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
        [
            &self.site_serving,
            &self.serving_sites,
            &self.no_healthy_site,
        ]
        .into_iter()
        .flat_map(|g| g.collect())
        .collect()
    }
}

impl Collector for ServingCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        [
            &self.gauges.site_serving,
            &self.gauges.serving_sites,
            &self.gauges.no_healthy_site,
        ]
        .into_iter()
        .flat_map(|g| g.desc())
        .collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Ok(fresh) = ServingGauges::new() else {
            return Vec::new();
        };
        for md in self.domains.state() {
            let namespace = md.metadata.namespace.clone().unwrap_or_default();
            let name = md.metadata.name.clone().unwrap_or_default();
            let id = [namespace.as_str(), name.as_str(), md.spec.domain.as_str()];
            let status = md.status.clone().unwrap_or_default();
            for site in &md.spec.sites {
                let value = if status.serving_sites.contains(site) {
                    1.0
                } else {
                    0.0
                };
                fresh
                    .site_serving
                    .with_label_values(&[&id[..], &[site.as_str()]].concat())
                    .set(value);
            }
            fresh
                .serving_sites
                .with_label_values(&id)
                .set(status.serving_sites.len() as f64);
            let stranded = crate::conditions::is_true(
                &status.conditions,
                crate::controllers::mail_domain::status::NO_HEALTHY_SITE,
            );
            fresh
                .no_healthy_site
                .with_label_values(&id)
                .set(if stranded { 1.0 } else { 0.0 });
        }
        fresh.families()
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
