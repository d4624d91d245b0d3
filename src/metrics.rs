//! The operator's Prometheus metrics.
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

/// SLA gauges computed at scrape time from the SLA controller's latest
/// evaluation, for the SlaTargets that still exist in the reflector store.
pub struct SlaCollector {
    state: std::sync::Arc<crate::controllers::sla_target::SlaState>,
    targets: kube::runtime::reflector::Store<crate::api::SlaTarget>,
    descs: Vec<prometheus::core::Desc>,
}

/// Labels identifying a measured object.
const SLA_LABELS: [&str; 5] = ["namespace", "slatarget", "object", "domain", "site"];

type SlaValue = fn(f64, &crate::api::SlaObjectStatus) -> f64;

/// Every SLA series: name, help, whether it is a counter, and its value.
const SLA_SERIES: [(&str, &str, bool, SlaValue); 14] = [
    (
        "pec_sla_availability_ratio",
        "Availability so far in the period, unobserved time counted as down (lower bound).",
        false,
        |_, o| o.period.availability_lower / 100.0,
    ),
    (
        "pec_sla_availability_upper_ratio",
        "Availability so far in the period, unobserved time counted as up (upper bound).",
        false,
        |_, o| o.period.availability_upper / 100.0,
    ),
    (
        "pec_sla_objective_ratio",
        "The availability objective.",
        false,
        |objective, _| objective / 100.0,
    ),
    (
        "pec_sla_budget_seconds",
        "The period's error budget in seconds.",
        false,
        |_, o| o.period.budget_seconds,
    ),
    (
        "pec_sla_budget_left_seconds",
        "Error budget left in the period, in seconds (negative when exceeded).",
        false,
        |_, o| o.period.budget_left_seconds,
    ),
    (
        "pec_sla_budget_left_ratio",
        "Error budget left in the period, as a share of the budget.",
        false,
        |_, o| o.period.budget_left_seconds / o.period.budget_seconds.max(f64::MIN_POSITIVE),
    ),
    (
        "pec_sla_longest_outage_seconds",
        "The longest outage of the period so far, in seconds.",
        false,
        |_, o| o.period.longest_outage.as_ref().map_or(0.0, |x| x.seconds),
    ),
    (
        "pec_sla_single_outage_cap_seconds",
        "The longest single outage the period allows, in seconds.",
        false,
        |_, o| o.period.single_outage_cap_seconds,
    ),
    (
        "pec_sla_ongoing_outage_seconds",
        "Length of the outage in progress, in seconds (0 when none).",
        false,
        |_, o| o.ongoing_outage.as_ref().map_or(0.0, |x| x.seconds),
    ),
    (
        "pec_sla_period_start_timestamp_seconds",
        "Start of the current period (Unix time).",
        false,
        |_, o| {
            o.period
                .start
                .as_ref()
                .map_or(0.0, |t| crate::time::from_k8s(t).timestamp() as f64)
        },
    ),
    (
        "pec_sla_period_end_timestamp_seconds",
        "End of the current period (Unix time).",
        false,
        |_, o| {
            o.period
                .end
                .as_ref()
                .map_or(0.0, |t| crate::time::from_k8s(t).timestamp() as f64)
        },
    ),
    (
        "pec_sla_projected_availability_ratio",
        "Availability projected for the period's end at the current rate.",
        false,
        |_, o| o.projected_availability / 100.0,
    ),
    (
        "pec_sla_down_seconds_total",
        "Observed downtime in the current period, in seconds (resets at a period start).",
        true,
        |_, o| o.period.down_seconds,
    ),
    (
        "pec_sla_observed_seconds_total",
        "Observed time in the current period, in seconds (resets at a period start).",
        true,
        |_, o| o.period.measured_seconds,
    ),
];

impl SlaCollector {
    /// A collector over the SLA controller's `state`, limited to `targets`.
    pub fn new(
        state: std::sync::Arc<crate::controllers::sla_target::SlaState>,
        targets: kube::runtime::reflector::Store<crate::api::SlaTarget>,
    ) -> Result<Self, prometheus::Error> {
        let descs = SLA_SERIES
            .iter()
            .map(|(name, help, _, _)| {
                prometheus::core::Desc::new(
                    name.to_string(),
                    help.to_string(),
                    SLA_LABELS.iter().map(|l| l.to_string()).collect(),
                    Default::default(),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            state,
            targets,
            descs,
        })
    }
}

impl Collector for SlaCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let existing: std::collections::BTreeSet<String> = self
            .targets
            .state()
            .iter()
            .map(|t| {
                format!(
                    "{}/{}",
                    t.metadata.namespace.clone().unwrap_or_default(),
                    t.metadata.name.clone().unwrap_or_default()
                )
            })
            .collect();
        let latest = self.state.latest.lock().unwrap_or_else(|e| e.into_inner());
        let mut families = Vec::new();
        for (name, help, counter, value) in SLA_SERIES {
            let opts = Opts::new(name, help);
            let (gauge, count) = match (
                prometheus::GaugeVec::new(opts.clone(), &SLA_LABELS),
                prometheus::CounterVec::new(opts, &SLA_LABELS),
            ) {
                (Ok(g), Ok(c)) => (g, c),
                _ => continue,
            };
            for (key, (objective, objects)) in latest.iter().filter(|(k, _)| existing.contains(*k))
            {
                let (namespace, target) = key.split_once('/').unwrap_or_default();
                for o in objects {
                    let labels = [
                        namespace,
                        target,
                        o.name.as_str(),
                        o.domain.as_str(),
                        o.site.as_deref().unwrap_or(""),
                    ];
                    let v = value(*objective, o);
                    if counter {
                        count.with_label_values(&labels).inc_by(v.max(0.0));
                    } else {
                        gauge.with_label_values(&labels).set(v);
                    }
                }
            }
            families.extend(if counter {
                count.collect()
            } else {
                gauge.collect()
            });
        }
        families
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};

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
