//! Gauges about Sites, computed at scrape time from the Site controller's
//! reflector store, so a deleted Site leaves no stale series:
//! `pec_site_phase{site,phase}` (1 for the current phase, 0 for the others,
//! the state-set shape kube-state-metrics uses), `pec_site_fenced{site}`,
//! `pec_site_nodes{site}`, `pec_site_nodes_ready{site}` and
//! `pec_site_maintenance_refused{site}`.

use kube::runtime::reflector::Store;
use prometheus::{GaugeVec, Opts, core::Collector, proto::MetricFamily};

use crate::api::{Site, SitePhase};

const PHASES: [(SitePhase, &str); 5] = [
    (SitePhase::Serving, "Serving"),
    (SitePhase::Degraded, "Degraded"),
    (SitePhase::Down, "Down"),
    (SitePhase::Maintenance, "Maintenance"),
    (SitePhase::Fenced, "Fenced"),
];

/// The collector over the Site controller's store.
pub struct SiteCollector {
    sites: Store<Site>,
    gauges: Gauges,
}

struct Gauges {
    phase: GaugeVec,
    fenced: GaugeVec,
    nodes: GaugeVec,
    nodes_ready: GaugeVec,
    maintenance_refused: GaugeVec,
}

impl Gauges {
    fn new() -> Result<Self, prometheus::Error> {
        let gauge =
            |name: &str, help: &str, labels: &[&str]| GaugeVec::new(Opts::new(name, help), labels);
        Ok(Self {
            phase: gauge(
                "pec_site_phase",
                "1 for the site's current phase, 0 for the others.",
                &["site", "phase"],
            )?,
            fenced: gauge(
                "pec_site_fenced",
                "1 while the site is fenced (serves nothing until a person clears it).",
                &["site"],
            )?,
            nodes: gauge(
                "pec_site_nodes",
                "Nodes matching the site's selector.",
                &["site"],
            )?,
            nodes_ready: gauge(
                "pec_site_nodes_ready",
                "Of the site's nodes, those whose Ready condition is True.",
                &["site"],
            )?,
            maintenance_refused: gauge(
                "pec_site_maintenance_refused",
                "1 while the site's maintenance is refused: it would leave a domain with no serving site.",
                &["site"],
            )?,
        })
    }

    fn all(&self) -> [&GaugeVec; 5] {
        [
            &self.phase,
            &self.fenced,
            &self.nodes,
            &self.nodes_ready,
            &self.maintenance_refused,
        ]
    }

    fn fill(&self, site: &Site) {
        let name = site.metadata.name.as_deref().unwrap_or_default();
        let status = site.status.clone().unwrap_or_default();
        for (phase, label) in PHASES {
            let current = status.phase == Some(phase);
            self.phase
                .with_label_values(&[name, label])
                .set(f64::from(u8::from(current)));
        }
        self.fenced
            .with_label_values(&[name])
            .set(f64::from(u8::from(site.spec.fenced)));
        self.nodes
            .with_label_values(&[name])
            .set(f64::from(status.nodes_total));
        self.nodes_ready
            .with_label_values(&[name])
            .set(f64::from(status.nodes_ready));
        let refused =
            crate::conditions::is_true(&status.conditions, super::status::MAINTENANCE_REFUSED);
        self.maintenance_refused
            .with_label_values(&[name])
            .set(f64::from(u8::from(refused)));
    }
}

impl SiteCollector {
    /// A collector over `sites`.
    pub fn new(sites: Store<Site>) -> Result<Self, prometheus::Error> {
        Ok(Self {
            sites,
            gauges: Gauges::new()?,
        })
    }
}

impl Collector for SiteCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.gauges
            .all()
            .into_iter()
            .flat_map(|g| g.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(fresh) = Gauges::new() else {
            return Vec::new();
        };
        for site in self.sites.state() {
            fresh.fill(&site);
        }
        fresh.all().into_iter().flat_map(|g| g.collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{SiteSpec, SiteStatus};

    #[test]
    fn a_site_reports_its_phase_fencing_and_nodes() {
        let mut site = Site::new("dc-it1", SiteSpec::default());
        site.spec.fenced = true;
        site.status = Some(SiteStatus {
            phase: Some(SitePhase::Fenced),
            nodes_total: 3,
            nodes_ready: 2,
            ..SiteStatus::default()
        });
        let gauges = Gauges::new().expect("gauges");
        gauges.fill(&site);
        let value = |g: &GaugeVec, labels: &[&str]| g.with_label_values(labels).get();
        assert_eq!(value(&gauges.phase, &["dc-it1", "Fenced"]), 1.0);
        assert_eq!(value(&gauges.phase, &["dc-it1", "Serving"]), 0.0);
        assert_eq!(value(&gauges.fenced, &["dc-it1"]), 1.0);
        assert_eq!(
            (
                value(&gauges.nodes, &["dc-it1"]),
                value(&gauges.nodes_ready, &["dc-it1"])
            ),
            (3.0, 2.0)
        );
        let families: Vec<MetricFamily> =
            gauges.all().into_iter().flat_map(|g| g.collect()).collect();
        let phases = families
            .iter()
            .find(|f| f.name() == "pec_site_phase")
            .expect("pec_site_phase");
        assert_eq!(phases.get_metric().len(), PHASES.len());
    }
}
