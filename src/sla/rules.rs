//! The Prometheus alerting rules shipped for SREs, generated here so they
//! and the metrics they read cannot drift apart (a test compares them with
//! `charts/pec-operator/files/sla-rules.yaml`).
//!
//! Burn-rate thresholds are not copied from 30-day recipes: each is a share
//! of the budget consumed within a window, divided by the window, times the
//! real length of the current period, which the expressions read from
//! `pec_sla_period_{start,end}_timestamp_seconds`. A four-month period of 120
//! days less an hour and one of 122 days plus an hour get their own numbers.
//!
//! Every expression aggregates by the measured object's identity ([`BY`])
//! before it divides or compares: two operator replicas (or the old and the
//! new leader within one window, after a failover or a rollout) export the
//! same object with different `instance`/`pod` labels, and a one-to-one
//! match over both would fail and leave the alerts blind just when they
//! matter. Counter increases are summed (each replica counted its share of
//! the window); gauges take the side that alerts sooner.

use serde::Serialize;

use crate::alerts::{Options, Severity};

const BY: &str = "namespace, slatarget, object, domain, site";

/// A Prometheus rules file (shared with [`crate::alerts`]).
#[derive(Serialize)]
pub(crate) struct File {
    pub(crate) groups: Vec<Group>,
}

/// A rule group.
#[derive(Serialize)]
pub(crate) struct Group {
    pub(crate) name: &'static str,
    pub(crate) rules: Vec<Rule>,
}

/// A recording or alerting rule.
#[derive(Serialize)]
pub(crate) struct Rule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) record: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) alert: Option<&'static str>,
    pub(crate) expr: String,
    #[serde(rename = "for", skip_serializing_if = "Option::is_none")]
    pub(crate) for_: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) labels: Option<std::collections::BTreeMap<&'static str, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) annotations: Option<std::collections::BTreeMap<&'static str, String>>,
}

/// Windows with a recorded burn rate: (name, PromQL range).
const WINDOWS: [&str; 6] = ["5m", "30m", "1h", "2h", "6h", "1d"];

/// Multi-window burn-rate alerts: (alert, severity, long window, short
/// window, share of the budget spent within the long window, seconds in it,
/// summary).
const BURNS: [(&str, Severity, &str, &str, f64, u32, &str); 2] = [
    (
        "PecSlaBudgetFastBurn",
        Severity::Critical,
        "1h",
        "5m",
        0.02,
        3600,
        "Error budget of {object} burning fast: 2% of this period's budget gone within an hour",
    ),
    (
        "PecSlaBudgetSlowBurn",
        Severity::Warning,
        "1d",
        "2h",
        0.10,
        86_400,
        "Error budget of {object} burning: 10% of this period's budget gone within a day",
    ),
];

fn burn_record(window: &str) -> String {
    format!("pec:sla_burn_rate:{window}")
}

/// The measured object, as summaries and descriptions name it.
const OBJECT: &str = "{{ $labels.object }} ({{ $labels.domain }}, SlaTarget {{ $labels.namespace }}/{{ $labels.slatarget }})";

/// An SLA alert: what it says, with [`OBJECT`] in place of `{object}`.
fn alert(
    options: &Options,
    name: &'static str,
    severity: Severity,
    expr: String,
    for_: &'static str,
    summary: &str,
    description: &str,
) -> Rule {
    crate::alerts::rule(
        options,
        name,
        severity,
        expr,
        for_,
        summary.replace("{object}", OBJECT),
        description.replace("{object}", OBJECT),
    )
}

