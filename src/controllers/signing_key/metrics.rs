//! Certificate expiry and renewal gauges per SigningKey, computed at scrape
//! time from the controller's store.

use prometheus::{Opts, core::Collector};

/// Certificate expiry and renewal per SigningKey, computed at scrape time
/// from the controller's store (a deleted key leaves no stale series).
pub struct CertificateCollector {
    keys: kube::runtime::reflector::Store<crate::api::SigningKey>,
    descs: Vec<prometheus::core::Desc>,
}

const KEY_LABELS: [&str; 2] = ["namespace", "signingkey"];

fn certificate_gauges() -> Result<[prometheus::GaugeVec; 3], prometheus::Error> {
    Ok([
        prometheus::GaugeVec::new(
            Opts::new(
                "pec_certificate_not_after_timestamp_seconds",
                "Expiry of the active certificate, Unix seconds.",
            ),
            &KEY_LABELS,
        )?,
        prometheus::GaugeVec::new(
            Opts::new(
                "pec_certificate_renewal_timestamp_seconds",
                "When the active certificate's successor is due, Unix seconds.",
            ),
            &KEY_LABELS,
        )?,
        prometheus::GaugeVec::new(
            Opts::new(
                "pec_certificate_expiring",
                "1 while the active certificate is within renewBefore of expiry without a successor.",
            ),
            &KEY_LABELS,
        )?,
    ])
}

impl CertificateCollector {
    /// A collector over `keys`.
    pub fn new(
        keys: kube::runtime::reflector::Store<crate::api::SigningKey>,
    ) -> Result<Self, prometheus::Error> {
        let descs = certificate_gauges()?
            .iter()
            .flat_map(|g| g.desc().into_iter().cloned())
            .collect();
        Ok(Self { keys, descs })
    }
}

impl Collector for CertificateCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Ok([not_after, renewal, expiring]) = certificate_gauges() else {
            return Vec::new();
        };
        for key in self.keys.state() {
            let ns = key.metadata.namespace.clone().unwrap_or_default();
            let name = key.metadata.name.clone().unwrap_or_default();
            let labels = [ns.as_str(), name.as_str()];
            let Some(status) = &key.status else { continue };
            if let Some(end) = status.current.as_ref().and_then(|c| c.not_after.as_ref()) {
                not_after
                    .with_label_values(&labels)
                    .set(crate::time::from_k8s(end).timestamp() as f64);
            }
            if let Some(at) = &status.renewal_time {
                renewal
                    .with_label_values(&labels)
                    .set(crate::time::from_k8s(at).timestamp() as f64);
            }
            let is = crate::conditions::is_true(&status.conditions, "Expiring");
            expiring
                .with_label_values(&labels)
                .set(if is { 1.0 } else { 0.0 });
        }
        [not_after, renewal, expiring]
            .iter()
            .flat_map(|g| g.collect())
            .collect()
    }
}
