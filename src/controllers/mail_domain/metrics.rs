//! The MailDomain gauges, computed at scrape time from the controller's
//! store: which sites serve each domain, and whether none is healthy.

use prometheus::{Opts, core::Collector};

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
    use kube::runtime::{reflector, watcher};
    use prometheus::{Encoder, Registry, TextEncoder};

    fn render(collector: ServingCollector) -> String {
        let registry = Registry::new();
        registry.register(Box::new(collector)).expect("register");
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .expect("encode");
        String::from_utf8(buf).expect("utf-8")
    }

    #[test]
    fn serving_gauges_follow_the_store_and_a_deleted_domain_leaves_no_series() {
        let (store, mut writer) = reflector::store();
        let mut md = crate::controllers::mail_domain::build::tests::domain(&["dc-it1", "dc-it2"]);
        md.metadata.namespace = Some("mail".into());
        md.status = Some(crate::api::MailDomainStatus {
            serving_sites: vec!["dc-it2".into()],
            ..Default::default()
        });
        writer.apply_watcher_event(&watcher::Event::Apply(md.clone()));
        let name = md.metadata.name.clone().expect("name");
        let text = render(ServingCollector::new(store.clone()).expect("collector"));
        let series = |site: &str, value: u8| {
            format!(
                "pec_site_serving{{domain=\"{}\",maildomain=\"{name}\",namespace=\"mail\",site=\"{site}\"}} {value}",
                md.spec.domain
            )
        };
        assert!(text.contains(&series("dc-it1", 0)), "{text}");
        assert!(text.contains(&series("dc-it2", 1)), "{text}");
        assert!(text.contains("pec_domain_serving_sites{"), "{text}");
        writer.apply_watcher_event(&watcher::Event::Delete(md.clone()));
        let text = render(ServingCollector::new(store).expect("collector"));
        assert!(
            !text.contains(&name),
            "a deleted domain left series: {text}"
        );
    }
}