/// The rules file, as YAML, with the runbook base and severity names of
/// `options` (see [`crate::alerts::Options`]).
pub fn yaml(options: &Options) -> Result<String, serde_yaml::Error> {
    let period_length = format!(
        "(max by ({BY}) (pec_sla_period_end_timestamp_seconds) - on({BY}) max by ({BY}) (pec_sla_period_start_timestamp_seconds))"
    );
    let mut records: Vec<Rule> = WINDOWS
        .iter()
        .map(|w| Rule {
            record: Some(burn_record(w)),
            alert: None,
            expr: format!(
                "(sum by ({BY}) (increase(pec_sla_down_seconds_total[{w}])) / clamp_min(sum by ({BY}) (increase(pec_sla_observed_seconds_total[{w}])), 1)) / on({BY}) (1 - max by ({BY}) (pec_sla_objective_ratio))"
            ),
            for_: None,
            labels: None,
            annotations: None,
        })
        .collect();
    records.push(Rule {
        record: Some("pec:sla_period_length_seconds".into()),
        alert: None,
        expr: period_length,
        for_: None,
        labels: None,
        annotations: None,
    });
    let mut alerts: Vec<Rule> = BURNS
        .iter()
        .map(|(name, severity, long, short, share, seconds, summary)| {
            let threshold = format!("({share} * pec:sla_period_length_seconds / {seconds})");
            alert(
                options,
                name,
                *severity,
                format!(
                    "{} > on({BY}) {threshold} and on({BY}) {} > on({BY}) {threshold}",
                    burn_record(long),
                    burn_record(short)
                ),
                "2m",
                summary,
                &format!(
                    "At this rate {{object}} uses its whole period's error budget long before the period ends (the burn rate over the {long} and {short} windows is above the threshold). Find the outage: the domain's sites, its gateways and `pec-operator sla report`."
                ),
            )
        })
        .collect();
    alerts.extend([
        alert(
            options,
            "PecSlaOutageHalfCap",
            Severity::Warning,
            format!("max by ({BY}) (pec_sla_ongoing_outage_seconds) > on({BY}) (0.5 * min by ({BY}) (pec_sla_single_outage_cap_seconds))"),
            "0s",
            "An ongoing outage of {object} has used half of the single-outage cap",
            "{object} has been down for half of the longest single outage its period allows. End the outage before it reaches the cap.",
        ),
        alert(
            options,
            "PecSlaOutageNearCap",
            Severity::Critical,
            format!("max by ({BY}) (pec_sla_ongoing_outage_seconds) > on({BY}) (0.9 * min by ({BY}) (pec_sla_single_outage_cap_seconds))"),
            "0s",
            "An ongoing outage of {object} is about to break the single-outage cap",
            "{object} has been down for 90% of the longest single outage its period allows; past it the objective is breached whatever the rest of the period does.",
        ),
        alert(
            options,
            "PecSlaProjectedMiss",
            Severity::Warning,
            format!("min by ({BY}) (pec_sla_projected_availability_ratio) < on({BY}) max by ({BY}) (pec_sla_objective_ratio)"),
            "15m",
            "At the current rate {object} ends the period below its objective",
            "The availability projected for the end of the period for {object} is below its objective. Look at the outages of the period in the SLA report.",
        ),
        alert(
            options,
            "PecSlaBudgetExhausted",
            Severity::Critical,
            format!("min by ({BY}) (pec_sla_budget_left_seconds) < 0"),
            "0s",
            "The error budget of {object} is exhausted: the objective is breached",
            "{object} has been down longer than its period's error budget allows: the availability objective of this period is missed.",
        ),
    ]);
    let file = File {
        groups: vec![
            Group {
                name: "pec-sla-records",
                rules: records,
            },
            Group {
                name: "pec-sla-alerts",
                rules: alerts,
            },
        ],
    };
    Ok(format!(
        "# Generated by `pec-operator sla rules` from src/sla/rules.rs; do not edit.\n{}",
        serde_yaml::to_string(&file)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_rules_match_the_generator() {
        let rendered = yaml(&Options::default()).expect("rules render");
        crate::alerts::tests::assert_shipped("sla-rules.yaml", &rendered, "sla rules");
    }

    #[test]
    fn thresholds_follow_the_real_period_length() {
        let y = yaml(&Options::default()).expect("rules render");
        assert!(y.contains("(0.02 * pec:sla_period_length_seconds / 3600)"));
        assert!(y.contains("max by (namespace, slatarget, object, domain, site) (pec_sla_period_end_timestamp_seconds)"));
    }

    #[test]
    fn every_metric_is_aggregated_by_the_object_before_use() {
        let y = yaml(&Options::default()).expect("rules render");
        for metric in [
            "pec_sla_down_seconds_total",
            "pec_sla_observed_seconds_total",
            "pec_sla_objective_ratio",
            "pec_sla_period_start_timestamp_seconds",
            "pec_sla_period_end_timestamp_seconds",
            "pec_sla_ongoing_outage_seconds",
            "pec_sla_single_outage_cap_seconds",
            "pec_sla_projected_availability_ratio",
            "pec_sla_budget_left_seconds",
        ] {
            for (i, _) in y.match_indices(metric) {
                let before = y[..i].trim_end_matches("increase(");
                assert!(
                    before.ends_with(&format!("by ({BY}) (")),
                    "{metric} is used without aggregating by the object first: {}",
                    &before[before.len().saturating_sub(60)..]
                );
            }
        }
    }
}
