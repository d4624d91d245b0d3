//! The SLA gauges, computed at scrape time from the SLA controller's latest
//! evaluation.

use prometheus::{Opts, core::Collector};

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
